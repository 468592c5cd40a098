"""PASCAL-MT: the five targets of the ASTMT release (semseg, human_parts, distilled normals and saliency,
edges from the PASCAL-Context label map), the person-only split for human_parts, errors, transforms,
and the human_parts task."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from skimage.morphology import thin
from torch.utils.data import DataLoader

from rcm_nddr import tasks  # noqa: F401 - registers the built-in task types
from rcm_nddr.data.folder import DatasetError
from rcm_nddr.data.pascal import (
    HUMAN_PART_CLASSES,
    PASCAL_CLASSES,
    PascalMT,
    decode_label_map,
    label_map_edges,
)
from rcm_nddr.data.transforms import build_transforms
from rcm_nddr.registry import DATASETS, TASKS

H, W = 6, 8
TARGETS = ("semseg", "human_parts", "normals", "sal", "edge")
# LabelMap indices of the toy context classes; the normals keep wall, floor (NYU classes) and tvmonitor
CONTEXT = {"background": 0, "wall": 3, "floor": 4, "unknown": 5, "tvmonitor": 7, "cat": 8}
NYU = ["wall", "floor", "unknown", "bed"]
NORMALS_CLASSES = {3, 4, 7}


# ---------------------------------------------------------------------------------------------------
# writers of a tiny dataset in the ASTMT PASCAL-MT layout


def _write(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_image(root: Path, sid: str, rng: np.random.Generator, size: tuple[int, int] = (H, W)) -> None:
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(_write(root / "JPEGImages" / f"{sid}.jpg"))


def write_split(root: Path, ids: list[str], split: str = "val") -> None:
    _write(root / "ImageSets" / "Context" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


def write_json_classes(root: Path, nyu: object = NYU, context: object = CONTEXT) -> None:
    _write(root / "json" / "nyu_classes.json").write_text(json.dumps(nyu))
    _write(root / "json" / "context_classes.json").write_text(json.dumps(context))


def write_parts_mat(path: Path, objects: list[tuple[int, np.ndarray, list[tuple[str, np.ndarray]]]]) -> None:
    """A PASCAL-Part annotation: ``anno`` = struct(imname, objects(class, class_ind, mask, parts(part_name, mask)))."""
    part_dtype = [("part_name", "O"), ("mask", "O")]
    object_dtype = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    records = np.zeros((1, len(objects)), dtype=object_dtype)
    for i, (class_ind, mask, parts) in enumerate(objects):
        part_records: np.ndarray = np.zeros((0, 0))  # how MATLAB stores an object without parts
        if parts:
            part_records = np.zeros((1, len(parts)), dtype=part_dtype)
            for j, (name, part_mask) in enumerate(parts):
                part_records[0, j] = (name, part_mask.astype(np.uint8))
        name = PASCAL_CLASSES[class_ind]
        records[0, i] = (name, np.array([[class_ind]], dtype=np.uint8), mask.astype(np.uint8), part_records)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = (path.stem, records)
    scipy.io.savemat(_write(path), {"anno": anno})


def _box(top: int, left: int, bottom: int, right: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def person_objects() -> tuple[list, np.ndarray]:
    """Two persons (the second with an overlapping part) and a cat with a part; the expected target."""
    first = (
        15,
        _box(0, 0, 4, 4),
        [
            ("hair", _box(0, 0, 1, 3)),
            ("nose", _box(1, 1, 2, 2)),
            ("luarm", _box(2, 0, 4, 2)),
            ("llarm", _box(3, 0, 4, 1)),
        ],
    )
    cat = (8, _box(0, 5, 2, 8), [("tail", _box(0, 6, 1, 8))])  # not a person: its parts are ignored
    second = (
        15,
        _box(1, 2, 6, 8),
        [
            ("neck", _box(1, 2, 2, 4)),
            ("ruleg", _box(4, 4, 6, 6)),
            ("rfoot", _box(5, 5, 6, 7)),
            ("rhand", _box(2, 6, 3, 7)),
        ],
    )
    no_parts = (15, _box(5, 0, 6, 2), [])
    expected = np.zeros((H, W), dtype=np.int64)
    expected[0, 0:3] = 1  # hair -> head
    expected[1, 1] = 1  # nose -> head
    expected[2:4, 0:2] = 3  # luarm -> upper_arm
    expected[3, 0] = 4  # llarm -> lower_arm, painted over luarm
    expected[1, 2:4] = 2  # neck -> torso
    expected[4:6, 4:6] = 5  # ruleg -> upper_leg
    expected[5, 5:7] = 6  # rfoot -> lower_leg, painted over ruleg
    expected[2, 6] = 4  # rhand -> lower_arm
    return [first, cat, second, no_parts], expected


def write_sample(root: Path, sid: str, seed: int = 0, person: bool = True) -> dict:
    """One sample with all five targets; returns the expected decoded tensors."""
    rng = np.random.default_rng(seed)
    write_image(root, sid, rng)
    semseg = rng.integers(0, 21, (H, W), dtype=np.uint8)
    semseg[0, :3] = (0, 20, 255)
    Image.fromarray(semseg, "L").save(_write(root / "semseg" / "pascal-context" / f"{sid}.png"))
    if person:
        objects, parts = person_objects()
    else:
        objects, parts = [(8, _box(0, 0, 3, 3), [("head", _box(0, 0, 1, 1))])], np.full((H, W), 255, dtype=np.int64)
    write_parts_mat(root / "human_parts" / f"{sid}.mat", objects)
    encoded = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(encoded, "RGB").save(_write(root / "normals_distill" / f"{sid}.png"))
    grey = rng.integers(0, 256, (H, W), dtype=np.uint8)
    grey[0, :4] = (0, 127, 128, 255)
    Image.fromarray(grey, "L").save(_write(root / "sal_distill" / f"{sid}.png"))
    label_map = rng.choice(list(CONTEXT.values()), (H, W)).astype(np.uint16)
    label_map[:, :2] = 3  # a region, so that the thinning has something to keep
    scipy.io.savemat(_write(root / "pascal-context" / "trainval" / f"{sid}.mat"), {"LabelMap": label_map})
    write_json_classes(root)
    normals = encoded.astype(np.float64) * 2 / 255 - 1
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    normals[~np.isin(label_map, list(NORMALS_CLASSES))] = 0.0
    return {
        "semseg": torch.from_numpy(semseg.astype(np.int64)),
        "human_parts": torch.from_numpy(parts),
        "normals": torch.from_numpy(normals.transpose(2, 0, 1).astype(np.float32)),
        "sal": torch.from_numpy(grey > 127.5).float()[None],
        "edge": torch.from_numpy(reference_edges(label_map)).float()[None],
    }


def reference_edges(labels: np.ndarray) -> np.ndarray:
    """An independent four-neighbour Laplacian: numpy's "reflect" padding is OpenCV's reflect 101."""
    padded = np.pad(labels.astype(np.float64), 1, mode="reflect")
    lap = np.zeros(labels.shape)
    for i in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            pi, pj = i + 1, j + 1
            neighbours = padded[pi - 1, pj] + padded[pi + 1, pj] + padded[pi, pj - 1] + padded[pi, pj + 1]
            lap[i, j] = neighbours - 4 * padded[pi, pj]
    return thin(lap != 0)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# ---------------------------------------------------------------------------------------------------
# info and the full sample


def test_registered_and_info(tmp_path):
    assert DATASETS.get("pascal") is PascalMT
    write_sample(tmp_path, "a")
    write_split(tmp_path, ["a"])
    ds = PascalMT(tmp_path, "val", ["semseg"])
    assert ds.info.name == "PASCAL-MT"
    assert ds.info.classes["semseg"][:2] == ["background", "aeroplane"]
    assert ds.info.classes["semseg"][15] == "person" and ds.info.classes["semseg"][20] == "tvmonitor"
    assert len(ds.info.classes["semseg"]) == 21
    assert ds.info.classes["human_parts"] == [
        "background",
        "head",
        "torso",
        "upper_arm",
        "lower_arm",
        "upper_leg",
        "lower_leg",
    ]
    assert list(HUMAN_PART_CLASSES) == ds.info.classes["human_parts"]
    assert ds.info.extra["edge_max_dist"] == 0.0075 and ds.info.extra["ignore_index"] == 255
    assert not (tmp_path / "meta.json").exists()


def test_all_targets(tmp_path):
    expected = write_sample(tmp_path, "a", seed=1)
    write_split(tmp_path, ["a"])
    sample = PascalMT(tmp_path, "val", TARGETS)[0]
    assert set(sample) == {"image", *TARGETS, "meta"}
    assert sample["meta"] == {"id": "a", "size": (H, W)}
    assert sample["image"].shape == (3, H, W)
    for key in ("semseg", "human_parts"):
        assert sample[key].dtype == torch.int64 and sample[key].shape == (H, W)
        assert torch.equal(sample[key], expected[key]), key
    for key, channels in (("normals", 3), ("sal", 1), ("edge", 1)):
        assert sample[key].dtype == torch.float32 and sample[key].shape == (channels, H, W)
    torch.testing.assert_close(sample["normals"], expected["normals"], rtol=0, atol=1e-6)
    assert torch.equal(sample["sal"], expected["sal"])
    assert torch.equal(sample["edge"], expected["edge"])


# ---------------------------------------------------------------------------------------------------
# semseg


def test_semseg_identity_and_ignore(tmp_path):
    expected = write_sample(tmp_path, "a")
    write_split(tmp_path, ["a"])
    semseg = PascalMT(tmp_path, "val", ["semseg"])[0]["semseg"]
    assert torch.equal(semseg, expected["semseg"])
    assert semseg[0, :3].tolist() == [0, 20, 255]


@pytest.mark.parametrize("value", [21, 254])
def test_semseg_bad_value(tmp_path, value):
    write_sample(tmp_path, "a")
    write_split(tmp_path, ["a"])
    path = tmp_path / "semseg" / "pascal-context" / "a.png"
    labels = np.zeros((H, W), dtype=np.uint8)
    labels[1, 1] = value
    Image.fromarray(labels, "L").save(path)
    with pytest.raises(DatasetError, match=rf"\[{value}\] outside 0..20") as err:
        PascalMT(tmp_path, "val", ["semseg"])[0]
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------------
# human parts


def test_parts_mat_has_the_release_layout(tmp_path):
    objects, _ = person_objects()
    path = tmp_path / "p.mat"
    write_parts_mat(path, objects)
    loaded = scipy.io.loadmat(path)["anno"][0][0][1][0]
    assert len(loaded) == 4
    assert [int(o[1][0][0]) for o in loaded] == [15, 8, 15, 15]
    assert loaded[0][2].shape == (H, W)
    assert [str(p[0][0]) for p in loaded[0][3][0]] == ["hair", "nose", "luarm", "llarm"]
    assert np.array_equal(loaded[0][3][0][2][1].astype(bool), _box(2, 0, 4, 2))
    assert len(loaded[3][3]) == 0


def test_human_parts_mapping_and_overwrite_order(tmp_path):
    expected = write_sample(tmp_path, "a")
    write_split(tmp_path, ["a"])
    parts = PascalMT(tmp_path, "val", ["human_parts"])[0]["human_parts"]
    assert torch.equal(parts, expected["human_parts"])
    assert parts[3, 0] == 4 and parts[3, 1] == 3  # llarm painted over luarm
    assert parts[5, 5] == 6 and parts[5, 4] == 5  # rfoot painted over ruleg
    assert parts[0, 6] == 0  # the cat's part is not a person part
    assert set(parts.unique().tolist()) == set(range(7))


def test_each_part_name_maps_to_its_class(tmp_path):
    groups = {
        1: ["hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye"],
        2: ["neck", "torso"],
        3: ["luarm", "ruarm"],
        4: ["lhand", "llarm", "rhand", "rlarm"],
        5: ["luleg", "ruleg"],
        6: ["lfoot", "llleg", "rfoot", "rlleg"],
    }
    names = [(label, name) for label, group in groups.items() for name in group]
    size = (1, len(names) + 1)
    parts = []
    for column, (_, name) in enumerate(names):
        parts.append((name, _box(0, column, 1, column + 1, size)))
    rng = np.random.default_rng(0)
    write_image(tmp_path, "a", rng, size)
    write_parts_mat(tmp_path / "human_parts" / "a.mat", [(15, np.ones(size, dtype=bool), parts)])
    write_split(tmp_path, ["a"])
    target = PascalMT(tmp_path, "val", ["human_parts"])[0]["human_parts"]
    assert target[0].tolist() == [label for label, _ in names] + [0]


def test_image_without_person_is_ignored(tmp_path):
    write_sample(tmp_path, "a", person=False)
    write_split(tmp_path, ["a"])
    sample = PascalMT(tmp_path, "val", ["human_parts", "semseg"])[0]
    assert (sample["human_parts"] == 255).all() and sample["human_parts"].shape == (H, W)


def test_image_without_any_object_is_ignored(tmp_path):
    write_sample(tmp_path, "a")
    write_parts_mat(tmp_path / "human_parts" / "a.mat", [])
    write_split(tmp_path, ["a"])
    parts = PascalMT(tmp_path, "val", ["human_parts", "semseg"])[0]["human_parts"]
    assert (parts == 255).all() and parts.shape == (H, W)


def _three_images(root: Path) -> None:
    write_sample(root, "with", seed=1)
    write_sample(root, "without", seed=2, person=False)
    write_sample(root, "also", seed=3)
    write_split(root, ["with", "without", "also"])


def test_human_parts_only_drops_images_without_person_by_scanning(tmp_path, caplog):
    _three_images(tmp_path)
    before = _files(tmp_path)
    with caplog.at_level("INFO", logger="rcm_nddr.data.pascal"):
        ds = PascalMT(tmp_path, "val", ["human_parts"])
    assert ds.ids == ["with", "also"]
    assert "2 of 3 images have a person" in caplog.text
    assert _files(tmp_path) == before  # nothing written into the dataset root
    assert not (ds[1]["human_parts"] == 255).any()


def test_human_parts_only_uses_the_parts_cache(tmp_path):
    _three_images(tmp_path)
    cache = {"with": [15, 8], "without": [8], "also": [12]}  # the cache, not the files, is believed
    _write(tmp_path / "ImageSets" / "Parts" / "val.txt").write_text(json.dumps(cache))
    (tmp_path / "human_parts" / "without.mat").unlink()  # not read: the cache covers the split
    assert PascalMT(tmp_path, "val", ["human_parts"]).ids == ["with"]


def test_incomplete_parts_cache_falls_back_to_scanning(tmp_path):
    _three_images(tmp_path)
    _write(tmp_path / "ImageSets" / "Parts" / "val.txt").write_text(json.dumps({"with": [8], "without": [8]}))
    assert PascalMT(tmp_path, "val", ["human_parts"]).ids == ["with", "also"]


@pytest.mark.parametrize("text", ["{not json", "[15, 8]", '{"with": [15, "person"]}', '{"with": 15}'])
def test_malformed_parts_cache(tmp_path, text):
    _three_images(tmp_path)
    path = _write(tmp_path / "ImageSets" / "Parts" / "val.txt")
    path.write_text(text)
    with pytest.raises(DatasetError) as err:
        PascalMT(tmp_path, "val", ["human_parts"])
    assert str(path) in str(err.value)


def test_images_without_person_kept_with_another_target(tmp_path):
    _three_images(tmp_path)
    ds = PascalMT(tmp_path, "val", ["human_parts", "sal"])
    assert ds.ids == ["with", "without", "also"]
    assert (ds[1]["human_parts"] == 255).all()
    assert PascalMT(tmp_path, "val", ["semseg"]).ids == ["with", "without", "also"]


def test_no_person_in_split_is_an_error(tmp_path):
    write_sample(tmp_path, "without", person=False)
    write_split(tmp_path, ["without"])
    with pytest.raises(DatasetError, match="no image of split 'val'.*has a person"):
        PascalMT(tmp_path, "val", ["human_parts"])


def test_unknown_part_name(tmp_path):
    write_sample(tmp_path, "a")
    write_split(tmp_path, ["a"])
    path = tmp_path / "human_parts" / "a.mat"
    write_parts_mat(path, [(15, np.ones((H, W), dtype=bool), [("head", _box(0, 0, 1, 1)), ("tail", _box(1, 1, 2, 2))])])
    with pytest.raises(DatasetError, match="unknown person part name 'tail'") as err:
        PascalMT(tmp_path, "val", ["human_parts", "semseg"])[0]
    assert str(path) in str(err.value)


def test_part_mask_of_another_size(tmp_path):
    write_sample(tmp_path, "a")
    write_split(tmp_path, ["a"])
    path = tmp_path / "human_parts" / "a.mat"
    write_parts_mat(path, [(15, np.ones((H, W), dtype=bool), [("head", np.ones((H, W + 1), dtype=bool))])])
    with pytest.raises(DatasetError, match=r"mask of part 'head' of object 0 of shape \(6, 9\), expected 6 x 8") as err:
        PascalMT(tmp_path, "val", ["human_parts"])[0]
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------------
# normals


def _normals_case(root: Path, encoded: np.ndarray, label_map: np.ndarray) -> None:
    write_sample(root, "a")
    write_split(root, ["a"])
    Image.fromarray(encoded, "RGB").save(root / "normals_distill" / "a.png")
    scipy.io.savemat(root / "pascal-context" / "trainval" / "a.mat", {"LabelMap": label_map})


@pytest.mark.parametrize("nyu", [NYU, dict.fromkeys(NYU, 1)])
def test_normals_decoding_and_masking(tmp_path, nyu):
    encoded = np.full((H, W, 3), 128, dtype=np.uint8)
    encoded[0, 0] = (255, 0, 128)
    encoded[0, 1] = (0, 255, 255)
    encoded[0, 2] = (64, 200, 10)
    label_map = np.zeros((H, W), dtype=np.uint16)  # background: no normals
    label_map[0, :3] = (3, 4, 7)  # wall, floor (NYU classes), tvmonitor (added)
    label_map[0, 3] = 5  # 'unknown' is both an NYU and a context class, but excluded
    label_map[0, 4] = 8  # cat: not an NYU class
    label_map[1, :] = 3
    _normals_case(tmp_path, encoded, label_map)
    write_json_classes(tmp_path, nyu=nyu)
    ds = PascalMT(tmp_path, "val", ["normals"])
    assert ds.normals_classes == NORMALS_CLASSES
    normals = ds[0]["normals"]
    decoded = encoded.astype(np.float64) * 2 / 255 - 1
    expected = decoded / np.linalg.norm(decoded, axis=-1, keepdims=True)
    expected[label_map == 0] = 0
    expected[0, 3:] = 0
    torch.testing.assert_close(normals, torch.from_numpy(expected.transpose(2, 0, 1)).float(), rtol=0, atol=1e-6)
    # by hand: (255, 0, 128) -> (1, -1, 1/255) -> divided by its length
    length = np.sqrt(2 + (1 / 255) ** 2)
    torch.testing.assert_close(
        normals[:, 0, 0], torch.tensor([1 / length, -1 / length, 1 / 255 / length], dtype=torch.float32)
    )
    norms = normals.norm(dim=0)
    torch.testing.assert_close(norms[norms > 0], torch.ones(int((norms > 0).sum())))
    assert (norms > 0).sum() == 3 + W
    assert (normals[:, 0, 3:] == 0).all() and (normals[:, 2:] == 0).all()


@pytest.mark.parametrize(
    ("which", "text"),
    [
        ("nyu_classes.json", None),
        ("nyu_classes.json", "{oops"),
        ("nyu_classes.json", '"wall"'),
        ("nyu_classes.json", "[1, 2]"),
        ("context_classes.json", None),
        ("context_classes.json", "{oops"),
        ("context_classes.json", '["wall", "tvmonitor"]'),
        ("context_classes.json", '{"wall": "3", "tvmonitor": 7}'),
    ],
)
def test_normals_json_errors(tmp_path, which, text):
    write_sample(tmp_path, "a")
    write_split(tmp_path, ["a"])
    path = tmp_path / "json" / which
    if text is None:
        path.unlink()
    else:
        path.write_text(text)
    with pytest.raises(DatasetError) as err:
        PascalMT(tmp_path, "val", ["normals"])
    assert str(path) in str(err.value)
    PascalMT(tmp_path, "val", ["semseg", "edge", "sal"])[0]  # the json files only matter for normals


def test_context_classes_without_tvmonitor(tmp_path):
    write_sample(tmp_path, "a")
    write_split(tmp_path, ["a"])
    write_json_classes(tmp_path, context={"wall": 3})
    with pytest.raises(DatasetError, match="no class 'tvmonitor'"):
        PascalMT(tmp_path, "val", ["normals"])


# ---------------------------------------------------------------------------------------------------
# saliency


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_saliency_threshold(tmp_path, mode):
    write_sample(tmp_path, "a")
    write_split(tmp_path, ["a"])
    grey = np.zeros((H, W), dtype=np.uint8)
    grey[0, :4] = (0, 127, 128, 255)
    image = Image.fromarray(grey, "L")
    (image.convert("RGB") if mode == "RGB" else image).save(tmp_path / "sal_distill" / "a.png")
    sal = PascalMT(tmp_path, "val", ["sal"])[0]["sal"]
    assert sal.dtype == torch.float32 and sal.shape == (1, H, W)
    assert sal[0, 0, :4].tolist() == [0, 0, 1, 1]
    assert sal.sum() == 2


# ---------------------------------------------------------------------------------------------------
# edges


def test_edges_of_two_regions():
    labels = np.ones((H, W), dtype=np.int64)
    labels[:, 4:] = 5
    raw = np.zeros((H, W), dtype=bool)
    raw[:, 3:5] = True  # the boundary pixels on both sides
    expected = np.zeros((H, W), dtype=bool)
    expected[1:, 3] = True  # thinned to one pixel wide (the thinning shortens the end at the border)
    assert np.array_equal(thin(raw), expected)
    assert np.array_equal(label_map_edges(labels), expected)
    assert np.array_equal(label_map_edges(torch.from_numpy(labels)), expected)


def test_edges_match_an_independent_laplacian():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 4, (H, W))
        labels[rng.random((H, W)) < 0.5] = 0
        assert np.array_equal(label_map_edges(labels), reference_edges(labels))


def test_edges_border_is_reflect_101():
    assert not label_map_edges(np.full((H, W), 7)).any()  # zero padding would make a frame of edges
    # a label change touching the border: column 0 differs from the rest
    labels = np.zeros((H, W), dtype=np.int64)
    labels[:, 0] = 2
    edges = label_map_edges(labels)
    assert edges[:, :2].any() and not edges[:, 2:].any()
    # at (2, 0) the neighbour beyond the border is (2, 1) (reflect 101): 2 * 1 + 3 + 3 - 4 * 2 = 0,
    # so the pixel is not an edge (a symmetric border, (2, 0) itself, would give -1)
    labels = np.full((H, W), 3, dtype=np.int64)
    labels[2, 0], labels[2, 1] = 2, 1
    edges = label_map_edges(labels)
    assert not edges[2, 0] and edges.any()


def test_edges_cancelling_differences_are_not_edges():
    labels = np.full((H, W), 2, dtype=np.int64)
    labels[2, 2], labels[2, 4] = 1, 3  # (2, 3): 1 + 3 + 2 + 2 - 4 * 2 = 0
    raw = np.zeros((H, W), dtype=bool)
    for i, j in ((2, 2), (1, 2), (3, 2), (2, 1), (2, 4), (1, 4), (3, 4), (2, 5)):
        raw[i, j] = True
    assert np.array_equal(reference_edges(labels), thin(raw))
    assert np.array_equal(label_map_edges(labels), thin(raw))
    assert not label_map_edges(labels)[2, 3]


def test_edge_target_and_label_map_read_once(tmp_path, monkeypatch):
    write_sample(tmp_path, "a")
    write_split(tmp_path, ["a"])
    labels = np.ones((H, W), dtype=np.uint16)
    labels[:, 4:] = 3
    scipy.io.savemat(tmp_path / "pascal-context" / "trainval" / "a.mat", {"LabelMap": labels, "other": np.eye(2)})
    reads = []

    def counting(path: Path) -> torch.Tensor:
        reads.append(path)
        return decode_label_map(path)

    monkeypatch.setattr(PascalMT, "LABEL_MAP", dataclasses.replace(PascalMT.LABEL_MAP, decode=counting))
    sample = PascalMT(tmp_path, "val", ["edge", "normals"])[0]
    assert len(reads) == 1
    assert sample["edge"].dtype == torch.float32 and sample["edge"].shape == (1, H, W)
    assert torch.equal(sample["edge"][0], torch.from_numpy(label_map_edges(labels)).float())
    assert sample["edge"][0, 1:, 3].sum() == H - 1 and sample["edge"].sum() == H - 1
    assert (sample["normals"][:, :, :4] == 0).all() and (sample["normals"][:, :, 4:] != 0).any()


def test_bad_label_map(tmp_path):
    write_sample(tmp_path, "a")
    write_split(tmp_path, ["a"])
    path = tmp_path / "pascal-context" / "trainval" / "a.mat"
    scipy.io.savemat(path, {"labels": np.ones((H, W))})
    with pytest.raises(DatasetError, match="no variable 'LabelMap'") as err:
        PascalMT(tmp_path, "val", ["edge"])[0]
    assert str(path) in str(err.value)
    scipy.io.savemat(path, {"LabelMap": np.ones((H, W + 1))})
    with pytest.raises(DatasetError, match="differs from the image's"):
        PascalMT(tmp_path, "val", ["edge"])[0]


# ---------------------------------------------------------------------------------------------------
# missing files, transforms, loader


@pytest.mark.parametrize(
    ("target", "relative"),
    [
        ("semseg", "semseg/pascal-context/a.png"),
        ("human_parts", "human_parts/a.mat"),
        ("normals", "normals_distill/a.png"),
        ("normals", "pascal-context/trainval/a.mat"),
        ("sal", "sal_distill/a.png"),
        ("edge", "pascal-context/trainval/a.mat"),
    ],
)
def test_missing_file_of_requested_target(tmp_path, target, relative):
    write_sample(tmp_path, "a")
    write_sample(tmp_path, "b")
    write_split(tmp_path, ["a", "b"])
    (tmp_path / relative).unlink()
    ds = PascalMT(tmp_path, "val", [target, "sal"] if target != "sal" else [target])
    with pytest.raises(DatasetError) as err:
        ds[0]
    message = str(err.value)
    assert str(tmp_path / relative) in message
    assert f"{Path(relative).parent}/<id>" in message
    ds[1]


def test_missing_files_of_unrequested_targets_are_fine(tmp_path):
    write_sample(tmp_path, "a")
    write_split(tmp_path, ["a"])
    for relative in (
        "human_parts/a.mat",
        "normals_distill/a.png",
        "pascal-context/trainval/a.mat",
        "json/nyu_classes.json",
    ):
        (tmp_path / relative).unlink()
    sample = PascalMT(tmp_path, "val", ["semseg", "sal"])[0]
    assert set(sample) == {"image", "semseg", "sal", "meta"}


def test_missing_split(tmp_path):
    write_sample(tmp_path, "a")
    write_split(tmp_path, ["a"])
    with pytest.raises(DatasetError, match="ImageSets/Context/train.txt.*splits found: val"):
        PascalMT(tmp_path, "train", ["semseg"])


def test_through_val_transforms_and_loader(tmp_path):
    write_sample(tmp_path, "a", seed=1)
    write_sample(tmp_path, "b", seed=2, person=False)
    write_split(tmp_path, ["a", "b"])
    crop = (H + 2, W + 4)
    raw = PascalMT(tmp_path, "val", TARGETS)
    ds = PascalMT(tmp_path, "val", TARGETS, transform=build_transforms(False, crop))
    sample = ds[0]
    assert sample["image"].shape == (3, *crop)
    for key in ("semseg", "human_parts"):
        assert sample[key].shape == crop and sample[key].dtype == torch.int64
        assert torch.equal(sample[key][:H, :W], raw[0][key])
        assert (sample[key][H:] == 255).all() and (sample[key][:, W:] == 255).all()
    assert sample["normals"].shape == (3, *crop) and (sample["normals"][:, H:] == 0).all()
    for key in ("sal", "edge"):
        assert sample[key].shape == (1, *crop) and (sample[key][:, H:] == 255).all()
        assert torch.equal(sample[key][:, :H, :W], raw[0][key])
    batch = next(iter(DataLoader(ds, batch_size=2, num_workers=0)))
    assert batch["image"].shape == (2, 3, *crop)
    assert batch["human_parts"].shape == (2, *crop) and batch["semseg"].shape == (2, *crop)
    assert batch["normals"].shape == (2, 3, *crop) and batch["edge"].shape == (2, 1, *crop)
    assert (batch["human_parts"][1] == 255).all()
    assert batch["meta"]["id"] == ["a", "b"]


# ---------------------------------------------------------------------------------------------------
# the human_parts task


def test_human_parts_task(tmp_path):
    write_sample(tmp_path, "a", seed=1)
    write_sample(tmp_path, "b", seed=2, person=False)
    write_split(tmp_path, ["a", "b"])
    ds = PascalMT(tmp_path, "val", ["human_parts", "semseg"])
    task_type = TASKS.get("human_parts")
    assert task_type.default_loss_weight == 2.0 and task_type.target_key == "human_parts"
    task = task_type("human_parts", ds.info)
    assert task.out_channels == 7 and task.class_names == list(HUMAN_PART_CLASSES)
    target = torch.stack([ds[0]["human_parts"], ds[1]["human_parts"]])
    output = torch.randn(2, 7, H, W, requires_grad=True)
    loss = task.loss(output, target)
    loss.backward()
    assert torch.isfinite(loss) and output.grad is not None
    metric = task.metric()
    metric.update(task.postprocess(target_logits(target[:1])), target[:1])
    metric.update(task.postprocess(output.detach()[1:]), target[1:])  # no person: skipped
    result = metric.compute()
    assert result["mIoU"] == 100.0 and result["pixel_acc"] == 100.0
    assert metric.confusion.sum() == H * W


def target_logits(target: torch.Tensor) -> torch.Tensor:
    """Logits whose argmax is the target (ignored pixels predict background)."""
    labels = torch.where(target == 255, 0, target)
    return torch.nn.functional.one_hot(labels, 7).permute(0, 3, 1, 2).float()
