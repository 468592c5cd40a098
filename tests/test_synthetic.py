"""Tests of the SYNTH_MT generator: exact, mutually consistent targets, the on-disk layout,
determinism, and how an existing output directory is treated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcm_nddr.data import synthetic
from rcm_nddr.data.synthetic import (
    CLASSES,
    DEPTH_EDGE_THRESHOLD,
    GENERATOR_VERSION,
    PART_CLASSES,
    PART_SEMSEG,
    generate,
    render_scene,
)

SIZE = (48, 64)
OBJECT_CLASSES = [CLASSES.index(c) for c in ("sphere", "box", "cylinder", "cone")]
ROOM_CLASSES = [CLASSES.index(c) for c in ("floor", "wall", "ceiling")]
N_ROOM_INSTANCES = 6  # floor, ceiling, four walls


def _scenes(n: int, seed: int = 7, size: tuple[int, int] = SIZE) -> list[synthetic.Scene]:
    return [render_scene(np.random.default_rng([seed, i]), size) for i in range(n)]


@pytest.fixture(scope="module")
def scenes() -> list[synthetic.Scene]:
    return _scenes(6)


def _rays(scene: synthetic.Scene) -> np.ndarray:
    """Camera-frame pixel rays (x, y, 1), H x W x 3."""
    fx, fy, cx, cy = scene.intrinsics
    v, u = np.mgrid[0 : scene.depth.shape[0], 0 : scene.depth.shape[1]]
    return np.stack([(u - cx) / fx, (v - cy) / fy, np.ones(u.shape)], axis=-1)


def test_scene_arrays_have_documented_shapes_and_types(scenes):
    h, w = SIZE
    for s in scenes:
        assert s.image.shape == (h, w, 3) and s.image.dtype == np.uint8
        assert s.semseg.shape == (h, w) and s.semseg.dtype == np.int64
        assert s.parts.shape == (h, w) and s.parts.dtype == np.int64
        assert s.depth.shape == (h, w) and s.depth.dtype == np.float32
        assert s.normals.shape == (h, w, 3) and s.normals.dtype == np.float32
        assert s.edge.shape == (h, w) and s.edge.dtype == bool
        assert s.sal.shape == (h, w) and s.sal.dtype == bool
        assert s.instance.shape == (h, w) and s.instance.dtype == np.int32
        assert len(s.intrinsics) == 4 and all(isinstance(x, float) for x in s.intrinsics)
        assert s.semseg.min() >= 0 and s.semseg.max() < len(CLASSES)
        assert s.parts.min() >= 0 and s.parts.max() < len(PART_CLASSES)
        assert s.image.std() > 5  # not a blank render


def test_depth_positive_and_normals_unit_facing_the_camera(scenes):
    for s in scenes:
        assert np.isfinite(s.depth).all() and (s.depth > 0).all()  # closed room: every ray hits
        assert np.allclose(np.linalg.norm(s.normals, axis=-1), 1.0, atol=1e-5)
        assert ((s.normals * _rays(s)).sum(axis=-1) < 0).all()


def test_labels_agree_with_each_other(scenes):
    for s in scenes:
        np.testing.assert_array_equal(s.sal, np.isin(s.semseg, OBJECT_CLASSES))
        for part, kind in enumerate(PART_SEMSEG):
            on_part = s.parts == part
            if kind is None:
                assert np.isin(s.semseg[on_part], ROOM_CLASSES).all()
            else:
                assert (s.semseg[on_part] == CLASSES.index(kind)).all(), PART_CLASSES[part]
        for inst in np.unique(s.instance):
            assert len(np.unique(s.semseg[s.instance == inst])) == 1
            assert (inst < N_ROOM_INSTANCES) == np.isin(s.semseg[s.instance == inst], ROOM_CLASSES).all()


def test_parts_follow_the_geometry(scenes):
    seen = set()
    for s in scenes:
        floor = s.semseg == CLASSES.index("floor")
        up = s.normals[floor].mean(axis=0)  # the floor normal is the world's up in the camera frame
        assert np.allclose(s.normals[floor], up, atol=1e-4)
        height = (s.normals * up).sum(axis=-1)  # cosine of each normal with the up direction
        for part, name in enumerate(PART_CLASSES):
            on_part = s.parts == part
            if not on_part.any() or name == "background":
                continue
            seen.add(name)
            if name.endswith("top"):
                assert (height[on_part] > 1 - 1e-4).all(), name
            elif name in ("box side", "cylinder side"):
                assert (np.abs(height[on_part]) < 1e-4).all(), name
            elif name == "cone side":
                assert ((height[on_part] > 0) & (height[on_part] < 1 - 1e-3)).all(), name
            elif name == "sphere upper half":
                assert (height[on_part] >= -1e-5).all(), name
            elif name == "sphere lower half":
                assert (height[on_part] <= 1e-5).all(), name
    assert len(seen) >= 6


def test_normals_on_planes_match_normals_from_depth(scenes):
    checked = 0
    for s in scenes:
        fx, fy, cx, cy = s.intrinsics
        points = _rays(s) * s.depth.astype(np.float64)[..., None]  # back-projected, camera frame
        du = points[1:-1, 2:] - points[1:-1, :-2]
        dv = points[2:, 1:-1] - points[:-2, 1:-1]
        n = np.cross(du, dv)
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        n *= -np.sign((n * _rays(s)[1:-1, 1:-1]).sum(axis=-1, keepdims=True))  # face the camera

        inst = s.instance
        same = np.ones_like(inst[1:-1, 1:-1], dtype=bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                same &= inst[1 + dy : inst.shape[0] - 1 + dy, 1 + dx : inst.shape[1] - 1 + dx] == inst[1:-1, 1:-1]
        planar = same & (inst[1:-1, 1:-1] < N_ROOM_INSTANCES)
        cosine = np.clip((n * s.normals[1:-1, 1:-1]).sum(axis=-1), -1.0, 1.0)
        angle = np.degrees(np.arccos(cosine))[planar]
        assert angle.max() < 1.0
        checked += planar.sum()
    assert checked > 1000


def _reference_edges(s: synthetic.Scene) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """The documented edge rule, pixel by pixel: for every pair of 4-neighbours that belong to different
    instances, or where the farther pixel leaves the nearer pixel's tangent plane by more than
    DEPTH_EDGE_THRESHOLD times the nearer depth, the nearer pixel (ties: lower instance id) is an edge."""
    h, w = s.depth.shape
    fx, fy, cx, cy = s.intrinsics
    z = s.depth.astype(np.float64).tolist()
    n = s.normals.astype(np.float64).tolist()
    inst = s.instance.tolist()
    edge = np.zeros((h, w), dtype=bool)
    boundaries = []

    def ray(v: int, u: int) -> tuple[float, float, float]:
        return ((u - cx) / fx, (v - cy) / fy, 1.0)

    for v in range(h):
        for u in range(w):
            for v2, u2 in ((v + 1, u), (v, u + 1)):
                if v2 >= h or u2 >= w:
                    continue
                a, b = (v, u), (v2, u2)
                if z[v2][u2] < z[v][u] or (z[v2][u2] == z[v][u] and inst[v2][u2] < inst[v][u]):
                    a, b = b, a
                na, ra, rb = n[a[0]][a[1]], ray(*a), ray(*b)
                facing = na[0] * rb[0] + na[1] * rb[1] + na[2] * rb[2]
                if facing >= 0:
                    jump = True
                else:
                    predicted = z[a[0]][a[1]] * (na[0] * ra[0] + na[1] * ra[1] + na[2] * ra[2]) / facing
                    jump = abs(z[b[0]][b[1]] - predicted) > DEPTH_EDGE_THRESHOLD * z[a[0]][a[1]]
                if inst[v][u] != inst[v2][u2] or jump:
                    edge[a] = True
                    boundaries.append((*a, *b))
    return edge, boundaries


def test_edges_follow_the_documented_rule(scenes):
    for s in scenes[:3]:
        reference, boundaries = _reference_edges(s)
        # every edge pixel is the nearer pixel of a boundary pair, and every such pixel is an edge
        np.testing.assert_array_equal(s.edge, reference)
        assert boundaries and s.edge.mean() < 0.3
        # every semantic class boundary is covered on one side
        for axis in (0, 1):
            a = np.take(s.semseg, range(s.semseg.shape[axis] - 1), axis=axis)
            b = np.take(s.semseg, range(1, s.semseg.shape[axis]), axis=axis)
            ea = np.take(s.edge, range(s.edge.shape[axis] - 1), axis=axis)
            eb = np.take(s.edge, range(1, s.edge.shape[axis]), axis=axis)
            assert (ea | eb)[a != b].all()


def test_edges_do_not_fire_inside_planes(scenes):
    for s in scenes:
        inst = np.pad(s.instance, 1, mode="edge")
        interior = (
            (inst[:-2, 1:-1] == s.instance)
            & (inst[2:, 1:-1] == s.instance)
            & (inst[1:-1, :-2] == s.instance)
            & (inst[1:-1, 2:] == s.instance)
            & (s.instance < N_ROOM_INSTANCES)
        )
        assert interior.sum() > 500
        assert not s.edge[interior].any()


def test_depth_discontinuity_rule_ignores_slanted_planes_and_catches_steps():
    h, w = 32, 32
    fx = fy = 20.0
    cx, cy = (w - 1) / 2, (h - 1) / 2
    v, u = np.mgrid[0:h, 0:w]
    rays = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones((h, w))])
    # a floor-like plane n . X = -1 whose horizon lies just above the top row: seen almost edge-on
    # there, its depth changes by large factors between neighbours
    normal = np.array([0.0, -1.0, rays[1].min() - 0.01])
    normal /= np.linalg.norm(normal)
    depth = -1.0 / np.einsum("i,ihw->hw", normal, rays)
    assert (depth > 0).all()
    ratio = depth[1:] / depth[:-1]
    assert max(ratio.max(), 1 / ratio.min()) - 1 > 5 * DEPTH_EDGE_THRESHOLD  # a plain relative jump fires
    normals = np.broadcast_to(normal, (h, w, 3)).astype(np.float32)
    instance = np.zeros((h, w), dtype=np.int32)
    edge = synthetic._edges(instance, depth.astype(np.float32), normals, rays)
    assert not edge.any()

    # a fronto-parallel step of the same instance: one depth discontinuity, marked on the nearer side
    depth = np.where(u < 10, 2.0, 3.0).astype(np.float32)
    normals = np.broadcast_to(np.array([0.0, 0.0, -1.0]), (h, w, 3)).astype(np.float32)
    edge = synthetic._edges(instance, depth, normals, rays)
    np.testing.assert_array_equal(edge, u == 9)


def test_most_scenes_show_several_objects_and_classes():
    good = 0
    for s in _scenes(20, seed=3):
        objects = np.unique(s.instance[s.instance >= N_ROOM_INSTANCES])
        good += len(objects) >= 2 and len(np.unique(s.semseg)) >= 3
    assert good >= 16


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_writes_the_layout(tmp_path):
    root = generate(tmp_path / "synth", n_train=3, n_val=2, size=SIZE, seed=5, progress=False)
    assert root == tmp_path / "synth"
    ids = [f"{i:06d}" for i in range(5)]
    assert (root / "gt_sets" / "train.txt").read_text().split() == ids[:3]
    assert (root / "gt_sets" / "val.txt").read_text().split() == ids[3:]
    meta = json.loads((root / "meta.json").read_text())
    assert meta["name"] == "SYNTH_MT"
    assert meta["generator_version"] == GENERATOR_VERSION
    assert meta["seed"] == 5 and meta["size"] == list(SIZE)
    assert meta["splits"] == {"train": 3, "val": 2}
    assert meta["classes"] == {"semseg": CLASSES, "parts": PART_CLASSES}
    assert meta["depth_unit"] == "m" and meta["normals_frame"] == "camera: x right, y down, z forward"
    assert set(meta["files"]) >= {"images", "segmentation", "parts", "depth", "normals", "edge", "sal"}
    cameras = json.loads((root / "cameras.json").read_text())
    assert sorted(cameras) == ids

    expected_files = {"meta.json", "cameras.json", "gt_sets/train.txt", "gt_sets/val.txt"}
    for i in ids:
        expected_files |= {f"{d}/{i}.png" for d in ("images", "segmentation", "parts", "edge", "sal")}
        expected_files |= {f"depth/{i}.npy", f"normals/{i}.npy"}
    assert set(_files(root)) == expected_files
    assert [p.name for p in tmp_path.iterdir()] == ["synth"]  # no temporary directory left behind

    # the files hold sample i of render_scene(default_rng([seed, i])) in the documented encodings
    i = 4
    s = render_scene(np.random.default_rng([5, i]), SIZE)
    image = Image.open(root / "images" / f"{ids[i]}.png")
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), s.image)
    for folder, labels in (("segmentation", s.semseg), ("parts", s.parts)):
        png = Image.open(root / folder / f"{ids[i]}.png")
        assert png.mode == "L"
        np.testing.assert_array_equal(np.asarray(png), labels + 1)
    for folder, mask in (("edge", s.edge), ("sal", s.sal)):
        np.testing.assert_array_equal(np.asarray(Image.open(root / folder / f"{ids[i]}.png")), mask * 255)
    depth = np.load(root / "depth" / f"{ids[i]}.npy")
    normals = np.load(root / "normals" / f"{ids[i]}.npy")
    assert depth.dtype == np.float32 and normals.dtype == np.float32 and normals.shape == (*SIZE, 3)
    np.testing.assert_array_equal(depth, s.depth)
    np.testing.assert_array_equal(normals, s.normals)
    assert cameras[ids[i]] == dict(zip(("fx", "fy", "cx", "cy"), s.intrinsics, strict=True))


def test_generate_is_deterministic_and_seeded(tmp_path):
    a = _files(generate(tmp_path / "a", 2, 1, size=SIZE, seed=11, progress=False))
    b = _files(generate(tmp_path / "b", 2, 1, size=SIZE, seed=11, progress=False))
    assert a == b
    c = _files(generate(tmp_path / "c", 2, 1, size=SIZE, seed=12, progress=False))
    for i in range(3):
        assert a[f"images/{i:06d}.png"] != c[f"images/{i:06d}.png"]


def test_a_sample_does_not_depend_on_the_dataset_size(tmp_path):
    small = _files(generate(tmp_path / "small", 1, 0, size=SIZE, seed=2, progress=False))
    large = _files(generate(tmp_path / "large", 2, 2, size=SIZE, seed=2, progress=False))
    for name, content in small.items():
        if name.endswith((".png", ".npy")):
            assert large[name] == content, name


def test_an_existing_identical_dataset_is_reused(tmp_path, monkeypatch):
    root = generate(tmp_path / "synth", 2, 1, size=SIZE, seed=0, progress=False)
    before = _files(root)

    def fail(*args, **kwargs):
        raise AssertionError("the dataset was rendered again")

    monkeypatch.setattr(synthetic, "render_scene", fail)
    assert generate(root, 2, 1, size=SIZE, seed=0, progress=False) == root
    assert _files(root) == before


@pytest.mark.parametrize(
    "kwargs",
    [dict(seed=1), dict(n_train=3), dict(n_val=0), dict(size=(48, 48))],
)
def test_an_existing_different_dataset_is_refused(tmp_path, kwargs):
    root = generate(tmp_path / "synth", 2, 1, size=SIZE, seed=0, progress=False)
    before = _files(root)
    args = dict(n_train=2, n_val=1, size=SIZE, seed=0, progress=False) | kwargs
    with pytest.raises(FileExistsError, match="pick another directory or delete it"):
        generate(root, **args)
    assert _files(root) == before


def test_a_foreign_directory_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no SYNTH_MT dataset"):
        generate(out, 1, 1, size=SIZE, progress=False)
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_an_empty_directory_is_filled(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    generate(out, 1, 1, size=SIZE, progress=False)
    assert (out / "meta.json").is_file()


def test_an_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch):
    calls = []
    real = synthetic.render_scene

    def flaky(rng, size):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(rng, size)

    monkeypatch.setattr(synthetic, "render_scene", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "synth", 3, 0, size=SIZE, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "render_scene", real)
    assert (generate(tmp_path / "synth", 3, 0, size=SIZE, progress=False) / "meta.json").is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_train=-1), "n_train"),
        (dict(n_val=-2), "n_val"),
        (dict(n_train=0, n_val=0), "n_train \\+ n_val"),
        (dict(n_train=1.5), "n_train"),
        (dict(size=(15, 64)), "size"),
        (dict(size=(64,)), "size"),
        (dict(size=(64, 64.0)), "size"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    args = dict(n_train=1, n_val=1, size=SIZE, seed=0, progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(tmp_path / "synth", **args)
    assert not (tmp_path / "synth").exists()


def test_render_scene_refuses_tiny_images():
    with pytest.raises(ValueError, match="size"):
        render_scene(np.random.default_rng(0), (8, 64))
