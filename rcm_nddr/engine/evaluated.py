"""The network ``test.py`` evaluates: the task group as the model store registers it (what ``rcm-nddr predict``
runs) or, for a run that has not registered it yet or when a checkpoint is asked for, the run's checkpoint;
in the deploy form (checked on the probe input) or the training form."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from rcm_nddr.config import Config, ConfigError
from rcm_nddr.engine.builders import build_model
from rcm_nddr.engine.checkpoint import load_checkpoint, load_model_state
from rcm_nddr.engine.plan import GroupPlan
from rcm_nddr.engine.run import RunPaths
from rcm_nddr.errors import UserError
from rcm_nddr.nn.assembly import probe_input, probe_outputs
from rcm_nddr.nn.deploy import deploy
from rcm_nddr.nn.multitask import MultiTaskNet
from rcm_nddr.nn.precision import precision_of
from rcm_nddr.store import ModelStore, StoreError, TaskRecord
from rcm_nddr.store.integrity import compare_probe
from rcm_nddr.store.loading import calibration_batches, reduce_precision
from rcm_nddr.task import Task

log = logging.getLogger(__name__)

#: the forms ``test.py --form`` evaluates
FORMS = ("deploy", "training")

#: how a store record names the checkpoint its tensors were taken from (``Trainer.register``)
_RECORDED = re.compile(r"^(best|last) \(iteration (\d+)\)$")


class DeployCheckError(UserError):
    """The deploy form of a checkpoint's network does not reproduce the training form on the probe input."""


@dataclass
class Evaluated:
    """What ``test.py`` evaluates: ``model`` in ``form``, its weights from ``source`` (the store's path, or
    the checkpoint file), the checkpoint ``which`` (best or last) at ``iteration``, ``group`` the store's
    group number when the weights are the store's (else None)."""

    model: MultiTaskNet
    form: str
    source: str
    which: str
    iteration: int | None
    group: int | None = None
    precision: str = "fp32"


def registered_group(cfg: Config) -> list[TaskRecord] | None:
    """The store's records of the config's tasks when the store registers exactly this group (all its
    tasks, registered together), else None."""
    store = ModelStore(cfg.store)
    if not store.exists:
        return None
    records = store.tasks
    mine = [r for r in records if r.name in cfg.tasks]
    if len(mine) != len(cfg.tasks) or len({r.group for r in mine}) != 1:
        return None
    together = [r.name for r in records if r.group == mine[0].group]
    return mine if sorted(together) == sorted(cfg.tasks) else None


def recorded_checkpoint(record: TaskRecord) -> tuple[str | None, int | None]:
    """Which checkpoint (best or last) and iteration a record's tensors were registered from."""
    match = _RECORDED.match(str(record.metrics.get("checkpoint", "")))
    return (match.group(1), int(match.group(2))) if match else (None, None)


