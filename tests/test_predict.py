"""``rcm-nddr predict``: image collection, reading, batching, the written PNG/.npy files, errors and the
command's arguments, with a small fake model holding real task plug-ins."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rcm_nddr.commands import predict as predict_mod
from rcm_nddr.commands.arguments import add_predict_arguments
from rcm_nddr.commands.predict import PredictError, collect_images, load_image, main, predict
from rcm_nddr.data.folder import IMAGENET_MEAN, IMAGENET_STD
from rcm_nddr.registry import TASKS, discover
from rcm_nddr.task import DatasetInfo, Task

TASK_NAMES = ["semseg", "depth", "normals", "edge"]
INFO = DatasetInfo("synthetic", classes={"semseg": ["wall", "floor", "box"]})
CPU = torch.device("cpu")


def make_tasks(names: list[str] = TASK_NAMES) -> dict[str, Task]:
    discover([])
    return {name: TASKS.get(name)(name, INFO) for name in names}


class FakeModel(nn.Module):
    """Per-pixel fixed linear maps of the image, post-processed by the real tasks: deterministic and
    independent of how images are batched. Records the shape of every batch it sees."""

    def __init__(self, names: list[str] = TASK_NAMES) -> None:
        super().__init__()
        self.task_names = list(names)
        self.tasks = make_tasks(self.task_names)
        generator = torch.Generator().manual_seed(0)
        self.weights = {name: torch.randn(t.out_channels, 3, generator=generator) for name, t in self.tasks.items()}
        self.calls: list[tuple[int, ...]] = []
        self.eval()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls.append(tuple(images.shape))
        outputs = {}
        for name, task in self.tasks.items():
            w = self.weights[name]
            # elementwise products and sums only: the same bits whatever the batch
            raw = torch.stack(
                [w[k, 0] * images[:, 0] + w[k, 1] * images[:, 1] + w[k, 2] * images[:, 2] for k in range(len(w))], 1
            )
            outputs[name] = task.postprocess(raw)
        return outputs


def write_image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A random RGB image of ``size`` (H, W) in the format the suffix says."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8), "RGB").save(path)
    return path


def expected_outputs(model: FakeModel, path: Path) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return {name: value[0] for name, value in model(load_image(path)[None]).items()}


def no_temporary_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


# ----------------------------------------------------------------------------- collect_images


def test_collect_images_files_directories_and_duplicates(tmp_path):
    folder = tmp_path / "folder"
    b = write_image(folder / "b.png", (4, 5))
    a = write_image(folder / "a.JPG", (4, 5))
    write_image(folder / ".hidden.png", (4, 5))
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    write_image(folder / "sub" / "deep.png", (4, 5))
    single = write_image(tmp_path / "single.webp", (4, 5))
    found = collect_images([str(single), folder, folder / "b.png", str(folder / ".." / "single.webp")])
    # directory entries sorted, not recursive, hidden and non-image files skipped; duplicates dropped
    assert found == [single, a, b]


@pytest.mark.parametrize(
    ("case", "message"),
    [("missing", "does not exist"), ("empty", "holds no image files"), ("text", "is not an image file")],
)
def test_collect_images_refuses_bad_paths(tmp_path, case, message):
    path = tmp_path / "missing.png"
    if case == "empty":
        path = tmp_path / "empty"
        path.mkdir()
        (path / "readme.txt").write_text("no images here")
    elif case == "text":
        path = tmp_path / "x.txt"
        path.write_text("")
    with pytest.raises(PredictError, match=message) as info:
        collect_images([path])
    assert str(path) in str(info.value)


def test_collect_images_refuses_clashing_output_names(tmp_path):
    first = write_image(tmp_path / "one" / "img.png", (4, 5))
    second = write_image(tmp_path / "two" / "img.jpg", (4, 5))
    with pytest.raises(PredictError, match="'img'") as info:
        collect_images([first, tmp_path / "two"])
    assert str(first) in str(info.value) and str(second) in str(info.value)


# ----------------------------------------------------------------------------- load_image


def test_load_image_normalizes_with_imagenet_statistics(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((3, 4), 128, dtype=np.uint8), "L").save(path)
    image = load_image(path)
    assert image.shape == (3, 3, 4) and image.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(image[:, 1, 2], expected)


def test_load_image_refuses_unreadable_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not a PNG")
    with pytest.raises(PredictError, match="cannot read image") as info:
        load_image(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- predict


def test_predict_writes_visualizations_and_raw_outputs(tmp_path):
    sizes = {"small": (6, 8), "wide": (5, 11)}
    images = [
        write_image(tmp_path / "in" / f"{stem}.png", size, seed=i) for i, (stem, size) in enumerate(sizes.items())
    ]
    model = FakeModel()
    out = tmp_path / "out"
    written = predict(model, images, out, CPU, batch_size=2, progress=False)
    # images of different sizes are never stacked into one batch
    assert model.calls == [(1, 3, 6, 8), (1, 3, 5, 11)]

    assert set(written) == set(TASK_NAMES)
    dtypes = {"semseg": np.int64, "depth": np.float32, "normals": np.float32, "edge": np.float32}
    channels = {"semseg": (), "depth": (1,), "normals": (3,), "edge": (1,)}
    for path in images:
        h, w = sizes[path.stem]
        expected = expected_outputs(model, path)
        for name in TASK_NAMES:
            png, npy = out / name / f"{path.stem}.png", out / name / f"{path.stem}.npy"
            assert png in written[name] and npy in written[name]
            array = np.load(npy)
            assert array.dtype == dtypes[name]
            assert array.shape == (*channels[name], h, w)
            np.testing.assert_array_equal(array, expected[name].numpy())
            with Image.open(png) as im:
                rgb = np.array(im)
            assert im.mode == "RGB" and rgb.shape == (h, w, 3)
            np.testing.assert_array_equal(rgb, model.tasks[name].visualize(expected[name]).permute(1, 2, 0).numpy())
    assert sorted(len(paths) for paths in written.values()) == [4] * len(TASK_NAMES)
    assert no_temporary_files(out)


class HalfModel(FakeModel):
    """Floating-point outputs in bf16, as a model under autocast returns them."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = super().forward(images)
        return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in outputs.items()}


