"""Cityscapes: id discovery, the 19-class and 7-category mappings, disparity -> depth, errors, transforms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import rcm_nddr.data  # noqa: F401 - registers the datasets
from rcm_nddr.data.cityscapes import CLASSES_7, CLASSES_19, DEFAULT_BASELINE, DEFAULT_FX, LABELS, Cityscapes
from rcm_nddr.data.folder import DatasetError
from rcm_nddr.data.transforms import build_transforms
from rcm_nddr.registry import DATASETS

H, W = 4, 6
# label ids of two samples: IDS_A holds 0..23 in reading order, IDS_B 24..33 and repeats
IDS_A = np.array(
    [
        [0, 1, 2, 3, 4, 5],  # void
        [6, 7, 8, 9, 10, 11],  # ground (void), road, sidewalk, parking, rail track, building
        [12, 13, 14, 15, 16, 17],  # wall, fence, guard rail, bridge, tunnel, pole
        [18, 19, 20, 21, 22, 23],  # polegroup, traffic light, traffic sign, vegetation, terrain, sky
    ],
    dtype=np.uint8,
)
IDS_B = np.array(
    [
        [24, 25, 26, 27, 28, 29],  # person, rider, car, truck, bus, caravan
        [30, 31, 32, 33, 0, 7],  # trailer, train, motorcycle, bicycle, unlabeled, road
        [9, 9, 9, 9, 9, 9],  # parking
        [23, 23, 23, 23, 23, 23],  # sky
    ],
    dtype=np.uint8,
)
X = 255
EXPECTED_19_A = [
    [X, X, X, X, X, X],
    [X, 0, 1, X, X, 2],
    [3, 4, X, X, X, 5],
    [X, 6, 7, 8, 9, 10],
]
EXPECTED_19_B = [
    [11, 12, 13, 14, 15, X],
    [X, 16, 17, 18, X, 0],
    [X, X, X, X, X, X],
    [10, 10, 10, 10, 10, 10],
]
# flat 0, construction 1, object 2, nature 3, sky 4, human 5, vehicle 6
EXPECTED_7_A = [
    [X, X, X, X, X, X],
    [X, 0, 0, 0, 0, 1],
    [1, 1, 1, 1, 1, 2],
    [2, 2, 2, 3, 3, 4],
]
EXPECTED_7_B = [
    [5, 5, 6, 6, 6, 6],
    [6, 6, 6, 6, X, 0],
    [0, 0, 0, 0, 0, 0],
    [4, 4, 4, 4, 4, 4],
]

# (split, id) -> (label ids, disparity) of the tiny dataset; the disparity of each sample is different
SAMPLES = {
    ("val", "frankfurt/frankfurt_000000_000294"): IDS_A,
    ("val", "frankfurt/frankfurt_000000_000576"): IDS_B,
    ("val", "aachen/aachen_000001_000019"): IDS_B,
    ("train", "bochum/bochum_000000_000313"): IDS_A,
}


def _disparity(seed: int) -> np.ndarray:
    raw = np.random.default_rng(seed).integers(2, 40000, (H, W)).astype(np.uint16)
    raw[0, 0], raw[0, 1], raw[0, 2], raw[0, 3] = 0, 1, 257, 513  # invalid, d = 0 (invalid), d = 1, d = 2
    return raw


def _path(root: Path, folder: str, split: str, sample_id: str, suffix: str) -> Path:
    path = root / folder / split / f"{sample_id}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_sample(root: Path, split: str, sample_id: str, label_ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """Image, labelIds and disparity of one sample in the official layout; returns the disparity."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(_path(root, "leftImg8bit", split, sample_id, "_leftImg8bit.png"))
    Image.fromarray(label_ids, "L").save(_path(root, "gtFine", split, sample_id, "_gtFine_labelIds.png"))
    # the files of the other annotation types in the release are ignored
    Image.fromarray(label_ids, "L").save(_path(root, "gtFine", split, sample_id, "_gtFine_instanceIds.png"))
    disparity = _disparity(seed)
    Image.fromarray(disparity).save(_path(root, "disparity", split, sample_id, "_disparity.png"))
    return disparity


def write_camera(root: Path, split: str, sample_id: str, baseline: float, fx: float) -> Path:
    path = _path(root, "camera", split, sample_id, "_camera.json")
    camera = {
        "extrinsic": {"baseline": baseline, "pitch": 0.038, "roll": 0.0, "x": 1.7, "y": 0.1, "yaw": -0.02, "z": 1.2},
        "intrinsic": {"fx": fx, "fy": fx + 2.0, "u0": 1096.98, "v0": 513.137},
    }
    path.write_text(json.dumps(camera))
    return path


