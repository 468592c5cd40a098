"""Shared test helpers: the overrides of a tiny CPU training run on a generated SYNTH_MT, random orthogonal
matrices, and the tolerance the deploy forms are held to."""

from pathlib import Path

import torch


def tiny_run(store: Path, data: Path, tasks: str, *extra: str) -> list[str]:
    """``--set`` overrides for a run of ``tasks`` (YAML list) that takes a second or two on a CPU."""
    return [
        f"tasks={tasks}",
        f"store={store}",
        f"dataset.root={data}",
        "dataset.crop=[48, 48]",
        "head.channels=8",
        "train.batch_size=2",
        "train.num_workers=0",
        "train.device=cpu",
        *extra,
    ]


def rc_run(store: Path, data: Path, bank: Path, tasks: str, *extra: str) -> list[str]:
    """``tiny_run`` of an RC (+ RI + NFF) group on the filter bank of ``bank``, 3 iterations, validated once."""
    return tiny_run(
        store,
        data,
        tasks,
        "backbone.reparam=rc",
        f"backbone.weights={bank}",
        "train.max_iters=3",
        "train.val_every=3",
        "test.batch_size=2",
        *extra,
    )


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random n x n orthogonal matrix (float64), its signs fixed by the QR's diagonal."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """The outputs of two forms of one network agree task by task: max abs difference <= 1e-4 x the output
    scale (what a deploy form is held to)."""
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        scale = a[name].abs().max().item()
        err = (a[name] - b[name]).abs().max().item()
        assert err <= 1e-4 * max(scale, 1e-6), f"{name}: max difference {err:.3g} at output scale {scale:.3g}"
