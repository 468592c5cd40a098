"""``pcgrad``: gradient surgery, each task's gradient at the shared parameters stripped of its components that
conflict with the other tasks' (Yu, Kumar, Gupta, Levine, Hausman and Finn, "Gradient Surgery for
Multi-Task Learning", NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from rcm_nddr.objectives.weighting import WEIGHTINGS, StepContext, Weighting
from rcm_nddr.task import Task


@WEIGHTINGS.register("pcgrad")
class PCGradWeighting(Weighting):
    """Projecting Conflicting Gradients (Yu et al. 2020, Algorithm 1) at the parameters more than one task
    reaches (``StepContext.shared``). With ``g_t`` the gradient of ``w_t L_t`` there (``w_t`` the configured
    loss weight; all shared parameters flattened into one vector), each task's ``g_t`` is projected against
    the ORIGINAL gradients of the other tasks, taken in a random order:

        for j != t:   if g_t . g_j < 0:   g_t <- g_t - (g_t . g_j / ||g_j||^2) g_j

    and the shared parameters' gradient is ``sum_t g_t`` (projected). Every other trainable parameter (a
    task's own head, reached by one loss only) gets its plain gradient of ``sum_t w_t L_t``. Two gradients
    that do not conflict (``g_t . g_j >= 0``) are left as they are.

    The random orders come from a generator seeded with ``(seed, iteration)``, so a run is reproducible and
    a resumed run draws the orders an uninterrupted one would (with two tasks the order does not matter).

    Cost: T backward passes to the shared parameters (one per task, with ``retain_graph``) and one more for
    the rest, so about T + 1 backward passes per step, plus two flattened gradients' worth of memory per
    task. PCGrad changes gradient directions, not loss weights: ``current()`` is the configured weights."""

    needs_shared = True
    not_distributed = (
        "it takes each task's gradient with its own backward pass through the network, and DDP synchronizes "
        "gradients only in the one backward() per forward"
    )

    def __init__(self, tasks: Mapping[str, Task], weights: Mapping[str, float], seed: int = 0) -> None:
        super().__init__(tasks, weights)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
        self.seed = seed

    def orders(self, iteration: int) -> list[list[int]]:
        """For each task, the order in which the other tasks' gradients are projected out at ``iteration``."""
        rng = np.random.default_rng([self.seed, max(int(iteration), 0)])
        count = len(self.names)
        return [[j for j in rng.permutation(count).tolist() if j != t] for t in range(count)]

    @staticmethod
    def project(grads: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
        """``grads`` (T x N, one task's flattened gradient a row) with each row's conflicting components
        removed against the original rows in ``orders[t]``; returns the sum of the projected rows (N)."""
        squares = grads.pow(2).sum(dim=1).clamp_min(torch.finfo(grads.dtype).tiny)
        total = torch.zeros_like(grads[0])
        for t, order in enumerate(orders):
            g = grads[t].clone()
            for j in order:
                # only a negative dot product projects (no host synchronization: a clamp, not an `if`)
                dot = torch.dot(g, grads[j]).clamp(max=0.0)
                g.sub_(grads[j] * (dot / squares[j]))
            total.add_(g)
        return total

    def backward(self, losses: Tensor, context: StepContext) -> None:
        shared = list(context.shared)
        if not shared:
            raise RuntimeError("pcgrad needs the shared parameters (StepContext.shared is empty)")
        weighted = self.base.to(losses) * losses
        grads = torch.stack([self._flat_grad(weighted[t], shared) for t in range(len(self.names))])
        surgery = self.project(grads, self.orders(context.iteration))
        # the plain gradient everywhere (the task heads), then the shared parameters' replaced by the surgery's
        before = [None if p.grad is None else p.grad.detach().clone() for p in shared]
        weighted.sum().backward()
        offset = 0
        for p, previous in zip(shared, before, strict=True):
            piece = surgery[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            if previous is not None:
                piece = piece + previous
            if p.grad is None:
                p.grad = piece
            else:
                p.grad.copy_(piece)

    @staticmethod
    def _flat_grad(loss: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
        """The gradient of ``loss`` at ``params`` as one float vector (zeros where ``loss`` does not reach)."""
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1).float() for g, p in zip(grads, params, strict=True)]
        )

    def extra_repr(self) -> str:
        return f"tasks={self.names}, seed={self.seed}"