@pytest.fixture
def root(tmp_path) -> Path:
    for seed, ((split, sample_id), label_ids) in enumerate(SAMPLES.items()):
        write_sample(tmp_path, split, sample_id, label_ids, seed)
    return tmp_path


def test_registered_and_info(root):
    assert DATASETS.get("cityscapes") is Cityscapes
    ds = Cityscapes(root, "val", ["semseg", "depth"])
    assert ds.info.name == "Cityscapes"
    assert ds.info.classes == {"semseg": list(CLASSES_19)}
    assert ds.info.extra == {"ignore_index": 255, "depth_unit": "m", "classes": 19}
    ds7 = Cityscapes(root, "val", ["semseg"], classes=7)
    assert ds7.info.classes["semseg"] == ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
    assert ds7.info.extra["classes"] == 7
    assert not (root / "meta.json").exists()


def test_label_table():
    assert [label.id for label in LABELS] == list(range(34))
    assert CLASSES_19 == (
        "road",
        "sidewalk",
        "building",
        "wall",
        "fence",
        "pole",
        "traffic light",
        "traffic sign",
        "vegetation",
        "terrain",
        "sky",
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "train",
        "motorcycle",
        "bicycle",
    )
    assert CLASSES_7 == ("flat", "construction", "object", "nature", "sky", "human", "vehicle")


def test_ids_discovered_and_sorted(root):
    ds = Cityscapes(root, "val", [])
    assert ds.ids == [
        "aachen/aachen_000001_000019",
        "frankfurt/frankfurt_000000_000294",
        "frankfurt/frankfurt_000000_000576",
    ]
    assert Cityscapes(root, "train", []).ids == ["bochum/bochum_000000_000313"]
    sample = ds[1]
    assert set(sample) == {"image", "meta"}
    assert sample["meta"] == {"id": "frankfurt/frankfurt_000000_000294", "size": (H, W)}
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, H, W)


def test_unknown_split_lists_the_splits(root):
    with pytest.raises(DatasetError, match=r"no split 'test'.*splits found: train, val") as err:
        Cityscapes(root, "test", ["semseg"])
    assert str(root / "leftImg8bit" / "test") in str(err.value)


@pytest.mark.parametrize(
    ("classes", "expected_a", "expected_b"),
    [(19, EXPECTED_19_A, EXPECTED_19_B), (7, EXPECTED_7_A, EXPECTED_7_B)],
)
def test_label_mapping(root, classes, expected_a, expected_b):
    ds = Cityscapes(root, "val", ["semseg"], classes=classes)
    semseg_a = ds[1]["semseg"]  # frankfurt_..._000294 holds IDS_A
    assert semseg_a.dtype == torch.int64 and semseg_a.shape == (H, W)
    assert torch.equal(semseg_a, torch.tensor(expected_a))
    assert torch.equal(ds[2]["semseg"], torch.tensor(expected_b))


def test_label_id_above_33_refused(root):
    sample_id = "frankfurt/frankfurt_000000_000294"
    path = root / "gtFine" / "val" / f"{sample_id}_gtFine_labelIds.png"
    label_ids = IDS_A.copy()
    label_ids[2, 3] = 34
    Image.fromarray(label_ids, "L").save(path)
    with pytest.raises(DatasetError, match=r"label ids \[34\] above 33") as err:
        Cityscapes(root, "val", ["semseg"])[1]
    assert str(path) in str(err.value)


def test_disparity_to_depth_default_camera(root):
    disparity = write_sample(root, "val", "aachen/aachen_000001_000019", IDS_B, seed=7)
    depth = Cityscapes(root, "val", ["depth"])[0]["depth"]
    assert depth.dtype == torch.float32 and depth.shape == (1, H, W)
    assert depth[0, 0, 0] == 0 and depth[0, 0, 1] == 0  # p = 0 and p = 1 (disparity 0) are invalid
    # p = 257: disparity 1 px, so depth = 0.209313 * 2262.52 m; p = 513: disparity 2 px
    torch.testing.assert_close(depth[0, 0, 2], torch.tensor(473.5748488, dtype=torch.float32))
    torch.testing.assert_close(depth[0, 0, 3], torch.tensor(473.5748488 / 2, dtype=torch.float32))
    assert (disparity > 255).sum() > H * W // 2  # the values need all 16 bits
    valid = disparity > 1
    expected = np.zeros((H, W))
    expected[valid] = DEFAULT_BASELINE * DEFAULT_FX * 256.0 / (disparity[valid].astype(np.float64) - 1.0)
    torch.testing.assert_close(depth[0][torch.from_numpy(valid)], torch.from_numpy(expected[valid]).float())
    assert (depth[0][torch.from_numpy(~valid)] == 0).all()


