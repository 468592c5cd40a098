"""``rcm-nddr predict``: run a trained multi-task model of a store on image files and write, per task,
a PNG visualization (``<out>/<task>/<stem>.png``) and the raw post-processed prediction
(``<out>/<task>/<stem>.npy``) of every image.

By default the store's tasks run in the deploy form (``rcm_nddr.nn.deploy``: modulators and BatchNorm folded
into the convs, the stem's bank response shared), channels_last, with bf16 autocast on CUDA; ``--form
training`` runs the unfolded network, ``--form batched`` the deploy form with the tasks' backbone convs
grouped, and ``--compile`` runs it through ``torch.compile``. ``--precision bf16|int8`` runs the deploy form
in reduced precision (``rcm_nddr.nn.precision``; int8 calibrated on ``--calibration DIR`` or the store's
calibration set)."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor, nn
from tqdm import tqdm

from rcm_nddr.commands.arguments import IMAGE_EXTENSIONS
from rcm_nddr.config import ConfigError
from rcm_nddr.data.folder import IMAGENET_MEAN, IMAGENET_STD
from rcm_nddr.engine.builders import resolve_device
from rcm_nddr.engine.evaluate import autocast
from rcm_nddr.engine.fast import configure_backends, maybe_compile
from rcm_nddr.errors import UserError
from rcm_nddr.files import atomic_save_npy, atomic_write
from rcm_nddr.store import ModelStore

log = logging.getLogger(__name__)


class PredictError(UserError):
    """Bad input to ``predict``: a missing or unreadable image, clashing output names, an unknown task or
    device; the message names the path or value and what was expected."""


# ----------------------------------------------------------------------------- inputs


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _check_unique_stems(images: Sequence[Path]) -> None:
    """Two different files with the same stem would write the same output files."""
    seen: dict[str, Path] = {}
    for path in images:
        other = seen.setdefault(path.stem, path)
        if other is not path and other.resolve() != path.resolve():
            raise PredictError(
                f"{other} and {path} would both write outputs named '{path.stem}'; rename one of them or "
                "predict them in separate runs with different --out"
            )


def collect_images(items: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``items``, in order: a file is taken as given, a directory contributes
    its image files sorted by name (not recursively; hidden files are skipped). The same file named
    twice is kept once; two different files with the same stem are an error."""
    extensions = " ".join(IMAGE_EXTENSIONS)
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            entries = sorted(p for p in path.iterdir() if p.is_file() and _is_image(p) and not p.name.startswith("."))
            if not entries:
                raise PredictError(f"directory {path} holds no image files (expected files ending in {extensions})")
            found.extend(entries)
        elif path.is_file():
            if not _is_image(path):
                raise PredictError(f"{path} is not an image file: expected a name ending in {extensions}")
            found.append(path)
        elif path.exists():
            raise PredictError(f"{path} is neither a regular file nor a directory; expected an image or a folder")
        else:
            raise PredictError(f"{path} does not exist; expected an image file or a directory of images")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    images = list(unique.values())
    _check_unique_stems(images)
    return images


