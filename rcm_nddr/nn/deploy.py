"""The deploy form of a MultiTaskNet: inference only, with every BatchNorm folded into its conv and each
task's modulators (RC) or residual adapters (RA series and parallel) folded into the filter bank
(``rcm_nddr.nn.folding``), so a task costs what a plain network of the same architecture (ResNet or VGG-16)
costs; optionally with all tasks batched into grouped convs (``rcm_nddr.nn.batched``).

``deploy(model)`` returns a new module (the training form is left as it was) whose outputs equal the
training form's in eval mode up to float rounding. By default the tasks run one after another (one conv
call per task and conv, fusion stage by stage), the stem's shared response computed once when several
tasks read the same image. With ``batched=True`` it is a ``BatchedMultiTaskNet`` over one stacked tensor
(NDDR as one conv per stage, cross-stitch unit by unit on the stack); with one ``SharedBackbone`` (hard
sharing) there is nothing to batch and ``batched`` has no effect."""

from __future__ import annotations

import copy

import torch

from rcm_nddr.nn.batched import (
    BatchedBackbone,
    BatchedMultiTaskNet,
    BatchedNDDR,
    BatchedVGG,
    StackedFusion,
    stack_backbone,
    stack_convs,
    stack_fusion,
)
from rcm_nddr.nn.folding import (
    CentredResponse,
    DeployBackbone,
    FoldedBlock,
    FoldedPath,
    FoldedVGG,
    deploy_backbone,
    fold,
    fold_sequences,
    modulated_weight,
    stem_weights,
    task_weights,
)
from rcm_nddr.nn.multitask import MultiTaskNet

__all__ = [
    "BatchedBackbone",
    "BatchedMultiTaskNet",
    "BatchedNDDR",
    "BatchedVGG",
    "CentredResponse",
    "DeployBackbone",
    "FoldedBlock",
    "FoldedPath",
    "FoldedVGG",
    "StackedFusion",
    "deploy",
    "deploy_backbone",
    "fold",
    "fold_sequences",
    "modulated_weight",
    "stack_backbone",
    "stack_convs",
    "stack_fusion",
    "stem_weights",
    "task_weights",
]


@torch.no_grad()
def deploy(model: MultiTaskNet, shared_stem: bool | None = None, batched: bool = False) -> MultiTaskNet:
    """The inference-only deploy form of ``model`` (see the module docstring): a new MultiTaskNet with
    the same tasks, heads and fusion, in eval mode, no parameter requiring a gradient.

    ``shared_stem`` (RC and residual adapters; default: when two or more tasks run): the stem's shared
    response computed once, each task's stem a folded 1x1 conv on it.

    ``batched``: a ``BatchedMultiTaskNet`` running all tasks' backbone convs as grouped convs over one
    stacked tensor, NDDR fusion as one conv per stage and any other stage fusion on the stack (no effect on
    a ``SharedBackbone``: there is only one network)."""
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
