"""The folder-layout dataset: decoding of every encoding, lazy reading, errors, seeded keys, collation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import rcm_nddr.data  # noqa: F401 - registers the datasets
from rcm_nddr.data.folder import IMAGENET_MEAN, IMAGENET_STD, DatasetError, MultiTaskFolder
from rcm_nddr.data.transforms import build_transforms
from rcm_nddr.registry import DATASETS

ALL_TARGETS = ("semseg", "parts", "depth", "normals", "edge", "sal")


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


def test_registered_as_synthetic():
    assert DATASETS.get("synthetic") is MultiTaskFolder


def test_info_from_meta(tiny_layout):
    ds = MultiTaskFolder(tiny_layout, "train", ["semseg"])
    meta = json.loads((tiny_layout / "meta.json").read_text())
    assert ds.info.name == "SYNTH_MT"
    assert ds.info.classes == meta["classes"]
    assert ds.info.extra["depth_unit"] == "m"
    assert len(ds) == 3
    assert len(MultiTaskFolder(tiny_layout, "val", ["semseg"])) == 2


def test_decodes_every_encoding(tiny_layout):
    ds = MultiTaskFolder(tiny_layout, "val", ALL_TARGETS)
    sample = ds[0]
    sid = "000003"  # the first val id
    h, w = 12, 16
    assert set(sample) == {"image", *ALL_TARGETS, "meta"}
    assert sample["meta"] == {"id": sid, "size": (h, w)}

    rgb = _png(tiny_layout / "images" / f"{sid}.png")
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, h, w)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(sample["image"] * std + mean, expected)

    for key, folder in (("semseg", "segmentation"), ("parts", "parts")):
        raw = torch.from_numpy(_png(tiny_layout / folder / f"{sid}.png").astype(np.int64))
        assert (raw == 0).any() and (raw > 0).any()
        assert sample[key].dtype == torch.int64 and sample[key].shape == (h, w)
        assert torch.equal(sample[key][raw == 0], torch.full_like(raw[raw == 0], 255))
        assert torch.equal(sample[key][raw > 0], raw[raw > 0] - 1)

    depth = np.load(tiny_layout / "depth" / f"{sid}.npy")
    assert sample["depth"].dtype == torch.float32 and sample["depth"].shape == (1, h, w)
    assert torch.equal(sample["depth"][0], torch.from_numpy(depth))

    normals = np.load(tiny_layout / "normals" / f"{sid}.npy")
    assert sample["normals"].dtype == torch.float32 and sample["normals"].shape == (3, h, w)
    assert torch.equal(sample["normals"], torch.from_numpy(normals).permute(2, 0, 1))

    edge = _png(tiny_layout / "edge" / f"{sid}.png")
    assert sample["edge"].dtype == torch.float32 and sample["edge"].shape == (1, h, w)
    assert torch.equal(sample["edge"][0], torch.from_numpy((edge == 255).astype(np.float32)))

    sal = _png(tiny_layout / "sal" / f"{sid}.png")
    assert sample["sal"].dtype == torch.float32 and sample["sal"].shape == (1, h, w)
    assert torch.equal(sample["sal"][0], torch.from_numpy((sal == 255).astype(np.float32)))


def test_saliency_threshold_at_128(tiny_layout):
    sal = np.tile(np.array([0, 1, 127, 128, 200, 255, 64, 129], np.uint8), (12, 2))
    Image.fromarray(sal, "L").save(tiny_layout / "sal" / "000000.png")
    out = MultiTaskFolder(tiny_layout, "train", ["sal"])[0]["sal"][0]
    assert torch.equal(out, torch.from_numpy((sal >= 128).astype(np.float32)))


def test_jpg_image_accepted(tiny_layout):
    png = tiny_layout / "images" / "000000.png"
    with Image.open(png) as im:
        im.save(png.with_suffix(".jpg"), quality=95)
    png.unlink()
    sample = MultiTaskFolder(tiny_layout, "train", ["semseg"])[0]
    assert sample["image"].shape == (3, 12, 16)


def test_only_requested_targets_are_read(tiny_layout):
    shutil.rmtree(tiny_layout / "depth")
    sample = MultiTaskFolder(tiny_layout, "train", ["semseg", "normals"])[0]
    assert set(sample) == {"image", "semseg", "normals", "meta"}
    with pytest.raises(DatasetError, match=r"depth[/\\]000000\.npy") as err:
        MultiTaskFolder(tiny_layout, "train", ["semseg", "depth"])[0]
    assert "float32 H x W metres" in str(err.value)


def test_unknown_target_lists_provided(tiny_layout):
    with pytest.raises(DatasetError, match="'albedo'") as err:
        MultiTaskFolder(tiny_layout, "train", ["semseg", "albedo"])
    for key in ALL_TARGETS:
        assert key in str(err.value)


def test_missing_root_meta_and_split_name_the_path(tmp_path, tiny_layout):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=str(missing)):
        MultiTaskFolder(missing, "train", ["semseg"])

    with pytest.raises(DatasetError, match=r"gt_sets[/\\]test\.txt") as err:
        MultiTaskFolder(tiny_layout, "test", ["semseg"])
    assert "train, val" in str(err.value)

    (tiny_layout / "gt_sets" / "val.txt").write_text("\n  \n")
    with pytest.raises(DatasetError, match=r"val\.txt lists no sample ids"):
        MultiTaskFolder(tiny_layout, "val", ["semseg"])

    (tiny_layout / "meta.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"meta\.json"):
        MultiTaskFolder(tiny_layout, "train", ["semseg"])
    (tiny_layout / "meta.json").unlink()
    with pytest.raises(DatasetError, match=r"missing .*meta\.json"):
        MultiTaskFolder(tiny_layout, "train", ["semseg"])


def test_meta_without_classes_for_a_class_target(tiny_layout):
    meta = json.loads((tiny_layout / "meta.json").read_text())
    del meta["classes"]["parts"]
    (tiny_layout / "meta.json").write_text(json.dumps(meta))
    MultiTaskFolder(tiny_layout, "train", ["semseg", "depth"])  # parts not asked for: fine
    with pytest.raises(DatasetError, match=r"meta\.json lists no classes for target 'parts'"):
        MultiTaskFolder(tiny_layout, "train", ["parts"])


def test_missing_image_names_both_extensions(tiny_layout):
    (tiny_layout / "images" / "000001.png").unlink()
    ds = MultiTaskFolder(tiny_layout, "train", [])
    with pytest.raises(DatasetError, match=r"000001\.png or .*000001\.jpg"):
        ds[1]


@pytest.mark.parametrize(
    "target, file, content, message",
    [
        ("depth", "depth/000000.npy", np.ones((12, 15), np.float32), r"size \(12, 15\) differs"),
        ("depth", "depth/000000.npy", np.ones((1, 12, 16), np.float32), r"shape \(1, 12, 16\)"),
        ("depth", "depth/000000.npy", np.ones((12, 16), np.int32), "dtype int32"),
        ("depth", "depth/000000.npy", np.full((12, 16), np.nan, np.float32), "NaN"),
        ("normals", "normals/000000.npy", np.ones((12, 16, 2), np.float32), r"shape \(12, 16, 2\)"),
        ("semseg", "segmentation/000000.png", np.zeros((12, 16, 3), np.uint8), "mode 'RGB'"),
        ("semseg", "segmentation/000000.png", np.full((12, 16), 5, np.uint8), "label 4 but .* 4 classes"),
        ("edge", "edge/000000.png", np.full((12, 16), 7, np.uint8), "only 0 and 255"),
        ("sal", "sal/000000.png", np.zeros((8, 16), np.uint8), r"size \(8, 16\) differs"),
    ],
)
def test_malformed_file_is_one_error_naming_it(tiny_layout, target, file, content, message):
    path = tiny_layout / file
    if path.suffix == ".npy":
        np.save(path, content)
    else:
        Image.fromarray(content).save(path)
    ds = MultiTaskFolder(tiny_layout, "train", [target])
    with pytest.raises(DatasetError, match=message) as err:
        ds[0]
    assert str(path) in str(err.value)
    assert f"expected {path.parent.name}/<id>" in str(err.value)


def test_corrupt_files_are_dataset_errors(tiny_layout):
    (tiny_layout / "segmentation" / "000000.png").write_bytes(b"not a png")
    (tiny_layout / "depth" / "000001.npy").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"segmentation[/\\]000000\.png"):
        MultiTaskFolder(tiny_layout, "train", ["semseg"])[0]
    with pytest.raises(DatasetError, match=r"depth[/\\]000001\.npy"):
        MultiTaskFolder(tiny_layout, "train", ["depth"])[1]


def test_index_range(tiny_layout):
    ds = MultiTaskFolder(tiny_layout, "train", [])
    assert ds[-1]["meta"]["id"] == "000002"
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(TypeError):
        ds[(0, 1, 2)]


def _assert_samples_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "meta":
            assert a[key] == b[key]
        else:
            assert torch.equal(a[key], b[key]), key


def _differ(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k != "meta")


def test_seeded_key_is_deterministic(tiny_layout):
    ds = MultiTaskFolder(tiny_layout, "train", ALL_TARGETS, transform=build_transforms(True, (8, 8)))
    first = ds[(1, 1234)]
    assert first["image"].shape == (3, 8, 8)
    _assert_samples_equal(first, ds[(1, 1234)])
    assert any(_differ(first, ds[(1, seed)]) for seed in range(1, 6))
    # a plain index draws from a generator seeded with the index
    _assert_samples_equal(ds[2], ds[(2, 2)])
    _assert_samples_equal(ds[2], ds[2])


def test_dataloader_collates_the_dict(tiny_layout):
    ds = MultiTaskFolder(tiny_layout, "train", ALL_TARGETS, transform=build_transforms(True, (8, 10)))
    seeded = [(0, 11), (2, 12), (1, 13)]
    batch = next(iter(DataLoader(ds, batch_size=3, sampler=seeded, num_workers=0)))
    assert batch["image"].shape == (3, 3, 8, 10)
    assert batch["semseg"].shape == (3, 8, 10) and batch["semseg"].dtype == torch.int64
    assert batch["depth"].shape == (3, 1, 8, 10)
    assert batch["normals"].shape == (3, 3, 8, 10)
    assert batch["edge"].shape == batch["sal"].shape == (3, 1, 8, 10)
    assert batch["meta"]["id"] == ["000000", "000002", "000001"]
    assert [s.tolist() for s in batch["meta"]["size"]] == [[12, 12, 12], [16, 16, 16]]
    for i, key in enumerate(seeded):
        assert torch.equal(batch["depth"][i], ds[key]["depth"])