def test_floating_point_predictions_are_saved_as_float32(tmp_path):
    image = write_image(tmp_path / "in" / "x.png", (6, 8))
    model = HalfModel()
    predict(model, [image], tmp_path / "out", CPU, progress=False)
    expected = expected_outputs(model, image)
    for name in TASK_NAMES:
        array = np.load(tmp_path / "out" / name / "x.npy")
        assert array.dtype == (np.int64 if name == "semseg" else np.float32), name
        np.testing.assert_array_equal(array, expected[name].float().numpy() if name != "semseg" else expected[name])


def test_batching_matches_one_image_at_a_time(tmp_path):
    sizes = [(6, 8), (6, 8), (6, 8), (7, 5), (6, 8)]
    images = [write_image(tmp_path / "in" / f"im{i}.png", size, seed=i) for i, size in enumerate(sizes)]
    single, batched = FakeModel(), FakeModel()
    predict(single, images, tmp_path / "one", CPU, batch_size=1, progress=False)
    written = predict(batched, images, tmp_path / "many", CPU, batch_size=2, progress=True)
    # consecutive images of equal size, at most two at a time
    assert [shape[0] for shape in batched.calls] == [2, 1, 1, 1]
    assert [shape[0] for shape in single.calls] == [1] * 5
    for name, paths in written.items():
        for path in paths:
            reference = tmp_path / "one" / name / path.name
            if path.suffix == ".npy":
                a, b = np.load(path), np.load(reference)
                assert a.dtype == b.dtype
                if np.issubdtype(a.dtype, np.integer):
                    np.testing.assert_array_equal(a, b)
                else:
                    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
            else:
                with Image.open(path) as a, Image.open(reference) as b:
                    np.testing.assert_array_equal(np.array(a), np.array(b))