def evaluated_network(
    cfg: Config, tasks: dict[str, Task], which: str, explicit: bool, form: str, precision: str = "fp32"
) -> Evaluated:
    """The network of the config's group that ``test.py`` evaluates, on the CPU, in eval mode.

    Its weights: the store's tasks when the store registers the group from the ``which`` checkpoint and
    ``explicit`` is false (the run may have kept no checkpoint); else the run's ``which`` checkpoint
    (``explicit``: ``--checkpoint`` was given). ``form``: ``deploy`` (``rcm_nddr.nn.deploy``), checked on the
    probe input against the recorded outputs (store) or the training form (checkpoint); ``training``: the
    network as trained. ``precision`` (of the deploy form, ``rcm_nddr.nn.precision``): its probe check holds
    it to the precision's tolerance; int8 is calibrated on the store's calibration set."""
    if form not in FORMS:
        raise ConfigError(f"form {form!r}: expected one of {', '.join(FORMS)}")
    precision = precision_of(precision)
    if precision != "fp32" and form != "deploy":
        raise ConfigError(f"precision {precision}: a precision of the deploy form, not of the {form} form")
    paths = RunPaths.of(cfg)
    ckpt_path = paths.best if which == "best" else paths.last
    records = registered_group(cfg)
    recorded = recorded_checkpoint(records[0]) if records else (None, None)
    if records and recorded[0] == which and not explicit:
        store = ModelStore(cfg.store)
        model = store.load_model(
            tasks=list(cfg.tasks), deploy=form == "deploy", allow_plugins=cfg.plugins, precision=precision
        )
        log.info(
            "evaluating group %d of %s (%s checkpoint, iteration %s) in the %s form, %s",
            records[0].group,
            store.path,
            which,
            recorded[1],
            form,
            precision,
        )
        return Evaluated(model, form, str(store.path), which, recorded[1], records[0].group, precision)
    if not ckpt_path.is_file():
        if records:
            raise FileNotFoundError(
                f"the store {cfg.store} registers group {cfg.group_name!r} from its {recorded[0]} checkpoint, and "
                f"the run kept no {which} checkpoint at {ckpt_path} (train.keep_checkpoints): evaluate the "
                f"registered one (test.checkpoint: {recorded[0]}, without --checkpoint)"
            )
        raise FileNotFoundError(
            f"no {which} checkpoint at {ckpt_path} and the store {cfg.store} does not register group "
            f"{cfg.group_name!r}: train this config first (python train.py --config {cfg.source})"
        )
    other = "last" if which == "best" else "best"
    again = f"train the group again (train.py --replace), or evaluate the {other} checkpoint (--checkpoint {other})"
    state = load_checkpoint(ckpt_path, remedy=again)
    # The network the run trained: its group, and the stored tasks it read (from the store, frozen).
    store = ModelStore(cfg.store)
    plan = GroupPlan.from_dict(state["plan"]) if "plan" in state else GroupPlan()
    model = build_model(cfg, tasks, store=store if store.exists else None, plan=plan, for_checkpoint=True)
    load_model_state(model, state, ckpt_path, again)  # with the bank and stored tasks the checkpoint left out
    model.requires_grad_(False)
    model.eval()
    if form == "deploy":
        model = checked_deploy(model, str(ckpt_path), precision, store)
    log.info("evaluating %s (iteration %d) in the %s form, %s", ckpt_path, state["iteration"], form, precision)
    return Evaluated(model, form, str(ckpt_path), which, state["iteration"], None, precision)


def checked_deploy(
    model: MultiTaskNet, what: str, precision: str = "fp32", store: ModelStore | None = None
) -> MultiTaskNet:
    """The deploy form of ``model`` in ``precision`` (int8 calibrated on ``store``'s calibration set), which
    must reproduce its outputs on the probe input (within the tolerances of the store's probe check), else
    DeployCheckError naming the tasks that differ."""
    folded = deploy(model)
    images = probe_input()
    expected = probe_outputs(model, list(model.task_names), images)

    def check(tested: MultiTaskNet, form: str, tolerance: str, remedy: str) -> None:
        actual = probe_outputs(tested, list(model.task_names), images)
        problems = [compare_probe(actual[n], expected[n], n, Path(what), tolerance) for n in model.task_names]
        problems = [p for p in problems if p]
        if problems:
            raise DeployCheckError(
                f"the {form} of {what} does not reproduce its training form: {'; '.join(problems)} "
                f"(evaluate it with {remedy})"
            )

    check(folded, "deploy form", "fp32", "--form training")
    reduced = reduce_precision(folded, precision, None if store is None else lambda: _store_calibration(store))
    if reduced is not folded:
        check(reduced, f"{precision} deploy form", precision, "--precision fp32")
    return reduced


def _store_calibration(store: ModelStore) -> list:
    images = store.calibration_images() if store.exists else None
    if images is None:
        raise StoreError(f"int8 needs the calibration set of the store {store.path}, which keeps none")
    return calibration_batches(images)
