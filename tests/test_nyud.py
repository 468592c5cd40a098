"""NYUD-MT: both published layouts (ASTMT and older .mat/.jpg/.png), a mixed root, built-in info, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import rcm_nddr.data.nyud  # noqa: F401 - registers "nyud"
from rcm_nddr.data.folder import DatasetError
from rcm_nddr.data.nyud import NUM_CLASSES, NYUD_CLASSES, NYUDMT
from rcm_nddr.data.transforms import build_transforms
from rcm_nddr.registry import DATASETS

H, W = 6, 8
TARGETS = ("semseg", "depth", "normals", "edge")


def _unit_normals(rng: np.random.Generator) -> np.ndarray:
    n = rng.normal(size=(H, W, 3)).astype(np.float32)
    n[..., 2] = -np.abs(n[..., 2]) - 0.1
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def _labels(rng: np.random.Generator) -> np.ndarray:
    labels = rng.integers(0, NUM_CLASSES + 1, (H, W), dtype=np.uint8)
    labels[0, 0], labels[0, 1], labels[0, 2] = 0, 1, NUM_CLASSES  # ignore, first and last class
    return labels


def _depth(rng: np.random.Generator) -> np.ndarray:
    depth = rng.uniform(0.5, 10.0, (H, W)).astype(np.float32)
    depth[1, :3] = 0.0
    return depth


def _edges(rng: np.random.Generator) -> np.ndarray:
    edges = (rng.random((H, W)) < 0.3).astype(np.uint8)
    edges[0, 0], edges[0, 1] = 0, 1
    return edges


def _image(root: Path, sid: str, rng: np.random.Generator) -> None:
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), "RGB").save(root / "images" / f"{sid}.jpg")


def _mkdirs(root: Path) -> None:
    for folder in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / folder).mkdir(parents=True, exist_ok=True)


def write_astmt(root: Path, sid: str, seed: int = 0, edge_scale: int = 1, edge_dtype: str = "float32") -> dict:
    """One ASTMT-layout sample; returns the expected decoded tensors."""
    rng = np.random.default_rng(seed)
    _mkdirs(root)
    _image(root, sid, rng)
    labels, depth, normals, edges = _labels(rng), _depth(rng), _unit_normals(rng), _edges(rng)
    normals[1, :3] = 0.0
    Image.fromarray(labels, "L").save(root / "segmentation" / f"{sid}.png")
    np.save(root / "depth" / f"{sid}.npy", depth)
    np.save(root / "normals" / f"{sid}.npy", normals)
    np.save(root / "edge" / f"{sid}.npy", (edges * edge_scale).astype(edge_dtype))
    raw = torch.from_numpy(labels.astype(np.int64))
    return {
        "semseg": torch.where(raw == 0, 255, raw - 1),
        "depth": torch.from_numpy(depth)[None],
        "normals": torch.from_numpy(normals).permute(2, 0, 1),
        "edge": torch.from_numpy(edges.astype(np.float32))[None],
    }


def write_old(root: Path, sid: str, seed: int = 0, normals_ext: str = ".png", edge_scale: int = 255) -> dict:
    """One older-layout sample (.mat semseg/depth, uint8 normals, .png edges); returns the expected tensors."""
    rng = np.random.default_rng(seed)
    _mkdirs(root)
    _image(root, sid, rng)
    labels, depth, normals, edges = _labels(rng), _depth(rng), _unit_normals(rng), _edges(rng)
    scipy.io.savemat(root / "segmentation" / f"{sid}.mat", {"segmentation": labels.astype(np.float64)})
    scipy.io.savemat(root / "depth" / f"{sid}.mat", {"depth": depth.astype(np.float64)})
    encoded = np.round((normals + 1.0) * 127.5).astype(np.uint8)
    encoded[1, 0] = (0, 0, 0)  # invalid: black
    encoded[1, 1] = (128, 128, 128)  # invalid: decodes to ~0
    quality = {"quality": 100} if normals_ext == ".jpg" else {}
    Image.fromarray(encoded, "RGB").save(root / "normals" / f"{sid}{normals_ext}", **quality)
    Image.fromarray((edges * edge_scale).astype(np.uint8), "L").save(root / "edge" / f"{sid}.png")
    decoded = encoded.astype(np.float32) * (2.0 / 255.0) - 1.0
    decoded /= np.linalg.norm(decoded, axis=-1, keepdims=True)
    decoded[1, :2] = 0.0
    raw = torch.from_numpy(labels.astype(np.int64))
    return {
        "semseg": torch.where(raw == 0, 255, raw - 1),
        "depth": torch.from_numpy(depth)[None],
        "normals": torch.from_numpy(decoded).permute(2, 0, 1),
        "edge": torch.from_numpy(edges.astype(np.float32))[None],
    }


def _split(root: Path, ids: list[str], split: str = "val") -> None:
    (root / "gt_sets" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


def _check_sample(sample: dict, expected: dict, normals_atol: float = 0.0) -> None:
    assert sample["semseg"].dtype == torch.int64 and sample["semseg"].shape == (H, W)
    assert torch.equal(sample["semseg"], expected["semseg"])
    assert sample["semseg"][0, 0] == 255 and sample["semseg"][0, 1] == 0 and sample["semseg"][0, 2] == 39
    assert sample["depth"].dtype == torch.float32 and sample["depth"].shape == (1, H, W)
    torch.testing.assert_close(sample["depth"], expected["depth"], rtol=0, atol=0)
    assert (sample["depth"][0, 1, :3] == 0).all()
    assert sample["normals"].dtype == torch.float32 and sample["normals"].shape == (3, H, W)
    torch.testing.assert_close(sample["normals"], expected["normals"], rtol=0, atol=normals_atol or 1e-6)
    assert sample["edge"].dtype == torch.float32 and sample["edge"].shape == (1, H, W)
    assert torch.equal(sample["edge"], expected["edge"])
    assert sample["image"].shape == (3, H, W)


def test_registered_and_info(tmp_path):
    assert DATASETS.get("nyud") is NYUDMT
    write_astmt(tmp_path, "0001")
    _split(tmp_path, ["0001"])
    ds = NYUDMT(tmp_path, "val", ["semseg"])
    assert ds.info.name == "NYUD-MT"
    assert len(ds.info.classes["semseg"]) == 40 == NUM_CLASSES
    assert ds.info.classes["semseg"][:3] == ["wall", "floor", "cabinet"]
    assert ds.info.classes["semseg"][23] == "refridgerator"
    assert ds.info.classes["semseg"][-3:] == ["otherstructure", "otherfurniture", "otherprop"]
    assert list(NYUD_CLASSES) == ds.info.classes["semseg"]
    assert not (tmp_path / "meta.json").exists()


@pytest.mark.parametrize(("edge_scale", "edge_dtype"), [(1, "float32"), (255, "float32"), (1, "uint8"), (255, "uint8")])
def test_astmt_layout(tmp_path, edge_scale, edge_dtype):
    expected = write_astmt(tmp_path, "0001", edge_scale=edge_scale, edge_dtype=edge_dtype)
    _split(tmp_path, ["0001"])
    sample = NYUDMT(tmp_path, "val", TARGETS)[0]
    assert set(sample) == {"image", *TARGETS, "meta"}
    assert sample["meta"] == {"id": "0001", "size": (H, W)}
    _check_sample(sample, expected)


@pytest.mark.parametrize("edge_scale", [1, 255])
def test_old_layout_png_normals_exact(tmp_path, edge_scale):
    expected = write_old(tmp_path, "0001", normals_ext=".png", edge_scale=edge_scale)
    _split(tmp_path, ["0001"])
    sample = NYUDMT(tmp_path, "val", TARGETS)[0]
    _check_sample(sample, expected)
    assert (sample["normals"][:, 1, :2] == 0).all()  # black and mid-grey are invalid
    norms = sample["normals"].norm(dim=0)
    valid = norms > 0
    torch.testing.assert_close(norms[valid], torch.ones_like(norms[valid]))


def test_old_layout_jpg_normals_within_tolerance(tmp_path):
    write_old(tmp_path, "0001")
    _split(tmp_path, ["0001"])
    (tmp_path / "normals" / "0001.png").unlink()
    # a smooth field (JPEG blurs per-pixel noise) facing the camera, left half invalid (mid-grey)
    h, w = 16, 16
    ys, xs = np.meshgrid(np.linspace(-0.4, 0.4, h), np.linspace(-0.4, 0.4, w), indexing="ij")
    normals = np.stack([xs, ys, -np.ones_like(xs)], axis=-1)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    encoded = np.round((normals + 1.0) * 127.5).astype(np.uint8)
    encoded[:, : w // 2] = 128
    Image.fromarray(encoded, "RGB").save(tmp_path / "normals" / "0001.jpg", quality=95, subsampling=0)
    Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8), "RGB").save(tmp_path / "images" / "0001.jpg")
    sample = NYUDMT(tmp_path, "val", ["normals"])[0]["normals"]
    assert sample.shape == (3, h, w)
    assert (sample[:, :, : w // 2 - 1] == 0).all()  # invalid (a column of margin for JPEG ringing)
    got, want = sample[:, :, w // 2 + 1 :], torch.from_numpy(normals.astype(np.float32)).permute(2, 0, 1)
    torch.testing.assert_close(got, want[:, :, w // 2 + 1 :], rtol=0, atol=0.05)
    torch.testing.assert_close(got.norm(dim=0), torch.ones(h, w // 2 - 1))


def test_mixed_layout_root(tmp_path):
    expected_a = write_astmt(tmp_path, "a", seed=1)
    expected_b = write_old(tmp_path, "b", seed=2)
    _split(tmp_path, ["a", "b"], "train")
    ds = NYUDMT(tmp_path, "train", TARGETS)
    assert len(ds) == 2
    _check_sample(ds[0], expected_a)
    _check_sample(ds[1], expected_b)


def test_only_requested_targets_are_read(tmp_path):
    write_astmt(tmp_path, "0001")
    _split(tmp_path, ["0001"])
    (tmp_path / "normals" / "0001.npy").unlink()
    (tmp_path / "edge" / "0001.npy").unlink()
    sample = NYUDMT(tmp_path, "val", ["semseg", "depth"])[0]
    assert set(sample) == {"image", "semseg", "depth", "meta"}


def test_missing_file_names_path_and_layout(tmp_path):
    write_astmt(tmp_path, "0001")
    _split(tmp_path, ["0001"])
    (tmp_path / "depth" / "0001.npy").unlink()
    ds = NYUDMT(tmp_path, "val", ["depth"])
    with pytest.raises(DatasetError) as err:
        ds[0]
    message = str(err.value)
    assert str(tmp_path / "depth" / "0001.npy") in message and str(tmp_path / "depth" / "0001.mat") in message
    assert "depth/<id>.npy|.mat" in message


@pytest.mark.parametrize("target", ["sal", "parts"])
def test_unknown_target(tmp_path, target):
    write_astmt(tmp_path, "0001")
    _split(tmp_path, ["0001"])
    with pytest.raises(DatasetError, match=rf"no target '{target}'.*semseg, depth, normals, edge") as err:
        NYUDMT(tmp_path, "val", ["semseg", target])
    assert str(tmp_path) in str(err.value)


def test_mat_with_two_arrays_is_ambiguous(tmp_path):
    write_old(tmp_path, "0001")
    _split(tmp_path, ["0001"])
    path = tmp_path / "depth" / "0001.mat"
    scipy.io.savemat(path, {"depth": np.ones((H, W)), "rawDepth": np.ones((H, W))})
    with pytest.raises(DatasetError) as err:
        NYUDMT(tmp_path, "val", ["depth"])[0]
    message = str(err.value)
    assert str(path) in message and "'depth'" in message and "'rawDepth'" in message


@pytest.mark.parametrize("ext", [".png", ".mat"])
def test_out_of_range_label_refused(tmp_path, ext):
    (write_astmt if ext == ".png" else write_old)(tmp_path, "0001")
    _split(tmp_path, ["0001"])
    labels = np.zeros((H, W), dtype=np.uint8)
    labels[2, 2] = NUM_CLASSES + 1
    path = tmp_path / "segmentation" / f"0001{ext}"
    if ext == ".png":
        Image.fromarray(labels, "L").save(path)
    else:
        scipy.io.savemat(path, {"seg": labels})
    with pytest.raises(DatasetError, match="outside 0..40") as err:
        NYUDMT(tmp_path, "val", ["semseg"])[0]
    assert str(path) in str(err.value)


def test_bad_edge_values_refused(tmp_path):
    write_astmt(tmp_path, "0001")
    _split(tmp_path, ["0001"])
    path = tmp_path / "edge" / "0001.npy"
    edges = np.zeros((H, W), dtype=np.float32)
    edges[0, :3] = (0, 1, 255)  # mixes the two encodings
    np.save(path, edges)
    with pytest.raises(DatasetError, match=r"only \{0, 1\} or only \{0, 255\}") as err:
        NYUDMT(tmp_path, "val", ["edge"])[0]
    assert str(path) in str(err.value)


def test_sample_through_val_transforms(tmp_path):
    write_old(tmp_path, "0001")
    _split(tmp_path, ["0001"])
    crop = (H + 2, W + 4)
    ds = NYUDMT(tmp_path, "val", TARGETS, transform=build_transforms(train=False, crop=crop))
    raw = NYUDMT(tmp_path, "val", TARGETS)[0]
    sample = ds[0]
    assert sample["image"].shape == (3, *crop)
    assert sample["semseg"].shape == crop and sample["depth"].shape == (1, *crop)
    assert sample["normals"].shape == (3, *crop) and sample["edge"].shape == (1, *crop)
    assert torch.equal(sample["semseg"][:H, :W], raw["semseg"])
    assert (sample["semseg"][H:] == 255).all() and (sample["depth"][:, :, W:] == 0).all()
    assert torch.equal(sample["normals"][:, :H, :W], raw["normals"])
    assert sample["meta"] == raw["meta"]
