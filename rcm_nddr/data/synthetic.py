"""SYNTH_MT generator: procedural rooms with textured primitives, ray-cast with a pinhole camera into an
image and exact dense targets (semseg, parts, depth, normals, edges, saliency), written to disk. This
module writes datasets; ``synthetic_scene`` samples scenes and ``synthetic_render`` renders them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

# the scene and renderer live in their own modules; their public names are re-exported here
from rcm_nddr.data.synthetic_render import DEPTH_EDGE_THRESHOLD, _check_size, _edges, render_scene
from rcm_nddr.data.synthetic_scene import CLASSES, PART_CLASSES, PART_SEMSEG, Scene

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"

_FILES = {
    "images": "<id>.png RGB uint8",
    "segmentation": "<id>.png uint8, 0 = ignore, k + 1 = classes.semseg[k]",
    "parts": "<id>.png uint8, 0 = ignore, k + 1 = classes.parts[k]",
    "depth": "<id>.npy float32 z-depth in metres, 0 = invalid",
    "normals": "<id>.npy float32 H x W x 3 unit normals in the camera frame facing the camera, 0 = invalid",
    "edge": "<id>.png uint8, 255 = edge (the nearer pixel of 4-neighbours on different objects or room planes, "
    "or across a depth discontinuity), 0 = no edge",
    "sal": "<id>.png uint8, 255 = salient (object), 0 = background (room)",
    "gt_sets": "<split>.txt one sample id per line",
    "cameras.json": "{id: {fx, fy, cx, cy}} pinhole intrinsics in pixels, pixel centres at integer coordinates",
}


def _meta(n_train: int, n_val: int, size: tuple[int, int], seed: int) -> dict:
    return {
        "name": "SYNTH_MT",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size": [size[0], size[1]],
        "splits": {"train": n_train, "val": n_val},
        "classes": {"semseg": list(CLASSES), "parts": list(PART_CLASSES)},
        "depth_unit": "m",
        "normals_frame": "camera: x right, y down, z forward",
        "files": dict(_FILES),
    }


def _check_args(n_train: int, n_val: int, size: tuple[int, int], seed: int) -> tuple[int, int]:
    for name, value in (("n_train", n_train), ("n_val", n_val)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"SYNTH_MT: {name} must be an integer >= 0, got {value!r}")
    if n_train + n_val == 0:
        raise ValueError("SYNTH_MT: n_train + n_val must be > 0, got 0 samples in total")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"SYNTH_MT: seed must be an integer >= 0, got {seed!r}")
    return _check_size(size)


def _existing_meta(out: Path) -> dict | None:
    """The meta of a SYNTH_MT dataset at ``out``, None if ``out`` is missing or an empty directory."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"SYNTH_MT: output path {out} exists and is not a directory")
    if not any(out.iterdir()):
        return None
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("name") != "SYNTH_MT":
        raise FileExistsError(
            f"SYNTH_MT: output directory {out} is not empty and holds no SYNTH_MT dataset "
            f"(no valid meta.json with name SYNTH_MT); pick another directory"
        )
    return meta


def _check_same_dataset(meta: dict, wanted: dict, out: Path) -> None:
    keys = ("generator_version", "seed", "size", "splits")
    if all(meta.get(k) == wanted[k] for k in keys):
        return
    have = {k: meta.get(k) for k in keys}
    want = {k: wanted[k] for k in keys}
    raise FileExistsError(
        f"SYNTH_MT: {out} already holds a SYNTH_MT dataset made with {have}, not the requested {want}; "
        f"pick another directory or delete it"
    )


def _save_png(array: np.ndarray, mode: str, path: Path) -> None:
    # the fastest zlib level: files grow by a quarter, encoding is three times faster
    Image.fromarray(array, mode=mode).save(path, compress_level=1)


def _write_sample(root: Path, sample_id: str, scene: Scene) -> None:
    _save_png(scene.image, "RGB", root / "images" / f"{sample_id}.png")
    _save_png((scene.semseg + 1).astype(np.uint8), "L", root / "segmentation" / f"{sample_id}.png")
    _save_png((scene.parts + 1).astype(np.uint8), "L", root / "parts" / f"{sample_id}.png")
    _save_png(scene.edge.astype(np.uint8) * 255, "L", root / "edge" / f"{sample_id}.png")
    _save_png(scene.sal.astype(np.uint8) * 255, "L", root / "sal" / f"{sample_id}.png")
    np.save(root / "depth" / f"{sample_id}.npy", scene.depth)
    np.save(root / "normals" / f"{sample_id}.npy", scene.normals)


def _write_dataset(root: Path, meta: dict, n_train: int, n_val: int, size, seed: int, progress: bool) -> None:
    for folder in ("images", "segmentation", "parts", "depth", "normals", "edge", "sal", "gt_sets"):
        (root / folder).mkdir()
    ids = [f"{i:06d}" for i in range(n_train + n_val)]
    cameras = {}
    for i in tqdm(range(len(ids)), desc="SYNTH_MT", unit="sample", disable=not progress):
        scene = render_scene(np.random.default_rng([seed, i]), size)
        _write_sample(root, ids[i], scene)
        cameras[ids[i]] = dict(zip(("fx", "fy", "cx", "cy"), map(float, scene.intrinsics), strict=True))
    (root / "gt_sets" / "train.txt").write_text("".join(f"{i}\n" for i in ids[:n_train]))
    (root / "gt_sets" / "val.txt").write_text("".join(f"{i}\n" for i in ids[n_train:]))
    (root / "cameras.json").write_text(json.dumps(cameras, indent=1, sort_keys=True) + "\n")
    # meta.json last: its presence marks a complete dataset
    (root / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def generate(
    out: str | Path,
    n_train: int,
    n_val: int,
    size: tuple[int, int] = (128, 128),
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a SYNTH_MT dataset of ``n_train`` + ``n_val`` samples of ``size`` (H, W) to ``out``.

    Sample i is rendered from ``numpy.random.default_rng([seed, i])``, so the same arguments give the
    same bytes. The dataset is written to a temporary sibling directory and renamed into place at the
    end. An ``out`` that already holds the same dataset is returned as is; a non-empty ``out`` holding
    anything else is refused.
    """
    size = _check_args(n_train, n_val, size, seed)
    out = Path(out)
    meta = _meta(int(n_train), int(n_val), size, int(seed))
    existing = _existing_meta(out)
    if existing is not None:
        _check_same_dataset(existing, meta, out)
        log.info("SYNTH_MT at %s already matches the requested dataset; reusing it", out)
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        _write_dataset(tmp, meta, int(n_train), int(n_val), size, int(seed), progress)
        if out.is_dir():
            out.rmdir()  # empty: checked above
        try:
            tmp.rename(out)
        except OSError:
            # another process finished the same dataset first: keep theirs if it matches
            existing = _existing_meta(out)
            if existing is None:
                raise
            _check_same_dataset(existing, meta, out)
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("SYNTH_MT: wrote %d train + %d val samples of size %s to %s", n_train, n_val, size, out)
    return out


__all__ = [
    "CLASSES",
    "DEPTH_EDGE_THRESHOLD",
    "GENERATOR_VERSION",
    "PART_CLASSES",
    "PART_SEMSEG",
    "Scene",
    "_edges",
    "generate",
    "render_scene",
]
