"""Shared test helpers: the overrides of a tiny CPU training run on a generated SYNTH_MT."""

from pathlib import Path


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
