"""TensorBoard logging of a training run: loss and metric scalars, and the first validation batch's
inputs, targets and predictions as image grids."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import make_grid

from rcm_nddr.engine.evaluate import denormalize
from rcm_nddr.task import Task


class Board:
    """A TensorBoard event file in the run directory (rank 0 only); the other ranks log nothing."""

    def __init__(self, directory: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            # importing tensorboard takes seconds: only a run that logs pays for it
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(directory)

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        """``<prefix>/<name>`` for each value (``prefix`` empty: the bare names)."""
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}" if prefix else name, value, step)

    def predictions(self, tasks: Mapping[str, Task], step: int):
        """An ``on_batch`` callback for ``evaluate``: the first batch's inputs, and each task's targets and
        predictions (up to 4 of each), as image grids. None when nothing is logged."""
        if self.writer is None:
            return None
        writer, shown = self.writer, []

        def show(batch: Mapping[str, Any], predictions: Mapping[str, torch.Tensor]) -> None:
            if shown:
                return
            shown.append(True)
            n = min(4, batch["image"].shape[0])
            writer.add_image("val/input", make_grid(denormalize(batch["image"][:n])), step)
            for name, task in tasks.items():
                target = batch[task.target_key][:n]
                writer.add_image(f"val/{name}/target", make_grid([task.visualize(x) for x in target]), step)
                writer.add_image(
                    f"val/{name}/prediction", make_grid([task.visualize(x) for x in predictions[name][:n]]), step
                )

        return show

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
