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
