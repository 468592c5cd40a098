"""``gradnorm``: task weights learned so that the tasks' gradient norms at a shared layer train at balanced
rates (Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
Balancing in Deep Multitask Networks", ICML 2018)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from rcm_nddr.objectives.weighting import WEIGHTINGS, StepContext, Weighting
from rcm_nddr.task import Task


@WEIGHTINGS.register("gradnorm")
class GradNormWeighting(Weighting):
    """Learned weights ``w_t``. The network trains on ``sum_t w_t L_t``, the weights only on the GradNorm loss
    (Chen et al. 2018, eqs. 1-2)

        G_t     = || grad_W (w_t L_t) || = w_t || grad_W L_t ||       (W: the shared layer)
        Lt~_t   = L_t / L_t(0),   r_t = Lt~_t / mean_i Lt~_i            (inverse training rate)
        target_t = mean_i G_i * r_t^alpha                             (held constant)
        L_grad  = sum_t | G_t - target_t |

    The gradient the total loss would give ``w_t`` (``L_t``) is not used: ``w_t`` receives
    ``dL_grad / dw_t = sign(G_t - target_t) * ||grad_W L_t||``. After each optimizer step the weights are
    rescaled to sum to T (the number of tasks). ``L_t(0)`` are the losses of the first step (kept in the
    state, so a resumed run keeps its reference).

    ``W`` is the layer named by ``layer`` (a module every task's loss reaches), by default the last such
    layer of the network; its parameters arrive as ``StepContext.layer``. ``alpha`` sets how strongly the
    tasks whose loss went down least (relative to their first loss) are pushed: 0 asks for equal gradient
    norms, larger values for norms further apart.

    Initial weights: the configured loss weights rescaled to sum to T (all 1, as in the paper, when the
    configured weights are equal), so the configured ratio is the starting point that GradNorm then
    adapts. ``current()`` returns ``w`` itself (each task loss's multiplier in the network's loss).

    Cost: one extra backward pass per task, from the task's loss down to ``W`` (with ``retain_graph``).
    The weights train in their own group of the run's optimizer, with ``default_lr`` = 0.025 unless
    ``loss.weighting.lr`` says otherwise (0.025 is the default learning rate of the weighting methods'
    parameters in the FAMO / Nash-MTL benchmark code)."""

    needs_layer = True
    not_distributed = (
        "it differentiates each task's loss at the shared layer with torch.autograd.grad, which DDP does not "
        "synchronize (DDP averages gradients only in the one backward() per forward)"
    )
    default_lr = 0.025

    def __init__(
        self,
        tasks: Mapping[str, Task],
        weights: Mapping[str, float],
        alpha: float = 1.5,
        layer: str | None = None,
    ) -> None:
        super().__init__(tasks, weights)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha: expected a finite number >= 0, got {alpha!r}")
        if layer is not None and not isinstance(layer, str):
            raise ValueError(f"layer: expected the name of a module of the network, got {layer!r}")
        if bool((self.base < 0).any()) or float(self.base.sum()) <= 0:
            raise ValueError(
                f"gradnorm starts from the configured loss weights, which must be >= 0 with a positive sum; "
                f"got {dict(zip(self.names, self.base.tolist(), strict=True))}"
            )
        self.alpha = float(alpha)
        self.layer = layer
        count = len(self.names)
        self.task_weights = nn.Parameter(self.base * count / self.base.sum())
        # the losses of the first step (L_t(0)) and whether they have been taken
        self.register_buffer("initial", torch.ones(count))
        self.register_buffer("started", torch.tensor(False))

    def current(self) -> Tensor:
        return self.task_weights.detach().clone()

    @staticmethod
    def gradient_norm(loss: Tensor, layer: Sequence[nn.Parameter]) -> Tensor:
        """``|| grad_W loss ||`` over all the parameters of ``layer`` together (the graph is kept)."""
        grads = torch.autograd.grad(loss, list(layer), retain_graph=True, allow_unused=True)
        squares = [g.float().pow(2).sum() for g in grads if g is not None]
        if not squares:
            return loss.new_zeros((), dtype=torch.float32)
        return torch.stack(squares).sum().sqrt()

    def backward(self, losses: Tensor, context: StepContext) -> None:
        layer = list(context.layer)
        if not layer:
            raise RuntimeError("gradnorm needs the parameters of a shared layer (StepContext.layer is empty)")
        values = losses.detach().float()
        # L_t(0): taken at the first step (no host synchronization: a select on the device)
        self.initial.copy_(torch.where(self.started, self.initial, values))
        self.started.fill_(True)
        norms = torch.stack([self.gradient_norm(losses[t], layer) for t in range(len(self.names))])
        weights = self.task_weights.detach()
        norms = norms.to(weights)
        grad_norms = weights * norms  # G_t
        ratios = values.to(weights) / self.initial.clamp_min(torch.finfo(self.initial.dtype).tiny)
        rates = ratios / ratios.mean()  # r_t
        target = grad_norms.mean() * rates.pow(self.alpha)
        weight_grad = torch.sign(grad_norms - target) * norms  # d L_grad / d w_t, the target held constant
        # the network's gradient: sum_t w_t L_t with w detached, so w gets nothing from it
        (weights.to(losses.dtype) * losses).sum().backward()
        if self.task_weights.grad is None:
            self.task_weights.grad = weight_grad
        else:
            self.task_weights.grad.add_(weight_grad)

    def after_step(self, losses: Tensor, context: StepContext) -> None:
        """Rescale the weights to sum to the number of tasks."""
        with torch.no_grad():
            self.task_weights.mul_(len(self.names) / self.task_weights.sum())

    def extra_repr(self) -> str:
        return f"tasks={self.names}, alpha={self.alpha}, layer={self.layer!r}"
