"""The ``rcm-nddr`` console script (= ``python -m rcm_nddr``) and the ``train.py``/``test.py`` entry points:
parse the arguments, then import and run the function the chosen command names (so that ``--help`` and
argument errors never wait for PyTorch), reporting bad input in one ``error:`` line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from rcm_nddr.commands import arguments as a
from rcm_nddr.errors import UserError


def run_command(args: argparse.Namespace) -> int:
    """Set up logging, run the handler ``args`` names, and report bad input in one ``error:`` line (exit 2)."""
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module, _, function = args.handler.partition(":")
    try:
        handler = getattr(importlib.import_module(module), function)
        with logging_redirect_tqdm():
            return handler(args)
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=a.HelpFormatter)


def train_parser() -> argparse.ArgumentParser:
    return a.add_train_arguments(_parser("train.py", "Train the task group of a config and register it in its store."))


def test_parser() -> argparse.ArgumentParser:
    return a.add_test_arguments(_parser("test.py", "Evaluate the trained task group of a config."))


def train_main(argv: Sequence[str] | None = None) -> int:
    return run_command(train_parser().parse_args(argv))


def test_main(argv: Sequence[str] | None = None) -> int:
    return run_command(test_parser().parse_args(argv))


def decomp_parser() -> argparse.ArgumentParser:
    return _parser(
        "python -m decomp",
        "Decompose the pre-BN responses of every reparameterized conv of a pretrained ResNet (streaming mean "
        "and covariance, float64) for response initialization.",
    )


def decomp_main(argv: Sequence[str] | None = None) -> int:
    p = decomp_parser()
    a.add_decomp_arguments(p)
    args = p.parse_args(argv)
    a.check_decomp_arguments(p, args)
    return run_command(args)


def parser() -> argparse.ArgumentParser:
    p = _parser("rcm-nddr", "Incremental multi-task dense prediction.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    a.add_data_arguments(sub)
    a.add_pretrain_arguments(sub)
    a.add_demo_arguments(sub)
    a.add_train_arguments(a.command_parser(sub, "train", "train the task group of a config (= python train.py)"))
    a.add_test_arguments(a.command_parser(sub, "test", "evaluate a trained task group (= python test.py)"))
    a.add_store_arguments(sub)
    a.add_predict_arguments(
        a.command_parser(sub, "predict", "run stored tasks on images: PNG visualizations and .npy outputs per task")
    )
    a.add_evaluate_arguments(
        a.command_parser(sub, "evaluate", "score saved predictions (.png/.npy files) against a dataset split")
    )
    a.add_bench_arguments(
        a.command_parser(sub, "bench", "speed: deploy form and RC training vs plain networks; bench decomp|scaling")
    )
    a.add_docker_arguments(
        a.command_parser(sub, "docker", "build the Docker image; run train.py/test.py in a container")
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
