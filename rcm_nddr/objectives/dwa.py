"""``dwa``: Dynamic Weight Average, task weights from the rate at which each task's loss went down over the
last two periods (Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from rcm_nddr.objectives.weighting import WEIGHTINGS, StepContext, Weighting, mean_over_ranks
from rcm_nddr.task import Task


@WEIGHTINGS.register("dwa")
class DynamicWeightAverage(Weighting):
    """The weight of task t during period k (Liu et al. 2019, eq. 7)

        lambda_t(k) = T exp(r_t(k-1) / Temp) / sum_i exp(r_i(k-1) / Temp),   r_t(k-1) = L_t(k-1) / L_t(k-2)

    where ``L_t(k)`` is task t's loss averaged over the iterations of period k and T the number of tasks;
    ``lambda_t = 1`` in the first two periods (k = 0, 1), which have no two earlier periods to compare. A
    period is ``period`` iterations (by default an epoch: the trainer passes its iterations per epoch);
    ``temperature`` (Temp, 2 in the paper) smooths the weights: the larger, the closer to 1.

    The loss is ``sum_t base_t lambda_t L_t``: DWA's weights multiply the configured loss weights
    ``base_t`` (with equal configured weights of 1 this is the paper's form), and ``current()`` returns
    ``base_t lambda_t``. The period averages are taken over the losses averaged across the processes of a
    distributed run, so every process keeps the same weights. The state (the current period's running
    sums and count, the last two period averages, the number of periods completed) is saved, so a resumed
    run continues mid-period exactly."""

    def __init__(
        self,
        tasks: Mapping[str, Task],
        weights: Mapping[str, float],
        temperature: float = 2.0,
        period: int | None = None,
    ) -> None:
        super().__init__(tasks, weights)
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature <= 0
        ):
            raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
        if period is None:
            raise ValueError("period: the number of iterations per period is needed (the trainer passes an epoch's)")
        if isinstance(period, bool) or not isinstance(period, int) or period <= 0:
            raise ValueError(f"period: expected a positive number of iterations, got {period!r}")
        self.temperature = float(temperature)
        self.period = period
        count = len(self.names)
        # the running sums of the current period's losses and how many iterations they hold
        self.register_buffer("sums", torch.zeros(count))
        self.register_buffer("count", torch.tensor(0, dtype=torch.long))
        # the average losses of the last two completed periods: row 0 of period k-2, row 1 of period k-1
        self.register_buffer("means", torch.ones(2, count))
        self.register_buffer("periods", torch.tensor(0, dtype=torch.long))

    def current(self) -> Tensor:
        count = len(self.names)
        rates = self.means[1] / self.means[0].clamp_min(torch.finfo(self.means.dtype).tiny)
        dynamic = count * torch.softmax(rates / self.temperature, dim=0)
        dynamic = torch.where(self.periods >= 2, dynamic, torch.ones_like(dynamic))
        return (dynamic.to(self.base) * self.base).detach()

    def after_step(self, losses: Tensor, context: StepContext) -> None:
        """Add the step's losses to the current period; at its end, shift the period averages."""
        with torch.no_grad():
            self.sums.add_(mean_over_ranks(losses.detach()).to(self.sums))
            self.count.add_(1)
            # without host synchronization: every update is a select on the device
            done = self.count >= self.period
            averages = self.sums / self.count.clamp_min(1)
            shifted = torch.stack([self.means[1], averages])
            self.means.copy_(torch.where(done, shifted, self.means))
            self.sums.copy_(torch.where(done, torch.zeros_like(self.sums), self.sums))
            self.count.copy_(torch.where(done, torch.zeros_like(self.count), self.count))
            self.periods.add_(done.long())

    def extra_repr(self) -> str:
        return f"tasks={self.names}, temperature={self.temperature}, period={self.period}"
