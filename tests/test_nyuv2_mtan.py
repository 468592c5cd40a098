"""NYUv2 as preprocessed by MTAN: the .npy layout, value mapping, numeric ids, errors, a tiny training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_run

import rcm_nddr.data  # noqa: F401 - registers the datasets
from rcm_nddr.config import ConfigError, check_paths, load_config
from rcm_nddr.data.folder import DatasetError
from rcm_nddr.data.nyuv2_mtan import NUM_CLASSES, NYUV2_13_CLASSES, NYUv2MTAN
from rcm_nddr.data.readers import IMAGENET_MEAN, IMAGENET_STD
from rcm_nddr.data.transforms import build_transforms
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.registry import DATASETS

H, W = 6, 8
TARGETS = ("semseg", "depth", "normals")
FOLDERS = {"image": "image", "semseg": "label", "depth": "depth", "normals": "normal"}


def _path(root: Path, split: str, key: str, sample_id: str) -> Path:
    folder = root / split / FOLDERS[key]
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{sample_id}.npy"


def write_sample(
    root: Path, split: str, sample_id: str, seed: int = 0, size: tuple[int, int] = (H, W), depth_channel: bool = True
) -> dict:
    """One sample in MTAN's layout and encoding; returns the expected decoded tensors."""
    h, w = size
    rng = np.random.default_rng(seed)
    image = rng.random((h, w, 3)).astype(np.float32)
    image[0, 0] = (0.0, 1.0, 0.5)  # the range's ends
    labels = rng.integers(-1, NUM_CLASSES, (h, w)).astype(np.float32)
    labels[0, :3] = (-1, 0, NUM_CLASSES - 1)  # ignore, first and last class
    depth = rng.uniform(0.5, 10.0, (h, w, 1)).astype(np.float32)
    depth[1, :3] = 0.0  # invalid
    normals = rng.normal(size=(h, w, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    normals[1, :2] = 0.0  # invalid
    normals[2, 0] = (0.3, 0.0, -0.4)  # shortened by resampling: rescaled to (0.6, 0, -0.8)
    np.save(_path(root, split, "image", sample_id), image)
    np.save(_path(root, split, "semseg", sample_id), labels)
    np.save(_path(root, split, "depth", sample_id), depth if depth_channel else depth[..., 0])
    np.save(_path(root, split, "normals", sample_id), normals)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    unit = normals.astype(np.float64)
    length = np.linalg.norm(unit, axis=-1, keepdims=True)
    unit = np.where(length > 0, unit / np.where(length > 0, length, 1.0), 0.0).astype(np.float32)
    raw = torch.from_numpy(labels.astype(np.int64))
    return {
        "image": (torch.from_numpy(image).permute(2, 0, 1) - mean) / std,
        "semseg": torch.where(raw == -1, 255, raw),
        "depth": torch.from_numpy(depth[..., 0])[None],
        "normals": torch.from_numpy(unit).permute(2, 0, 1),
    }


@pytest.fixture
def root(tmp_path) -> Path:
    for i, sid in enumerate(["0", "1", "2", "10"]):
        write_sample(tmp_path, "train", sid, seed=i)
    for i, sid in enumerate(["0", "1"]):
        write_sample(tmp_path, "val", sid, seed=10 + i)
    return tmp_path


def test_registered_and_info(root):
    assert DATASETS.get("nyuv2_mtan") is NYUv2MTAN
    ds = NYUv2MTAN(root, "val", ["semseg"])
    assert ds.info.name == "NYUv2-MTAN"
    assert ds.info.classes["semseg"] == list(NYUV2_13_CLASSES)
    assert NYUV2_13_CLASSES == (
        "bed",
        "books",
        "ceiling",
        "chair",
        "floor",
        "furniture",
        "objects",
        "picture",
        "sofa",
        "table",
        "tv",
        "wall",
        "window",
    )
    assert ds.info.extra == {"ignore_index": 255, "depth_unit": "m"}
    assert not (root / "meta.json").exists()


@pytest.mark.parametrize("depth_channel", [True, False])
def test_values_are_mapped_exactly(tmp_path, depth_channel):
    expected = write_sample(tmp_path, "val", "0", seed=3, depth_channel=depth_channel)
    sample = NYUv2MTAN(tmp_path, "val", TARGETS)[0]
    assert set(sample) == {"image", *TARGETS, "meta"}
    assert sample["meta"] == {"id": "0", "size": (H, W)}
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, H, W)
    torch.testing.assert_close(sample["image"], expected["image"], rtol=0, atol=1e-6)
    assert sample["semseg"].dtype == torch.int64 and sample["semseg"].shape == (H, W)
    assert torch.equal(sample["semseg"], expected["semseg"])
    assert sample["semseg"][0, :3].tolist() == [255, 0, NUM_CLASSES - 1]
    assert sample["depth"].dtype == torch.float32 and sample["depth"].shape == (1, H, W)
    assert torch.equal(sample["depth"], expected["depth"])  # metres, unchanged
    assert (sample["depth"][0, 1, :3] == 0).all()
    normals = sample["normals"]
    assert normals.dtype == torch.float32 and normals.shape == (3, H, W)
    torch.testing.assert_close(normals, expected["normals"], rtol=0, atol=1e-6)
    assert (normals[:, 1, :2] == 0).all()  # invalid stays exactly zero
    torch.testing.assert_close(normals[:, 2, 0], torch.tensor([0.6, 0.0, -0.8]))
    lengths = normals.norm(dim=0)
    valid = lengths > 0
    assert valid.sum() == H * W - 2
    torch.testing.assert_close(lengths[valid], torch.ones_like(lengths[valid]))


def test_ids_sorted_numerically_and_splits(root):
    train = NYUv2MTAN(root, "train", ["semseg"])
    assert train.ids == ["0", "1", "2", "10"] and len(train) == 4
    assert train[3]["meta"]["id"] == "10"
    assert NYUv2MTAN(root, "val", []).ids == ["0", "1"]


def test_only_requested_targets_are_read(root):
    for key in ("depth", "normals"):
        _path(root, "val", key, "0").unlink()
    sample = NYUv2MTAN(root, "val", ["semseg"])[0]
    assert set(sample) == {"image", "semseg", "meta"}


def test_unknown_split_lists_the_splits(root):
    with pytest.raises(DatasetError, match=r"no split 'test'.*splits found: train, val") as err:
        NYUv2MTAN(root, "test", ["semseg"])
    message = str(err.value)
    assert str(root / "test" / "image") in message and "<split>/{image,label,depth,normal}/<i>.npy" in message


def test_missing_root_says_how_to_get_the_data(tmp_path):
    with pytest.raises(DatasetError, match="lorenmt/mtan") as err:
        NYUv2MTAN(tmp_path / "absent", "train", ["semseg"])
    assert str(tmp_path / "absent") in str(err.value)
    cfg = load_config(None, ["tasks=[semseg]", "dataset.name=nyuv2_mtan", f"dataset.root={tmp_path / 'absent'}"])
    with pytest.raises(ConfigError, match=r"key 'dataset.root'.*nyuv2.zip"):
        check_paths(cfg)


def test_missing_file_names_the_path_and_layout(root):
    path = _path(root, "val", "depth", "1")
    path.unlink()
    ds = NYUv2MTAN(root, "val", ["depth"])
    ds[0]  # the other samples are complete
    with pytest.raises(DatasetError) as err:
        ds[1]
    message = str(err.value)
    assert f"missing {path}" in message and "expected val/depth/<id>.npy: float H x W x 1 metres" in message


@pytest.mark.parametrize("name", ["foo.npy", "1a.npy", "-1.npy"])
def test_image_file_without_an_integer_id_refused(root, name):
    np.save(root / "val" / "image" / name, np.zeros((H, W, 3), dtype=np.float32))
    with pytest.raises(DatasetError, match="non-negative integer") as err:
        NYUv2MTAN(root, "val", ["semseg"])
    assert name in str(err.value) and str(root / "val" / "image") in str(err.value)


def test_empty_split_refused(tmp_path):
    (tmp_path / "val" / "image").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images in"):
        NYUv2MTAN(tmp_path, "val", [])


BAD_FILES = [
    ("image", np.zeros((H, W), np.float32), r"shape \(6, 8\), expected H x W x 3"),
    ("image", np.zeros((H, W, 3), np.uint8), "dtype uint8, expected float"),
    ("image", np.full((H, W, 3), 200.0, np.float32), r"values from 200 to 200, expected RGB in \[0, 1\]"),
    ("semseg", np.full((H, W), 0.5, np.float32), "non-integer"),
    ("semseg", np.full((H, W), NUM_CLASSES, np.float32), r"label values \[13\] outside -1..12"),
    ("semseg", np.full((H, W), -2, np.int64), r"label values \[-2\] outside -1..12"),
    ("semseg", np.zeros((H, W, 1), np.float32), r"shape \(6, 8, 1\), expected H x W"),
    ("semseg", np.zeros((H + 1, W), np.float32), r"size \(7, 8\) differs from the image's \(6, 8\)"),
    ("depth", np.full((H, W, 1), -1.0, np.float32), "negative depth"),
    ("depth", np.zeros((H, W, 2), np.float32), r"shape \(6, 8, 2\), expected H x W x 1 or H x W"),
    ("depth", np.full((H, W, 1), np.nan, np.float32), "NaN or infinite"),
    ("normals", np.zeros((H, W, 2), np.float32), r"shape \(6, 8, 2\), expected H x W x 3"),
    ("normals", np.full((H, W, 3), 128.0, np.float32), r"components up to 128.*\[-1, 1\]"),
]


@pytest.mark.parametrize(("key", "array", "message"), BAD_FILES)
def test_malformed_file_refused_naming_it(root, key, array, message):
    path = _path(root, "val", key, "1")
    np.save(path, array)
    ds = NYUv2MTAN(root, "val", TARGETS)
    ds[0]
    with pytest.raises(DatasetError, match=message) as err:
        ds[1]
    assert f"bad file {path}" in str(err.value)


def test_pickled_object_array_refused(root):
    path = _path(root, "val", "depth", "1")
    np.save(path, np.array([{"depth": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError) as err:
        NYUv2MTAN(root, "val", ["depth"])[1]
    assert f"bad file {path}" in str(err.value)


def test_unknown_target(root):
    with pytest.raises(DatasetError, match=r"no target 'edge'.*semseg, depth, normals"):
        NYUv2MTAN(root, "val", ["semseg", "edge"])


def test_val_transforms_pad_with_each_keys_value(root):
    crop = (H + 2, W + 4)
    ds = NYUv2MTAN(root, "val", TARGETS, transform=build_transforms(train=False, crop=crop))
    raw = NYUv2MTAN(root, "val", TARGETS)[1]
    sample = ds[1]
    assert sample["image"].shape == (3, *crop) and sample["normals"].shape == (3, *crop)
    assert torch.equal(sample["semseg"][:H, :W], raw["semseg"]) and (sample["semseg"][H:] == 255).all()
    assert (sample["depth"][:, :, W:] == 0).all() and (sample["normals"][:, H:] == 0).all()


def test_a_tiny_multi_task_run_trains_and_validates(tmp_path):
    data = tmp_path / "nyuv2"
    for i in range(4):
        write_sample(data, "train", str(i), seed=i, size=(24, 32))
    for i in range(2):
        write_sample(data, "val", str(i), seed=10 + i, size=(24, 32))
    overrides = tiny_run(
        tmp_path / "store",
        data,
        "[semseg, depth, normals]",
        "dataset.name=nyuv2_mtan",
        "dataset.crop=[16, 16]",
        "dataset.scales=[1.0]",
        "train.max_iters=2",
        "train.val_every=2",
        "test.batch_size=2",
    )
    cfg = load_config(None, overrides)
    metrics = Trainer(cfg, progress=False).fit()
    assert set(metrics) == {"semseg", "depth", "normals"}
    assert 0 <= metrics["semseg"]["mIoU"] <= 100
    run = tmp_path / "store" / "runs" / "semseg+depth+normals"
    assert json.loads((run / "metrics.json").read_text())["iteration"] == 2