def test_disparity_to_depth_with_camera_file(root):
    sample_id = "aachen/aachen_000001_000019"
    write_sample(root, "val", sample_id, IDS_B, seed=7)
    write_camera(root, "val", sample_id, baseline=0.25, fx=2000.0)
    depth = Cityscapes(root, "val", ["depth"])[0]["depth"]
    assert depth[0, 0, 0] == 0 and depth[0, 0, 1] == 0
    assert depth[0, 0, 2] == pytest.approx(500.0)  # 0.25 m * 2000 px / 1 px
    assert depth[0, 0, 3] == pytest.approx(250.0)
    # another sample without a camera file keeps the defaults
    other = Cityscapes(root, "val", ["depth"])[1]["depth"]
    assert other[0, 0, 2] == pytest.approx(DEFAULT_BASELINE * DEFAULT_FX)


def test_malformed_camera_file_refused(root):
    sample_id = "aachen/aachen_000001_000019"
    path = write_camera(root, "val", sample_id, baseline=0.25, fx=2000.0)
    path.write_text(json.dumps({"intrinsic": {"fx": 2000.0}}))
    with pytest.raises(DatasetError, match="extrinsic") as err:
        Cityscapes(root, "val", ["depth"])[0]
    assert str(path) in str(err.value)


def test_8bit_disparity_refused(root):
    path = root / "disparity" / "val" / "aachen" / "aachen_000001_000019_disparity.png"
    Image.fromarray(np.ones((H, W), dtype=np.uint8), "L").save(path)
    with pytest.raises(DatasetError, match="image mode 'L'") as err:
        Cityscapes(root, "val", ["depth"])[0]
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("target", "folder", "suffix"),
    [("semseg", "gtFine", "_gtFine_labelIds.png"), ("depth", "disparity", "_disparity.png")],
)
def test_missing_requested_file_names_the_path(root, target, folder, suffix):
    path = root / folder / "val" / "aachen" / f"aachen_000001_000019{suffix}"
    path.unlink()
    ds = Cityscapes(root, "val", [target])
    with pytest.raises(DatasetError) as err:
        ds[0]
    message = str(err.value)
    assert f"missing {path}" in message
    assert f"expected {folder}/val/<id>{suffix}" in message
    ds[1]  # the other samples are complete


def test_unrequested_target_files_not_needed(root):
    for folder in ("gtFine", "disparity"):
        for path in (root / folder).rglob("*.png"):
            path.unlink()
    assert set(Cityscapes(root, "val", [])[0]) == {"image", "meta"}
    (root / "disparity").rename(root / "elsewhere")
    write_sample(root, "val", "aachen/aachen_000001_000019", IDS_A)
    sample = Cityscapes(root, "val", ["semseg"])[0]
    assert set(sample) == {"image", "semseg", "meta"}


@pytest.mark.parametrize("classes", [20, 0, "19", 19.0, True])
def test_bad_classes_option(root, classes):
    with pytest.raises(DatasetError, match=r"option 'classes' must be one of 7, 19"):
        Cityscapes(root, "val", ["semseg"], classes=classes)


def test_unknown_target(root):
    with pytest.raises(DatasetError, match=r"no target 'normals'.*semseg, depth"):
        Cityscapes(root, "val", ["semseg", "normals"])


def test_val_transforms_and_loader(root):
    crop = (H + 2, W + 4)
    ds = Cityscapes(root, "val", ["semseg", "depth"], transform=build_transforms(False, crop), classes=7)
    raw = Cityscapes(root, "val", ["semseg", "depth"], classes=7)[1]
    sample = ds[1]
    assert sample["image"].shape == (3, *crop)
    assert sample["semseg"].shape == crop and sample["depth"].shape == (1, *crop)
    assert torch.equal(sample["semseg"][:H, :W], raw["semseg"])
    assert (sample["semseg"][H:] == 255).all() and (sample["depth"][:, :, W:] == 0).all()
    assert torch.equal(sample["depth"][:, :H, :W], raw["depth"])

    batch = next(iter(DataLoader(ds, batch_size=2, shuffle=False)))
    assert batch["image"].shape == (2, 3, *crop)
    assert batch["semseg"].shape == (2, *crop) and batch["semseg"].dtype == torch.int64
    assert batch["depth"].shape == (2, 1, *crop) and batch["depth"].dtype == torch.float32
    assert batch["meta"]["id"] == ["aachen/aachen_000001_000019", "frankfurt/frankfurt_000000_000294"]
