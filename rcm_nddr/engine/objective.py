"""Build the group objective of a run from ``loss.weighting`` and ``loss.consistency``: the weighting with
its options checked, the consistency terms' transfer nets, the stored tasks they read, and the shared
parameters gradient methods need. Every mistake is a ConfigError naming the key, raised before the run
writes anything."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rcm_nddr.config import Config, ConfigError
from rcm_nddr.objectives import (
    WEIGHTINGS,
    ConsistencyTerm,
    GroupObjective,
    StepContext,
    shared_layers,
    shared_parameters,
    task_reach,
)
from rcm_nddr.registry import RegistryError, options_error
from rcm_nddr.store import ModelStore
from rcm_nddr.task import Task

log = logging.getLogger(__name__)

#: keys of ``loss.weighting`` that are not options of the method
GENERAL_KEYS = ("type", "lr", "weight_decay")


@dataclass
class BuiltObjective:
    """The objective and what each step's ``StepContext`` carries: the shared parameters and the layer."""

    objective: GroupObjective
    shared: list[nn.Parameter]
    layer: list[nn.Parameter]

    def context(
        self,
        iteration: int,
        forward: Callable[[], Mapping[str, Tensor]] | None = None,
        targets: Mapping[str, Tensor] | None = None,
        images: Tensor | None = None,
        modules: Sequence[nn.Module] = (),
    ) -> StepContext:
        """The ``StepContext`` of step ``iteration``. For a weighting that recomputes its losses after the
        optimizer step, ``forward()`` runs the network on the step's batch again (``targets``, ``images``);
        that pass changes no BatchNorm statistics of ``modules`` or of the objective."""
        recompute = None
        if self.objective.weighting.needs_recompute and forward is not None and targets is not None:

            def recompute() -> Tensor:
                with torch.no_grad(), batchnorm_statistics_kept(*modules, self.objective):
                    return self.objective.losses(forward(), targets, images)[0]

        return StepContext(shared=self.shared, layer=self.layer, recompute=recompute, iteration=iteration)


#: the BatchNorm layers whose running statistics a recomputing pass must leave as they were
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextmanager
def batchnorm_statistics_kept(*modules: nn.Module) -> Iterator[None]:
    """Run a training-mode pass without changing the running statistics of the BatchNorm layers of
    ``modules`` (they are restored afterwards)."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, _BATCHNORMS) and m.training]
    saved = [[b.clone() for b in m.buffers()] for m in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, values in zip(layers, saved, strict=True):
                for buffer, value in zip(m.buffers(), values, strict=True):
                    buffer.copy_(value)


def build_objective(
    cfg: Config,
    tasks: dict[str, Task],
    weights: dict[str, float],
    model: nn.Module,
    store: ModelStore | None,
    device: torch.device,
    iterations_per_epoch: int,
    distributed: bool,
) -> BuiltObjective:
    """The run's group objective (see the module docstring)."""
    spec = cfg.weighting

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{cfg.source}: key '{key}': {message}")

    try:
        cls = WEIGHTINGS.get(spec["type"])
    except RegistryError as exc:
        raise fail("loss.weighting.type", f"{exc} (a plug-in's weightings need its module under 'plugins:')") from exc
    options = {k: v for k, v in spec.items() if k not in GENERAL_KEYS}
    accepted = _parameters(cls)
    if "period" in accepted and "period" not in options:
        options["period"] = iterations_per_epoch
    error = options_error(cls, (tasks, weights), options)
    if error:
        raise fail("loss.weighting", f"{spec['type']}: {error}")
    try:
        weighting = cls(tasks, weights, **options)
    except (ValueError, TypeError) as exc:
        raise fail("loss.weighting", f"{spec['type']}: {exc}") from exc
    if distributed and cls.not_distributed:
        raise fail("loss.weighting.type", f"{spec['type']} cannot train under torchrun: {cls.not_distributed}")
    if cfg.train.compile and cls.not_compiled:
        raise fail("loss.weighting.type", f"{spec['type']} cannot train with train.compile: {cls.not_compiled}")
    terms, stored = _consistency(cfg, tasks, store, device, fail)
    built = BuiltObjective(GroupObjective(tasks, weighting, terms, stored).to(device), [], [])
    if cls.needs_shared or cls.needs_layer:
        _find_shared(built, model, list(tasks), device, spec, fail)
    return built


