"""Which trainable parameters each task's loss reaches: the shared parameters gradient methods work on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def task_reach(
    model: nn.Module, tasks: Sequence[str], device: torch.device, size: tuple[int, int] = (64, 64)
) -> dict[str, set[str]]:
    """``{task: names of the trainable parameters its output depends on}``, found by differentiating each
    task's output on a small random batch (in eval mode: no BatchNorm statistic changes, no random draws
    from the global generators). ``model(images, raw=True)`` must return ``{task: raw output}``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, *size, generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            outputs = model(images, raw=True)
            reach = {}
            for task in tasks:
                grads = torch.autograd.grad(outputs[task].float().sum(), params, retain_graph=True, allow_unused=True)
                reach[task] = {name for (name, _), g in zip(named, grads, strict=True) if g is not None}
    finally:
        model.train(was_training)
    return reach


def shared_parameters(model: nn.Module, reach: dict[str, set[str]]) -> list[str]:
    """The trainable parameters (names, in the model's order) that more than one task reaches."""
    return [n for n, p in model.named_parameters() if p.requires_grad and sum(n in r for r in reach.values()) > 1]


def shared_layers(model: nn.Module, reach: dict[str, set[str]]) -> list[str]:
    """The modules (names, in the model's order) whose own trainable parameters every task reaches."""
    out = []
    for name, module in model.named_modules():
        own = [f"{name}.{n}" if name else n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own and all(all(n in r for r in reach.values()) for n in own):
            out.append(name)
    return out
