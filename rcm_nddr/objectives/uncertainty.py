"""``uncertainty``: task weights learned as homoscedastic uncertainties (Kendall, Gal and Cipolla, "Multi-Task
Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from rcm_nddr.objectives.weighting import WEIGHTINGS, Weighting
from rcm_nddr.task import Task

FORMS = ("regression", "classification")


@WEIGHTINGS.register("uncertainty")
class UncertaintyWeighting(Weighting):
    """Each task t learns ``s_t = log sigma_t^2`` and the objective is (Kendall et al. 2018, eqs. 7 and 10,
    with ``log sigma = s / 2``)

        regression:      0.5 * exp(-s_t) * w_t * L_t + 0.5 * s_t     (1 / (2 sigma^2) L + log sigma)
        classification:        exp(-s_t) * w_t * L_t + 0.5 * s_t     (1 / sigma^2 L + log sigma)

    summed over the tasks, where ``w_t`` is the configured loss weight (1 keeps the paper's form). The
    form of each task follows its type's ``loss_kind`` (cross-entropy losses are classification) unless
    ``forms: {task: regression | classification}`` says otherwise; ``init`` is the initial ``s`` of every
    task (0: sigma = 1). The logged weight of a task is its loss multiplier ``c * exp(-s_t) * w_t``."""

    def __init__(
        self,
        tasks: Mapping[str, Task],
        weights: Mapping[str, float],
        forms: Mapping[str, str] | None = None,
        init: float = 0.0,
    ) -> None:
        super().__init__(tasks, weights)
        forms = dict(forms or {})
        unknown = [n for n in forms if n not in tasks]
        if unknown:
            raise ValueError(f"forms: {unknown} are not tasks of the group ({self.names})")
        bad = {n: f for n, f in forms.items() if f not in FORMS}
        if bad:
            raise ValueError(f"forms: expected regression or classification, got {bad}")
        kinds = [forms.get(n, getattr(tasks[n], "loss_kind", "regression")) for n in self.names]
        self.forms = kinds
        # 0.5 for the regression form, 1 for the classification form
        self.register_buffer(
            "scale", torch.tensor([0.5 if k == "regression" else 1.0 for k in kinds]), persistent=False
        )
        self.log_vars = nn.Parameter(torch.full((len(self.names),), float(init)))

    def current(self) -> Tensor:
        return (self.scale * torch.exp(-self.log_vars.detach()) * self.base).detach()

    def loss(self, losses: Tensor) -> Tensor:
        s = self.log_vars.to(losses.dtype)
        return (self.scale * torch.exp(-s) * self.base * losses + 0.5 * s).sum()

    def extra_repr(self) -> str:
        return f"tasks={self.names}, forms={self.forms}"
