"""Parameter accounting: what each task owns (modulators or residual adapters, BatchNorm, downsample,
head, fusion, or a whole backbone) and what all tasks share (the filter bank)."""

from __future__ import annotations

from torch import Tensor, nn

CATEGORIES = ("modulators", "adapters", "batchnorm", "downsample", "backbone", "fusion", "head")


def _category(name: str, task: str) -> str | None:
    """What part of ``task`` the parameter, buffer or module ``name`` (dotted, model-relative) is, or
    None when it is not ``task``'s. These name patterns are the one place that knows which tensors
    belong to which task (the model store saves a task's tensors by them)."""
    dotted = f".{name}."
    if f".heads.{task}." in dotted:
        return "head"
    if f".fusion.{task}." in dotted:
        return "fusion"
    if f".paths.{task}." in dotted:
        return "backbone"
    if f".modulators.{task}." in dotted:
        return "modulators"
    if f".adapters.{task}." in dotted:  # a residual adapter, its own BatchNorm included
        return "adapters"
    if f".per_task.{task}." in dotted:
        return "downsample" if ".downsample." in dotted else "batchnorm"
    return None


def owned_by(name: str, task: str) -> bool:
    """Whether the parameter, buffer or module ``name`` belongs to ``task`` alone."""
    return _category(name, task) is not None


def task_state(model: nn.Module, task: str) -> dict[str, Tensor]:
    """Every parameter and buffer of ``task`` (modulators or adapters, BatchNorm with its statistics, downsample,
    fusion, head, or a whole backbone path), by state-dict name."""
    return {k: v for k, v in model.state_dict().items() if owned_by(k, task)}


def parameter_breakdown(model: nn.Module, task: str) -> dict[str, int]:
    """The trainable parameters that belong to ``task``, by category, with their ``total``, and the
    size of the shared, frozen ``filter_bank`` (0 without reparameterization)."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for name, p in model.named_parameters():
        category = _category(name, task)
        if category is not None and p.requires_grad:
            counts[category] += p.numel()
    counts["total"] = sum(counts[c] for c in CATEGORIES)
    bank = ("filter_bank", "filter_bank_bias")  # the bank's weights and, for a conv with a bias (VGG), its bias
    counts["filter_bank"] = sum(b.numel() for n, b in model.named_buffers() if n.endswith(bank))
    return counts


def format_breakdown(breakdowns: dict[str, dict[str, int]]) -> str:
    """A small fixed-width table of ``{task: breakdown}``."""
    columns = [c for c in (*CATEGORIES, "total", "filter_bank") if any(b[c] for b in breakdowns.values())]
    width = max(len(t) for t in breakdowns) + 2
    lines = ["task".ljust(width) + "".join(c.rjust(13) for c in columns)]
    for task, b in breakdowns.items():
        lines.append(task.ljust(width) + "".join(f"{b[c]:>13,}" for c in columns))
    return "\n".join(lines)
