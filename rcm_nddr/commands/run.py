"""``train.py``, ``test.py``, ``rcm-nddr pretrain`` and ``rcm-nddr data synth``: run a config's training,
evaluation or pretraining (under ``torchrun`` too), or render SYNTH_MT."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator

from rcm_nddr.config import load_config
from rcm_nddr.data.synthetic import generate
from rcm_nddr.engine import distributed
from rcm_nddr.engine.pretrain import pretrain as pretrain_bank
from rcm_nddr.engine.run import RunPaths
from rcm_nddr.engine.signals import TrainingInterrupted
from rcm_nddr.engine.tester import run_test
from rcm_nddr.engine.trainer import Trainer
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


def train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    resume = args.resume or (args.auto_resume and RunPaths.of(cfg).last.is_file())
    with _process_group(cfg.train.device):
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