def test_predict_selected_tasks_and_directory_input(tmp_path):
    folder = tmp_path / "in"
    for i in range(3):
        write_image(folder / f"im{i}.jpg", (8, 8), seed=i)
    images = collect_images([folder])
    written = predict(FakeModel(), images, tmp_path / "out", CPU, batch_size=4, progress=False, tasks=["depth"])
    assert list(written) == ["depth"]
    assert sorted(p.name for p in (tmp_path / "out" / "depth").iterdir()) == [
        f"im{i}.{ext}" for i in range(3) for ext in ("npy", "png")
    ]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["depth"]


def test_predict_refuses_unreadable_image_and_file_as_output(tmp_path):
    good = write_image(tmp_path / "good.png", (4, 4))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG truncated")
    with pytest.raises(PredictError, match="bad.png"):
        predict(FakeModel(), [good, bad], tmp_path / "out", CPU, progress=False)
    assert no_temporary_files(tmp_path / "out")
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(PredictError, match="not a directory"):
        predict(FakeModel(), [good], target, CPU, progress=False)
    with pytest.raises(PredictError, match="no task nope"):
        predict(FakeModel(), [good], tmp_path / "out", CPU, progress=False, tasks=["nope"])


def test_predict_rejects_a_model_output_at_the_wrong_resolution(tmp_path):
    class Shrinking(FakeModel):
        def forward(self, images):
            return {name: value[..., :-1] for name, value in super().forward(images).items()}

    image = write_image(tmp_path / "x.png", (4, 6))
    with pytest.raises(RuntimeError, match="input resolution 4x6"):
        predict(Shrinking(), [image], tmp_path / "out", CPU, progress=False)


# ----------------------------------------------------------------------------- the command


class FakeStore:
    """Stands in for ``ModelStore``: its tasks, and ``load_model`` returning a ``FakeModel``."""

    loaded: list[tuple[list[str] | None, torch.device]] = []
    precisions: list[tuple[str, int | None]] = []

    def __init__(self, path):
        self.path = Path(path)

    @property
    def tasks(self):
        return [SimpleNamespace(name=name) for name in TASK_NAMES]

    def load_model(
        self, tasks=None, device=None, deploy=False, batched=False, allow_plugins=(), precision="fp32", calibration=None
    ):
        FakeStore.loaded.append((tasks, device, deploy, batched))
        FakeStore.precisions.append((precision, None if calibration is None else len(calibration)))
        return FakeModel(tasks or TASK_NAMES)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_predict_arguments(parser)
    return parser.parse_args(argv)


def test_predict_arguments_defaults_and_validation(tmp_path):
    args = parse(["--store", "s", "--images", "a.png", "dir", "--out", "o"])
    assert args.store == "s" and args.images == ["a.png", "dir"] and args.out == "o"
    assert args.tasks is None and args.device == "auto" and args.batch_size == 4
    assert not args.quiet and not args.verbose and args.handler == "rcm_nddr.commands.predict:main"
    assert args.form == "deploy" and args.compile is None and args.amp
    args = parse(["--store", "s", "--images", "a", "--out", "o", "--form", "batched", "--compile", "--no-amp"])
    assert args.form == "batched" and args.compile == "default" and not args.amp
    assert parse(["--store", "s", "--images", "a", "--out", "o", "--compile", "max-autotune"]).compile == "max-autotune"
    args = parse(["--store", "s", "--images", "a", "--out", "o", "--tasks", "depth", "edge", "--device", "cuda:1"])
    assert args.tasks == ["depth", "edge"] and args.device == "cuda:1"
    bad_values = (["--batch-size", "0"], ["--device", "gpu"], ["--device", "cuda:x"])
    for bad in (*bad_values, ["--form", "fast"], ["--compile", "x"]):
        with pytest.raises(SystemExit):
            parse(["--store", "s", "--images", "a", "--out", "o", *bad])
    for missing in ("--store", "--images", "--out"):
        argv = ["--store", "s", "--images", "a", "--out", "o"]
        index = argv.index(missing)
        with pytest.raises(SystemExit):
            parse(argv[:index] + argv[index + 2 :])


