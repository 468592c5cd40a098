"""``train.py``, ``test.py``, ``rcm-nddr pretrain`` and ``rcm-nddr data synth``: run a config's training,
evaluation or pretraining (under ``torchrun`` too), or render SYNTH_MT."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator

from rcm_nddr.config import Config, load_config
from rcm_nddr.data.synthetic import generate
from rcm_nddr.engine import distributed
from rcm_nddr.engine.pretrain import pretrain as pretrain_bank
from rcm_nddr.engine.run import RunPaths
from rcm_nddr.engine.signals import TrainingInterrupted
from rcm_nddr.engine.tester import run_test
from rcm_nddr.engine.trainer import Trainer, stored_group
from rcm_nddr.errors import UserError

log = logging.getLogger("rcm_nddr")


@contextlib.contextmanager
def _process_group(device: str) -> Iterator[None]:
    """Under ``torchrun``: join the process group for the command, and let only rank 0 log below
    warnings (one process prints progress, the others stay quiet)."""
    ctx = distributed.init_from_environment(device)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        yield
    finally:
        distributed.shutdown()


class AlreadyRegisteredError(UserError):
    """``--resume`` of a group the store already registers."""

    same_on_every_rank = True  # every process reads the same store and checkpoint


def _registered_before(cfg: Config, auto: bool) -> bool:
    """Whether a resumed run's group is registered already by this very run (a requeued ``--auto-resume``
    job whose run had ended: nothing to do). ``--resume`` of such a run, and resuming into a store that
    registers the group's names otherwise, are refused before anything is built."""
    records, ours = stored_group(cfg)
    if not records:
        return False
    group = records[0].group
    if ours and auto:
        log.info(
            "group %s is already registered in %s (group %d) by this run: nothing to do",
            cfg.group_name,
            cfg.store,
            group,
        )
        return True
    if ours:
        raise AlreadyRegisteredError(
            f"--resume: group {cfg.group_name!r} has ended and is registered in the store {cfg.store} (group {group}); "
            "there is nothing to resume (retrain it with --replace instead)"
        )
    names = ", ".join(f"'{r.name}' (group {r.group})" for r in records)
    raise AlreadyRegisteredError(
        f"{'--auto-resume' if auto else '--resume'}: the store {cfg.store} already registers {names}, not from this "
        f"run's checkpoint with this config; add --replace to replace them with this run's, or train into another store"
    )


def train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    distributed.check_global_batch(cfg, distributed.launched_world_size())
    resume = args.resume or (args.auto_resume and RunPaths.of(cfg).last.is_file())
    with _process_group(cfg.train.device):
        # --auto-resume of a run that ended: its checkpoints are gone unless train.keep_checkpoints
        if (resume or args.auto_resume) and not args.replace and _registered_before(cfg, auto=args.auto_resume):
            return 0
        trainer = Trainer(cfg, resume=resume, overwrite=args.overwrite, progress=not args.quiet, replace=args.replace)
        try:
            trainer.run()
        except TrainingInterrupted as stop:
            log.warning("%s", stop)
            return stop.exit_code
    log.info("run written to %s, checkpoints in %s", trainer.paths.run, trainer.paths.checkpoints)
    return 0


def test(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    with _process_group(cfg.train.device):
        run_test(
            cfg,
            split=args.split,
            checkpoint=args.checkpoint,
            log_performance=args.log_performance,
            progress=not args.quiet,
            save_predictions=args.save_predictions,
            baselines=args.baselines,
            form=args.form,
            precision=args.precision,
        )
    return 0


def pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    pretrain_bank(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    return 0


class SynthError(UserError):
    """Bad ``rcm-nddr data synth`` arguments, or an ``--out`` that holds something else."""


def data_synth(args: argparse.Namespace) -> int:
    try:
        out = generate(args.out, args.train, args.val, size=tuple(args.size), seed=args.seed, progress=not args.quiet)
    except (ValueError, FileExistsError) as exc:
        raise SynthError(str(exc)) from exc
    log.info("SYNTH_MT written to %s", out)
    return 0
