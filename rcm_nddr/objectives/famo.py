"""``famo``: Fast Adaptive Multitask Optimization, task weights that make the log-losses decrease at balanced
rates with one backward pass per step (Liu, Liu, Feng, Stone and Liu, "FAMO: Fast Adaptive Multitask
Optimization", NeurIPS 2023)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from rcm_nddr.objectives.weighting import WEIGHTINGS, StepContext, Weighting, mean_over_ranks
from rcm_nddr.task import Task

#: Adam's moment decay rates and denominator epsilon for the logits (torch.optim.Adam's defaults)
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def _number(name: str, value: object, *, positive: bool) -> float:
    """``value`` as a float, or a ValueError naming the option ``name``."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            pass
        else:  # YAML 1.1 reads 1e-8 (no dot) as text
            raise ValueError(f"{name}: expected a number, got the text {value!r} (write it with a dot: 1.0e-8)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name}: expected a number {'>' if positive else '>='} 0, got {value!r}")
    return float(value)


@WEIGHTINGS.register("famo")
class FAMOWeighting(Weighting):
    """FAMO (Liu et al. 2023, Algorithm 1). Task logits ``xi`` (0 at the start) give ``z = softmax(xi)``; with
    ``D_t = L_t - m_t + eps`` (``m_t`` a lower bound of task t's loss, ``min_losses``) the network trains on

        sum_t z_t log D_t / c,     c = sum_t z_t / D_t          (z and c held constant)

    whose gradient is ``sum_t (z_t / (c D_t)) grad L_t``: a convex combination of the task gradients (the
    multipliers sum to 1). After the optimizer step, with ``D'_t`` the losses recomputed on the same batch
    (``StepContext.recompute``),

        delta_t = log D_t - log D'_t,     xi.grad = (d softmax(xi) / d xi)^T delta = z * (delta - z . delta)

    and ``xi`` takes one Adam step (learning rate ``logit_lr``, L2 weight decay ``gamma``, betas (0.9,
    0.999)), as the official code does with ``torch.optim.Adam(weight_decay=gamma)``. The run's optimizer
    has already stepped when the recomputed losses exist, so FAMO steps its logits itself; the logits and
    Adam's moments and step count are buffers (not parameters: the run's optimizer never sees them, and
    the run's learning-rate schedule does not scale ``logit_lr``), saved in the state so a resumed run
    continues exactly.

    ``min_losses``: one lower bound for every task or ``{task: bound}`` (tasks left out: 0). A loss below
    its bound is taken as at the bound (the official code would take the log of a negative number).
    ``gamma`` 0.001 is the value of the official code's QM9 script (its class default is 0.01, also used
    for CelebA); ``logit_lr`` 0.025 is the official default.

    FAMO balances the log-losses, which a constant factor on a loss does not change (with ``min_losses`` 0
    the factor cancels out of the network's gradient and of ``delta``), so the configured loss weights are
    not used; ``min_losses`` are in the units of each task's own loss. ``current()`` is each
    task's effective multiplier ``z_t / (c D_t)`` at the last step (before any step: ``z``, 1 / T each).
    The delta and the logits' update use the losses averaged across the processes of a distributed run,
    so every process keeps the same logits."""

    needs_recompute = True

    def __init__(
        self,
        tasks: Mapping[str, Task],
        weights: Mapping[str, float],
        logit_lr: float = 0.025,
        gamma: float = 0.001,
        min_losses: float | Mapping[str, float] = 0.0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(tasks, weights)
        self.logit_lr = _number("logit_lr", logit_lr, positive=True)
        self.gamma = _number("gamma", gamma, positive=False)
        self.eps = _number("eps", eps, positive=True)
        if isinstance(min_losses, Mapping):
            unknown = [n for n in min_losses if n not in self.names]
            if unknown:
                raise ValueError(f"min_losses: {unknown} are not tasks of the group ({self.names})")
            bounds = [min_losses.get(n, 0.0) for n in self.names]
        else:
            bounds = [min_losses] * len(self.names)
        values = []
        for name, bound in zip(self.names, bounds, strict=True):
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
                raise ValueError(f"min_losses: expected a number or {{task: number}}, got {bound!r} for {name!r}")
            values.append(float(bound))
        count = len(self.names)
        # from the config, so not part of the saved state
        self.register_buffer("min_losses", torch.tensor(values), persistent=False)
        self.register_buffer("logits", torch.zeros(count))
        self.register_buffer("exp_avg", torch.zeros(count))
        self.register_buffer("exp_avg_sq", torch.zeros(count))
        # float64: 1 - 0.999^step loses four digits in float32 at the first steps
        self.register_buffer("adam_step", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("multipliers", torch.full((count,), 1.0 / count))

    def current(self) -> Tensor:
        return self.multipliers.detach().clone()

    def gaps(self, losses: Tensor) -> Tensor:
        """``D_t = max(L_t - m_t, 0) + eps``."""
        return (losses - self.min_losses.to(losses)).clamp_min(0.0) + self.eps

    def backward(self, losses: Tensor, context: StepContext) -> None:
        z = torch.softmax(self.logits, dim=0).to(losses)
        gaps = self.gaps(losses)
        c = (z / gaps.detach()).sum()
        with torch.no_grad():
            self.multipliers.copy_(z / (c * gaps.detach()))
        ((z * gaps.log()).sum() / c).backward()

    def after_step(self, losses: Tensor, context: StepContext) -> None:
        """One Adam step of the logits along the softmax's transposed Jacobian times the log-loss decrease."""
        if context.recompute is None:
            raise RuntimeError("famo needs the losses recomputed after the optimizer step (StepContext.recompute)")
        with torch.no_grad():
            before = self.gaps(mean_over_ranks(losses.detach()).to(self.logits))
            after = self.gaps(mean_over_ranks(context.recompute().detach()).to(self.logits))
            delta = before.log() - after.log()
            z = torch.softmax(self.logits, dim=0)
            grad = z * (delta - (z * delta).sum())
            self._adam(grad)

    def _adam(self, grad: Tensor) -> None:
        """The update of ``torch.optim.Adam`` (L2 weight decay ``gamma``, no amsgrad) on ``logits``."""
        beta1, beta2 = BETAS
        grad = grad + self.gamma * self.logits
        self.adam_step.add_(1.0)
        self.exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        correction1 = (1.0 - beta1**self.adam_step).to(self.logits)
        correction2 = (1.0 - beta2**self.adam_step).sqrt().to(self.logits)
        denominator = (self.exp_avg_sq.sqrt() / correction2).add_(ADAM_EPS)
        self.logits.sub_(self.logit_lr * self.exp_avg / (correction1 * denominator))

    def extra_repr(self) -> str:
        return f"tasks={self.names}, logit_lr={self.logit_lr}, gamma={self.gamma}, eps={self.eps}"