def _parameters(cls: type) -> set[str]:
    return set(inspect.signature(cls).parameters)


def _consistency(cfg: Config, tasks: dict[str, Task], store: ModelStore | None, device: torch.device, fail):
    """The consistency terms and the frozen model of the stored tasks they read (None when none)."""
    items = cfg.consistency
    if not items:
        return [], None
    stored_names = [r.name for r in store.tasks] if store is not None and store.exists else []
    needed = []
    for i, item in enumerate(items):
        for part in ("source", "target"):
            name = getattr(item, part)
            if name not in tasks and name not in stored_names:
                known = list(tasks) + [n for n in stored_names if n not in tasks]
                raise fail(
                    f"loss.consistency[{i}].{part}",
                    f"{name!r} is neither a task of the group nor a stored task (known: {known})",
                )
            if name not in tasks and name not in needed:
                needed.append(name)
    stored = None
    if needed:
        stored = store.load_model(tasks=needed, device=device, allow_plugins=cfg.plugins)
        for p in stored.parameters():
            p.requires_grad_(False)
    all_tasks = {**(stored.tasks if stored is not None else {}), **tasks}
    terms = []
    for i, item in enumerate(items):
        key = f"loss.consistency[{i}]"
        target = all_tasks[item.target]
        accepted = tuple(getattr(target, "transfer_losses", ()))
        if not accepted:
            raise fail(
                f"{key}.target",
                f"task type {type(target).__name__} of {item.target!r} has no transfer net "
                "(it declares no transfer_losses)",
            )
        if item.loss not in accepted:
            raise fail(
                f"{key}.loss",
                f"{item.loss!r} is not a transfer loss of {item.target!r} (it accepts: {', '.join(accepted)})",
            )
        if item.target not in tasks and item.supervise != "prediction":
            raise fail(
                f"{key}.supervise",
                f"{item.target!r} is a stored task: its labels are not loaded; use supervise: prediction",
            )
        if item.source not in tasks and item.target not in tasks:
            raise fail(key, "both tasks are stored: the term would train nothing")
        attach = item.target if item.target in tasks else item.source
        terms.append(
            ConsistencyTerm(
                item.source,
                item.target,
                all_tasks[item.source].out_channels,
                target,
                item.loss,
                item.weight,
                supervise=item.supervise,
                detach_target=item.detach_target,
                mix=item.mix,
                attach=attach,
                batch_norm=item.batch_norm,
                wider=item.wider,
            )
        )
    return terms, stored


def _find_shared(built: BuiltObjective, model: nn.Module, names: list[str], device, spec, fail) -> None:
    """Fill ``built.shared`` (parameters more than one task reaches) and ``built.layer`` (GradNorm's layer:
    ``loss.weighting.layer`` or the last module every task reaches)."""
    kind = spec["type"]
    if len(names) < 2:
        raise fail("loss.weighting.type", f"{kind} balances several tasks; this group has one ({names[0]})")
    reach = task_reach(model, names, device)
    by_name = dict(model.named_parameters())
    shared = shared_parameters(model, reach)
    if not shared:
        raise fail(
            "loss.weighting.type",
            f"{kind} needs trainable parameters that more than one task's loss reaches, and the tasks of this group "
            "share none (fusion.type: none keeps their paths apart; use fusion.type: nddr)",
        )
    built.shared = [by_name[n] for n in shared]
    if not built.objective.weighting.needs_layer:
        return
    layers = shared_layers(model, reach)
    named = spec.get("layer")
    if named is None:
        if not layers:
            raise fail(
                "loss.weighting.layer",
                f"{kind} needs a layer whose parameters every task's loss reaches; this group has none",
            )
        named = layers[-1]
        log.info("%s balances the gradients at %s (the last layer every task reaches)", kind, named)
    elif named not in layers:
        modules = dict(model.named_modules())
        why = "no such module" if named not in modules else "not every task's loss reaches its parameters"
        raise fail("loss.weighting.layer", f"{named!r}: {why}; layers every task reaches: {layers[-5:] or 'none'}")
    module = dict(model.named_modules())[named]
    built.layer = [p for p in module.parameters(recurse=False) if p.requires_grad]
