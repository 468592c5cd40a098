"""Cityscapes' ``resize`` option: image bilinear, semseg and depth nearest with their values unchanged, the
resized size in ``meta``, bad values refused, and the option reaching the dataset from a config."""

from __future__ import annotations

import pytest
import torch
from test_cityscapes import IDS_A, SAMPLES, H, W, write_sample
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

import rcm_nddr.data  # noqa: F401 - registers the datasets
from rcm_nddr.config import load_config
from rcm_nddr.data.cityscapes import Cityscapes
from rcm_nddr.data.folder import DatasetError
from rcm_nddr.data.transforms import build_transforms
from rcm_nddr.engine.builders import build_dataset

assert (H, W) == (4, 6)  # the expected values below are for halving these


@pytest.fixture
def root(tmp_path):
    for seed, ((split, sample_id), label_ids) in enumerate(SAMPLES.items()):
        write_sample(tmp_path, split, sample_id, label_ids, seed)
    return tmp_path


@pytest.mark.parametrize("classes", [7, 19])
def test_halving_keeps_the_values_of_every_other_pixel(root, classes):
    raw = Cityscapes(root, "val", ["semseg", "depth"], classes=classes)
    small = Cityscapes(root, "val", ["semseg", "depth"], classes=classes, resize=[2, 3])
    for index in range(len(raw)):
        full, half = raw[index], small[index]
        assert half["image"].shape == (3, 2, 3) and half["semseg"].shape == (2, 3) and half["depth"].shape == (1, 2, 3)
        assert half["semseg"].dtype == torch.int64 and half["depth"].dtype == torch.float32
        # nearest at pixel centres: output pixel i reads input pixel 2 i + 1
        assert torch.equal(half["semseg"], full["semseg"][1::2, 1::2])
        assert torch.equal(half["depth"], full["depth"][:, 1::2, 1::2])  # metres, not rescaled
        expected = F.resize(full["image"], [2, 3], interpolation=InterpolationMode.BILINEAR, antialias=True)
        torch.testing.assert_close(half["image"], expected)
        assert half["meta"] == {"id": full["meta"]["id"], "size": (2, 3)}


def test_classes_and_ignore_are_never_blended(root):
    sample = Cityscapes(root, "val", ["semseg"], classes=19, resize=[2, 3])[1]  # IDS_A
    # rows 1, 3 and columns 1, 3, 5 of IDS_A: road, parking (ignored), building; traffic light, vegetation, sky
    assert IDS_A[1::2, 1::2].tolist() == [[7, 9, 11], [19, 21, 23]]
    assert sample["semseg"].tolist() == [[0, 255, 2], [6, 8, 10]]


def test_invalid_depth_stays_zero(root):
    raw = Cityscapes(root, "val", ["depth"])[0]["depth"]
    assert raw[0, 0, 1] == 0 and raw[0, 0, 3] > 0  # p = 1 (invalid) and p = 513 on row 0 of every disparity map
    big = Cityscapes(root, "val", ["depth"], resize=[H, 2 * W])[0]["depth"]
    assert (big[0, 0, 2:4] == 0).all() and (big[0, 0, 6:8] == raw[0, 0, 3]).all()


def test_upsizing_and_the_identity(root):
    same = Cityscapes(root, "val", ["semseg", "depth"], resize=(H, W))[0]
    raw = Cityscapes(root, "val", ["semseg", "depth"])[0]
    assert torch.equal(same["semseg"], raw["semseg"]) and torch.equal(same["depth"], raw["depth"])
    torch.testing.assert_close(same["image"], raw["image"])
    big = Cityscapes(root, "val", ["semseg"], resize=[2 * H, 2 * W])[0]
    assert torch.equal(big["semseg"], raw["semseg"].repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_resize_comes_before_the_joint_transforms(root):
    ds = Cityscapes(root, "val", ["semseg", "depth"], resize=[2, 3], transform=build_transforms(False, (4, 4)))
    sample = ds[0]
    assert sample["image"].shape == (3, 4, 4) and sample["meta"]["size"] == (2, 3)
    assert (sample["semseg"][2:] == 255).all() and (sample["depth"][:, :, 3:] == 0).all()


@pytest.mark.parametrize("resize", [[2], [2, 0], [2, 3.0], [True, 3], "2x3", 128, [2, 3, 4]])
def test_bad_resize_refused(root, resize):
    with pytest.raises(DatasetError, match=r"option 'resize' must be null or \[height, width\]"):
        Cityscapes(root, "val", ["semseg"], resize=resize)


def test_resize_from_a_config(root):
    cfg = load_config(
        None,
        [
            "tasks=[semseg, depth]",
            "dataset.name=cityscapes",
            f"dataset.root={root}",
            "dataset.options={classes: 7, resize: [2, 3]}",
        ],
    )
    ds = build_dataset(cfg, "val", train=False)
    assert ds.resize == (2, 3) and ds.num_classes == 7
    assert ds.load(0)["semseg"].shape == (2, 3)
