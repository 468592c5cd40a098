"""The deploy form of a MultiTaskNet: inference only, with every BatchNorm folded into its conv and each
task's modulators folded into the filter bank (``rcm_nddr.nn.folding``), so a task costs what a plain
network of the same architecture costs; optionally with all tasks batched into grouped convs
(``rcm_nddr.nn.batched``).

``deploy(model)`` returns a new module (the training form is left as it was) whose outputs equal the
training form's in eval mode up to float rounding. By default the tasks run one after another (one conv
call per task and conv, NDDR layer by layer), the stem's bank response shared when several tasks read
the same image. With ``batched=True`` it is a ``BatchedMultiTaskNet`` over one stacked tensor; with one
``SharedBackbone`` (hard sharing) there is nothing to batch and ``batched`` has no effect."""

from __future__ import annotations

import copy

import torch

from rcm_nddr.nn.batched import (
    BatchedBackbone,
    BatchedMultiTaskNet,
    BatchedNDDR,
    stack_backbone,
    stack_convs,
    stack_fusion,
)
from rcm_nddr.nn.folding import (
    DeployBackbone,
    FoldedBlock,
    FoldedPath,
    deploy_backbone,
    fold,
    fold_sequences,
    modulated_weight,
)
from rcm_nddr.nn.multitask import MultiTaskNet

__all__ = [
    "BatchedBackbone",
    "BatchedMultiTaskNet",
    "BatchedNDDR",
    "DeployBackbone",
    "FoldedBlock",
    "FoldedPath",
    "deploy",
    "deploy_backbone",
    "fold",
    "fold_sequences",
    "modulated_weight",
    "stack_backbone",
    "stack_convs",
    "stack_fusion",
]


@torch.no_grad()
def deploy(model: MultiTaskNet, shared_stem: bool | None = None, batched: bool = False) -> MultiTaskNet:
    """The inference-only deploy form of ``model`` (see the module docstring): a new MultiTaskNet with
    the same tasks, heads and fusion, in eval mode, no parameter requiring a gradient.

    ``batched``: a ``BatchedMultiTaskNet`` running all tasks' backbone convs and NDDR fusion as grouped
    convs over one stacked tensor (no effect on a ``SharedBackbone``: there is only one network)."""
    was_training = model.training
    model.eval()
    try:
        run = model.fusion.required(model.task_names) if model.fusion is not None else list(model.task_names)
        backbone = deploy_backbone(model.backbone, run, shared_stem)
        heads = {name: copy.deepcopy(head) for name, head in model.heads.items()}
        fusion = copy.deepcopy(model.fusion)
    finally:
        model.train(was_training)
    for head in heads.values():
        fold_sequences(head)
    if fusion is not None:
        fold_sequences(fusion)
    if batched and isinstance(backbone, DeployBackbone):
        folded: MultiTaskNet = BatchedMultiTaskNet(
            model.tasks, stack_backbone(backbone, run), heads, None if fusion is None else stack_fusion(fusion, run)
        )
    else:
        folded = MultiTaskNet(model.tasks, backbone, heads, fusion)
    folded.frozen = set(model.frozen)
    folded.requires_grad_(False)
    return folded.eval()
