"""Group objectives: how a training group's outputs and targets become the gradients of one step.

A ``GroupObjective`` sees every task's raw output and target of the group. It adds the cross-task
consistency terms (``loss.consistency``: transfer nets mapping one task's prediction to another's) to the
tasks' own losses, and hands the task losses to a loss ``Weighting`` (``loss.weighting``), which turns them
into gradients: a fixed weighted sum, learned weights (uncertainty), gradient balancing (GradNorm),
loss-ratio weights (DWA), gradient surgery (PCGrad) or an O(1) balancing method (FAMO). Weightings are
built by name from the ``WEIGHTINGS`` registry (plug-ins add their own with
``@WEIGHTINGS.register("name")``)."""

from rcm_nddr.objectives import dwa, famo, fixed, gradnorm, pcgrad, uncertainty  # noqa: F401 - register the built-ins
from rcm_nddr.objectives.consistency import ConsistencyTerm
from rcm_nddr.objectives.objective import GroupObjective
from rcm_nddr.objectives.shared import shared_layers, shared_parameters, task_reach
from rcm_nddr.objectives.transfer import TaskTransferNet
from rcm_nddr.objectives.weighting import WEIGHTINGS, StepContext, Weighting

__all__ = [
    "WEIGHTINGS",
    "ConsistencyTerm",
    "GroupObjective",
    "StepContext",
    "TaskTransferNet",
    "Weighting",
    "shared_layers",
    "shared_parameters",
    "task_reach",
]