def test_main_predicts_the_requested_tasks(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(predict_mod, "ModelStore", FakeStore)
    monkeypatch.setattr(FakeStore, "loaded", [])
    image = write_image(tmp_path / "in" / "x.png", (5, 7))
    out = tmp_path / "out"
    argv = ["--store", "s", "--images", str(image), "--out", str(out), "--device", "cpu", "--quiet"]
    with caplog.at_level("INFO", logger=predict_mod.__name__):
        assert main(parse([*argv, "--tasks", "edge", "semseg", "edge"])) == 0
    assert FakeStore.loaded == [(["edge", "semseg"], CPU, True, False)]  # the deploy form by default
    assert sorted(p.name for p in out.iterdir()) == ["edge", "semseg"]
    assert np.load(out / "semseg" / "x.npy").shape == (5, 7)
    assert "written to" in caplog.text and "(deploy form, fp32)" in caplog.text
    assert main(parse(argv)) == 0  # default: every task of the store
    assert sorted(p.name for p in out.iterdir()) == sorted(TASK_NAMES)
    assert main(parse([*argv, "--form", "training"])) == 0
    assert main(parse([*argv, "--form", "batched"])) == 0
    assert [entry[2:] for entry in FakeStore.loaded[2:]] == [(False, False), (True, True)]


def test_main_passes_the_precision_and_calibration_images(tmp_path, monkeypatch):
    monkeypatch.setattr(predict_mod, "ModelStore", FakeStore)
    monkeypatch.setattr(FakeStore, "precisions", [])
    image = write_image(tmp_path / "in" / "x.png", (5, 7))
    for i, size in enumerate([(6, 6), (6, 6), (8, 6)]):
        write_image(tmp_path / "calibration" / f"c{i}.png", size, seed=i)
    argv = ["--store", "s", "--images", str(image), "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"]
    assert main(parse([*argv, "--precision", "bf16"])) == 0
    assert main(parse([*argv, "--precision", "int8"])) == 0  # the store's calibration set
    assert main(parse([*argv, "--precision", "int8", "--calibration", str(tmp_path / "calibration")])) == 0
    assert FakeStore.precisions == [("bf16", None), ("int8", None), ("int8", 2)]  # two batches of equal size
    with pytest.raises(PredictError, match="--calibration calibrates int8"):
        main(parse([*argv, "--calibration", str(tmp_path / "calibration")]))
    with pytest.raises(PredictError, match="precision of the deploy form"):
        main(parse([*argv, "--precision", "int8", "--form", "training"]))
    with pytest.raises(PredictError, match="not a directory"):
        main(parse([*argv, "--precision", "int8", "--calibration", str(image)]))
    with pytest.raises(SystemExit):
        parse([*argv, "--precision", "fp16"])


def test_main_refuses_unknown_task_and_missing_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(predict_mod, "ModelStore", FakeStore)
    image = write_image(tmp_path / "x.png", (4, 4))
    argv = ["--store", "s", "--images", str(image), "--out", str(tmp_path / "out"), "--quiet"]
    with pytest.raises(PredictError, match="--tasks nope: not in model store s; it holds: semseg"):
        main(parse([*argv, "--device", "cpu", "--tasks", "depth", "nope"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PredictError, match="--device cuda: no CUDA device"):
        main(parse([*argv, "--device", "cuda"]))
    with pytest.raises(PredictError, match="does not exist"):
        main(parse(["--store", "s", "--images", str(tmp_path / "gone.png"), "--out", "o", "--device", "cpu"]))
    assert not (tmp_path / "out").exists()