def load_image(path: str | Path) -> Tensor:
    """An image file -> float32 3 x H x W, RGB, ImageNet-normalized (EXIF orientation applied)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            rgb = np.array(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as exc:
        raise PredictError(f"image {path} does not exist") from exc
    except Exception as exc:  # PIL raises many types (OSError, ValueError, SyntaxError, DecompressionBombError)
        raise PredictError(f"cannot read image {path}: {exc}; expected an image file Pillow can decode") from exc
    image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image - mean) / std).contiguous()


def _batches(images: Sequence[Path], batch_size: int) -> Iterator[tuple[list[Path], list[Tensor]]]:
    """Consecutive images of equal size, at most ``batch_size`` at a time."""
    paths: list[Path] = []
    tensors: list[Tensor] = []
    for path in images:
        image = load_image(path)
        if tensors and (len(tensors) == batch_size or tensors[0].shape != image.shape):
            yield paths, tensors
            paths, tensors = [], []
        paths.append(path)
        tensors.append(image)
    if tensors:
        yield paths, tensors


# ----------------------------------------------------------------------------- outputs


def _save_npy(path: Path, value: Tensor) -> None:
    if value.dtype == torch.bfloat16:  # numpy has no bfloat16
        value = value.float()
    atomic_save_npy(path, value.numpy())


def _save_png(path: Path, rgb: Tensor) -> None:
    image = Image.fromarray(rgb.permute(1, 2, 0).contiguous().numpy(), "RGB")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def _check_output(task: str, prediction: object, batch: int, size: tuple[int, int]) -> None:
    if not isinstance(prediction, torch.Tensor):
        raise RuntimeError(f"model output for task {task!r} is a {type(prediction).__name__}, expected a tensor")
    if prediction.ndim < 3 or prediction.shape[0] != batch or tuple(prediction.shape[-2:]) != size:
        raise RuntimeError(
            f"model output for task {task!r} has shape {tuple(prediction.shape)}; expected {batch} predictions "
            f"at the input resolution {size[0]}x{size[1]}"
        )


def predict(
    model: nn.Module,
    images: Sequence[str | Path],
    out: str | Path,
    device: torch.device,
    batch_size: int = 1,
    progress: bool = True,
    tasks: Sequence[str] | None = None,
    amp: bool = False,
) -> dict[str, list[Path]]:
    """Run ``model`` on every image and write ``out/<task>/<stem>.png`` (the task's visualization) and
    ``out/<task>/<stem>.npy`` (the post-processed prediction without batch dim, on CPU; floating point
    as float32, other dtypes unchanged) for each of ``tasks`` (default: ``model.task_names``).
    Consecutive images of equal size are batched, up to ``batch_size``, and passed channels_last; ``amp``
    runs the model under bf16 autocast on CUDA (no effect elsewhere). Every file is written atomically.
    Returns the written files per task."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    images = [Path(p) for p in images]
    _check_unique_stems(images)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PredictError(f"--out {out} exists and is not a directory; expected a directory for the outputs")
    names = list(model.task_names if tasks is None else tasks)
    missing = [name for name in names if name not in model.tasks]
    if missing:
        raise PredictError(f"the model has no task {', '.join(missing)}; it predicts: {', '.join(model.task_names)}")
    if model.training:
        log.warning("the model is in training mode; predictions use batch statistics")
    written: dict[str, list[Path]] = {name: [] for name in names}
    with torch.inference_mode(), tqdm(total=len(images), unit="image", desc="predict", disable=not progress) as bar:
        for paths, tensors in _batches(images, batch_size):
            size = (tensors[0].shape[1], tensors[0].shape[2])
            with autocast(device, amp):
                outputs = model(torch.stack(tensors).to(device, memory_format=torch.channels_last))
            for name in names:
                if name not in outputs:
                    raise RuntimeError(f"the model returned no output for task {name!r}; it returned {sorted(outputs)}")
                prediction = outputs[name]
                _check_output(name, prediction, len(paths), size)
                prediction = prediction.detach().to("cpu")
                if prediction.is_floating_point():
                    prediction = prediction.float()  # bf16 under autocast: saved as float32
                for path, value in zip(paths, prediction, strict=True):
                    rgb = model.tasks[name].visualize(value)
                    if rgb.dtype != torch.uint8 or rgb.ndim != 3 or rgb.shape[0] != 3:
                        raise RuntimeError(
                            f"task {name!r} visualized a prediction as {rgb.dtype} {tuple(rgb.shape)}, "
                            "expected uint8 3 x H x W"
                        )
                    png, npy = out / name / f"{path.stem}.png", out / name / f"{path.stem}.npy"
                    _save_png(png, rgb.detach().to("cpu"))
                    _save_npy(npy, value)
                    written[name] += [png, npy]
            bar.update(len(paths))
    return written


# ----------------------------------------------------------------------------- command


def _resolve_device(name: str) -> torch.device:
    try:
        device = resolve_device(name)
    except ConfigError as exc:
        raise PredictError(f"--device {name}: no CUDA device is available; use --device cpu or auto") from exc
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PredictError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def _requested_tasks(requested: Sequence[str] | None, available: Sequence[str], store: Path) -> list[str] | None:
    """``--tasks`` without repeats, checked against the store's tasks (None: all of them)."""
    if not available:
        raise PredictError(f"model store {store} holds no tasks; train and register one first")
    if requested is None:
        return None
    names = list(dict.fromkeys(requested))
    unknown = [name for name in names if name not in available]
    if unknown:
        raise PredictError(f"--tasks {' '.join(unknown)}: not in model store {store}; it holds: {', '.join(available)}")
    return names


def calibration_images(folder: str | Path) -> list[Tensor]:
    """The image files of ``folder`` (``--calibration``) as batches of equal size for int8 calibration."""
    if not Path(folder).is_dir():
        raise PredictError(f"--calibration {folder}: not a directory; expected a folder of images")
    return [torch.stack(tensors) for _, tensors in _batches(collect_images([folder]), 16)]


def main(args: argparse.Namespace) -> int:
    """Load the store's model, predict every image and log where the outputs went."""
    images = collect_images(args.images)
    device = _resolve_device(args.device)
    store = ModelStore(args.store)
    requested = _requested_tasks(args.tasks, [t.name for t in store.tasks], store.path)
    if args.precision != "fp32" and args.form == "training":
        raise PredictError(f"--precision {args.precision} is a precision of the deploy form: drop --form training")
    if args.calibration is not None and args.precision != "int8":
        raise PredictError("--calibration calibrates int8: add --precision int8")
    calibration = calibration_images(args.calibration) if args.calibration is not None else None
    model = store.load_model(
        tasks=requested,
        device=device,
        deploy=args.form != "training",
        batched=args.form == "batched",
        allow_plugins=args.allow_plugins,
        precision=args.precision,
        calibration=calibration,
    )
    model.to(memory_format=torch.channels_last)
    configure_backends(device)
    names = requested if requested is not None else list(model.task_names)
    log.info(
        "predicting %s for %d image(s) on %s (%s form, %s%s)",
        ", ".join(names),
        len(images),
        device,
        args.form,
        args.precision,
        ", bf16 autocast" if args.amp and device.type == "cuda" else "",
    )
    start = time.perf_counter()
    # (the compiled module shares the model's weights and answers its attributes: tasks, task_names)
    written = predict(
        maybe_compile(model, args.compile or False),
        images,
        Path(args.out),
        device,
        batch_size=args.batch_size,
        progress=not args.quiet,
        tasks=names,
        amp=args.amp,
    )
    files = sum(len(paths) for paths in written.values())
    log.info(
        "%d image(s) x %d task(s): %d files (.png and .npy) written to %s in %.1f s",
        len(images),
        len(names),
        files,
        args.out,
        time.perf_counter() - start,
    )
    return 0
