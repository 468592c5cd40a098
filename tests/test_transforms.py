"""Invariants of the joint transforms: values follow their pixels, pad values per key, exact sizes,
flip rules, validation padding and determinism given the generator."""

from __future__ import annotations

import pytest
import torch

from rcm_nddr.data.targets import TARGET_KEYS
from rcm_nddr.data.transforms import (
    PadTo,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    build_transforms,
    horizontal_flip,
)

PAD_VALUES = {
    "image": 0.0,
    "semseg": 255,
    "parts": 255,
    "human_parts": 255,
    "depth": 0.0,
    "normals": 0.0,
    "edge": 255.0,
    "sal": 255.0,
}


def make_sample(h: int = 12, w: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    invalid = torch.rand(h, w, generator=g) < 0.2
    depth = torch.rand(1, h, w, generator=g) * 4 + 0.5
    depth[0][invalid] = 0.0
    normals = torch.randn(3, h, w, generator=g)
    normals = normals / normals.norm(dim=0, keepdim=True)
    normals[:, invalid] = 0.0
    semseg = torch.randint(0, 5, (h, w), generator=g)
    semseg[torch.rand(h, w, generator=g) < 0.1] = 255
    return {
        "image": torch.randn(3, h, w, generator=g),
        "semseg": semseg,
        "parts": torch.randint(0, 3, (h, w), generator=g),
        "depth": depth,
        "normals": normals,
        "edge": (torch.rand(1, h, w, generator=g) < 0.2).float(),
        "sal": (torch.rand(1, h, w, generator=g) < 0.5).float(),
        "human_parts": torch.randint(0, 7, (h, w), generator=g),
        "meta": {"id": "000007", "size": (h, w)},
    }


def _source_index(n_out: int, n_in: int) -> torch.Tensor:
    """The input pixel a nearest (pixel-centre) resize reads for each output pixel."""
    return ((torch.arange(n_out) + 0.5) * n_in / n_out).floor().long().clamp(max=n_in - 1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registry_covers_every_sample_key():
    # plug-ins loaded by other tests may add keys of their own: the built-in ones are those of the registry module
    entries = [TARGET_KEYS.get(k) for k in TARGET_KEYS.names()]
    builtin = {entry.name: entry for entry in entries if entry.module == "rcm_nddr.data.targets"}
    assert set(builtin) == set(PAD_VALUES)
    assert {k: entry.rule.pad_value for k, entry in builtin.items()} == PAD_VALUES


@pytest.mark.parametrize("scale", [0.5, 1.5, 2.0])
def test_scale_moves_values_with_their_pixels(scale):
    sample = make_sample()
    out = RandomScale(scales=(scale,))(sample, _gen())
    h, w = round(12 * scale), round(16 * scale)
    ys, xs = _source_index(h, 12), _source_index(w, 16)
    assert out["image"].shape == (3, h, w)
    for key in ("semseg", "parts", "edge", "sal", "normals"):
        assert torch.equal(out[key], sample[key][..., ys, :][..., xs]), key
    # zooming in by s makes the scene s times closer; invalid (0) stays 0
    torch.testing.assert_close(out["depth"], sample["depth"][..., ys, :][..., xs] / scale)
    assert set(out["semseg"].unique().tolist()) <= set(sample["semseg"].unique().tolist())
    assert out["meta"] is sample["meta"]


def test_scale_image_is_smooth_not_nearest():
    sample = {"image": torch.zeros(3, 4, 4)}
    sample["image"][:, :, 2:] = 1.0
    out = RandomScale(scales=(2.0,))(sample, _gen())["image"]
    assert out.shape == (3, 8, 8)
    values = out[0, 0].tolist()
    assert values[0] == 0.0 and values[-1] == 1.0 and any(0 < v < 1 for v in values)


def test_scale_draws_from_the_list():
    scales = (0.5, 1.0, 2.0)
    seen = {RandomScale(scales)(make_sample(), _gen(seed))["depth"].shape[-1] for seed in range(30)}
    assert seen == {8, 16, 32}


def test_crop_pads_each_key_with_its_value():
    sample = make_sample(4, 5)
    out = RandomCrop((10, 12))(sample, _gen())
    for key, pad in PAD_VALUES.items():
        value = out[key]
        assert value.shape[-2:] == (10, 12), key
        assert value.dtype == sample[key].dtype, key
        assert torch.equal(value[..., :4, :5], sample[key]), key
        assert (value[..., 4:, :] == pad).all() and (value[..., :, 5:] == pad).all(), key


@pytest.mark.parametrize("size", [(8, 8), (12, 16), (5, 16), (20, 3)])
def test_crop_size_is_exact_and_a_window_of_the_input(size):
    sample = make_sample()
    out = RandomCrop(size)(sample, _gen(3))
    for key in PAD_VALUES:
        assert out[key].shape[-2:] == size, key
    padded = PadTo(size)(sample)
    windows = [
        (top, left)
        for top in range(padded["depth"].shape[-2] - size[0] + 1)
        for left in range(padded["depth"].shape[-1] - size[1] + 1)
        if torch.equal(padded["depth"][..., top : top + size[0], left : left + size[1]], out["depth"])
    ]
    assert windows
    top, left = windows[0]
    for key in PAD_VALUES:
        assert torch.equal(out[key], padded[key][..., top : top + size[0], left : left + size[1]]), key


def test_crop_position_is_random_in_both_axes():
    sample = {"depth": (torch.arange(12 * 16) + 1.0).view(1, 12, 16)}  # each value names its pixel
    corners = [int(RandomCrop((4, 4))(sample, _gen(s))["depth"][0, 0, 0]) - 1 for s in range(30)]
    tops, lefts = {c // 16 for c in corners}, {c % 16 for c in corners}
    assert len(tops) > 3 and len(lefts) > 3
    assert max(tops) <= 12 - 4 and max(lefts) <= 16 - 4


def test_flip_mirrors_and_negates_normals_x():
    sample = make_sample()
    out = horizontal_flip(sample)
    for key in ("image", "semseg", "parts", "depth", "edge", "sal"):
        assert torch.equal(out[key], sample[key].flip(-1)), key
    mirrored = sample["normals"].flip(-1)
    assert torch.equal(out["normals"][0], -mirrored[0])
    assert torch.equal(out["normals"][1:], mirrored[1:])
    invalid = (mirrored == 0).all(dim=0)
    assert invalid.any()
    assert not torch.signbit(out["normals"][:, invalid]).any()  # still +0.0, not -0.0


def test_flip_twice_is_identity():
    sample = make_sample()
    twice = horizontal_flip(horizontal_flip(sample))
    for key in PAD_VALUES:
        assert torch.equal(twice[key], sample[key]), key


def test_random_flip_probability():
    sample = make_sample()
    assert torch.equal(RandomHorizontalFlip(p=1.0)(sample, _gen())["sal"], sample["sal"].flip(-1))
    assert torch.equal(RandomHorizontalFlip(p=0.0)(sample, _gen())["sal"], sample["sal"])
    flips = [RandomHorizontalFlip()(sample, _gen(s))["image"].equal(sample["image"]) for s in range(40)]
    assert 5 < sum(flips) < 35


def test_normals_stay_unit_or_zero_through_training_pipeline():
    transform = build_transforms(train=True, crop=(10, 10))
    for seed in range(10):
        normals = transform(make_sample(), _gen(seed))["normals"]
        norms = normals.norm(dim=0)
        zero = (normals == 0).all(dim=0)
        torch.testing.assert_close(norms[~zero], torch.ones_like(norms[~zero]))


def test_validation_pad_keeps_original_region():
    sample = make_sample()
    out = build_transforms(train=False, crop=(16, 20))(sample, _gen())
    for key, pad in PAD_VALUES.items():
        assert out[key].shape[-2:] == (16, 20), key
        assert torch.equal(out[key][..., :12, :16], sample[key]), key
        assert (out[key][..., 12:, :] == pad).all() and (out[key][..., :, 16:] == pad).all(), key
    assert out["meta"] == sample["meta"]


def test_validation_pad_leaves_larger_sides():
    sample = make_sample()
    out = PadTo((8, 20))(sample)
    assert out["depth"].shape == (1, 12, 20)
    assert torch.equal(out["depth"][..., :16], sample["depth"])


def test_deterministic_given_the_generator():
    transform = build_transforms(train=True, crop=(8, 8))
    sample = make_sample()
    a, b = transform(sample, _gen(42)), transform(sample, _gen(42))
    for key in PAD_VALUES:
        assert torch.equal(a[key], b[key]), key
    others = [transform(sample, _gen(s)) for s in range(5)]
    assert any(not torch.equal(o["depth"], a["depth"]) for o in others)


def test_input_sample_is_not_modified():
    sample = make_sample()
    copy = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
    for seed in range(5):
        build_transforms(train=True, crop=(8, 8))(sample, _gen(seed))
    horizontal_flip(sample)
    for key in PAD_VALUES:
        assert torch.equal(sample[key], copy[key]), key


@pytest.mark.parametrize(
    "transform",
    [
        RandomScale(),
        RandomCrop((4, 4)),
        RandomHorizontalFlip(p=0.0),
        PadTo((4, 4)),
        build_transforms(train=True, crop=(4, 4)),
        build_transforms(train=False, crop=(4, 4)),
    ],
    ids=repr,
)
def test_unknown_key_is_an_error_naming_it(transform):
    sample = make_sample()
    sample["albedo"] = torch.zeros(3, 12, 16)
    with pytest.raises(ValueError, match="'albedo'"):
        transform(sample, _gen())


def test_mismatched_sizes_are_an_error():
    sample = make_sample()
    sample["depth"] = torch.zeros(1, 12, 15)
    with pytest.raises(ValueError, match="differ in size"):
        RandomCrop((4, 4))(sample, _gen())


@pytest.mark.parametrize("crop", [(0, 4), (4,), (4.0, 4)])
def test_bad_crop_size(crop):
    with pytest.raises(ValueError, match="crop size"):
        build_transforms(train=True, crop=crop)
