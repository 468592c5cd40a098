"""Cross-task consistency terms: a transfer net maps one task's prediction to another task's output space, and
the transferred prediction is scored against that task's own prediction and/or label (xtask)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from rcm_nddr.objectives.transfer import TaskTransferNet
from rcm_nddr.task import Task


class ConsistencyTerm(nn.Module):
    """``loss(T(y_source), reference)`` with ``T`` a ``TaskTransferNet`` from the source task's raw output
    (``source_channels``) to the target task's, and the target task type's transfer loss ``kind``
    (``Task.transfer_loss``). ``supervise``: the reference is the target's prediction
    (``Task.postprocess`` of its raw output; detached with ``detach_target``), its label, or ``both`` (the
    sum of the two terms).

    The gradient reaches the transfer net and, through ``y_source``, the source task (so the source learns
    to predict something the target can be read from); with ``detach_target: false`` it also pulls the
    target's prediction towards the transferred one. ``attach`` is the task whose loss the term joins."""

    def __init__(
        self,
        source: str,
        target: str,
        source_channels: int,
        target_task: Task,
        kind: str,
        weight: float,
        supervise: str = "prediction",
        detach_target: bool = True,
        mix: str = "add",
        attach: str | None = None,
        batch_norm: bool = False,
        wider: bool = False,
    ) -> None:
        super().__init__()
        self.source, self.target, self.kind = source, target, kind
        self.weight, self.supervise, self.detach_target, self.mix = float(weight), supervise, detach_target, mix
        self.attach = attach or target
        self.target_task = target_task
        self.net = TaskTransferNet(source_channels, target_task.out_channels, batch_norm=batch_norm, wider=wider)

    @property
    def name(self) -> str:
        """How the term is logged (``consistency/<source>_to_<target>``)."""
        return f"{self.source}_to_{self.target}"

    def forward(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor:
        """The term's value from the raw outputs of the source and target tasks (``outputs``) and the
        target's label (``labels``, needed unless ``supervise`` is ``prediction``)."""
        transferred = self.net(outputs[self.source].float())
        total = transferred.new_zeros(())
        if self.supervise in ("prediction", "both"):
            prediction = outputs[self.target].float()
            if self.detach_target:
                prediction = prediction.detach()
            reference = self.target_task.postprocess(prediction)
            total = total + self.target_task.transfer_loss(self.kind, transferred, reference)
        if self.supervise in ("label", "both"):
            total = total + self.target_task.transfer_loss(self.kind, transferred, labels[self.target])
        return total

    def extra_repr(self) -> str:
        return f"{self.name}: {self.kind} x {self.weight} ({self.mix}) on {self.attach}, supervised by {self.supervise}"
