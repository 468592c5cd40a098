"""What the NDDR probe scripts share (nddr_gradient_shares.py, nddr_init_check.py): the command line of a
group config and a number of training batches, and the group's trainer built in a scratch store."""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from rcm_nddr.config import load_config
from rcm_nddr.engine.trainer import Trainer


def parse(doc: str, *extra: tuple[str, dict]) -> argparse.Namespace:
    """``--config``, ``--batches``, ``--set`` and the ``extra`` (flag, add_argument keywords) options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a config of a group of several tasks with NDDR")
    for flag, options in extra:
        parser.add_argument(flag, **options)
    parser.add_argument("--batches", type=int, default=4, help="training batches to average over")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    return args


@contextmanager
def group_trainer(args: argparse.Namespace) -> Iterator[Trainer]:
    """The trainer of ``args.config`` (with ``args.overrides``) in a store that is removed afterwards."""
    with tempfile.TemporaryDirectory() as scratch:
        cfg = load_config(args.config, [f"store={scratch}", "train.num_workers=0", *args.overrides])
        yield Trainer(cfg, progress=False)
