"""The ``rcm-nddr`` console script (= ``python -m rcm_nddr``) and the ``train.py``/``test.py`` entry points:
parse the arguments, then import and run the function the chosen command names (so that ``--help`` and
argument errors never wait for PyTorch), reporting bad input in one ``error:`` line.

Exit statuses, the same for every command (docs/training.md, "Exit codes"): 0 success; 1 problems found
(``rcm-nddr store verify``); 2 bad input or a refusal (a UserError, an argument error, a path the machine
cannot read or write); 130 interrupted (SIGINT), 143 stopped by SIGTERM (training writes its checkpoint
first); 70 an internal error (a bug, reported with its traceback)."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from rcm_nddr.commands import arguments as a
from rcm_nddr.commands import tool_arguments as tools
from rcm_nddr.errors import UserError

#: bad input or a refusal; an internal error (sysexits' EX_SOFTWARE); interrupted (128 + SIGINT)
EXIT_USER_ERROR, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED = 2, 70, 130

#: OSErrors of the machine or of a path the user gave, reported in one line (exit 2), with what to do;
#: any other OSError is a bug and gets a traceback
OS_ERROR_HINTS = {
    errno.ENOSPC: "the disk is full: free space there and run the command again (train.py --auto-resume "
    "continues from the last checkpoint, if there is one)",
    errno.EDQUOT: "the disk quota is exhausted: free space there and run the command again",
    errno.EROFS: "the file system is mounted read-only: use a writable directory",
    errno.EACCES: "this user may not write or read there: fix the permissions or use another directory",
    errno.EPERM: "this user may not write or read there: fix the permissions or use another directory",
    errno.EIO: "the disk or the network file system failed",
    errno.ENOENT: "",
    errno.ENOTDIR: "",
    errno.EISDIR: "",
    errno.EEXIST: "",
    errno.ENAMETOOLONG: "",
}


def os_error_line(exc: OSError) -> str | None:
    """``exc`` in one line (path, cause, what to do) when the machine or a path the user gave caused it;
    None when it is a bug."""
    if exc.errno is None:  # raised with a message of its own, e.g. "--resume: no checkpoint to resume from at ..."
        return str(exc) if isinstance(exc, (FileNotFoundError, FileExistsError)) else None
    if exc.errno not in OS_ERROR_HINTS:
        return None
    where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else exc.filename
    hint = OS_ERROR_HINTS[exc.errno]
    return f"{f'{where}: ' if where is not None else ''}{exc.strerror or exc}{f'; {hint}' if hint else ''}"


#: seconds a process other than rank 0 waits before exiting with an error rank 0 reports: torchrun stops
#: every process as soon as one exits, and rank 0 must get to print the error first
QUIET_RANK_WAIT_S = 5.0


def _one_line(message: str) -> str:
    """An error re-raised from a DataLoader worker carries the worker's traceback in its message: the last
    line of that is the error itself."""
    if "\nOriginal Traceback (most recent call last):" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _report(exc: UserError) -> None:
    """Print ``exc`` in one ``error:`` line. Under torchrun an error every process raises alike is printed
    by rank 0 alone, while the other processes wait for it to exit first."""
    if exc.same_on_every_rank and os.environ.get("RANK", "0") != "0":
        time.sleep(QUIET_RANK_WAIT_S)
    else:
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)


def run_command(args: argparse.Namespace) -> int:
    """Set up logging, run the handler ``args`` names and turn what ends it into the exit status: bad input
    in one ``error:`` line (2), an interruption (130), a bug with its traceback (70)."""
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format=a.LOG_FORMAT,
        datefmt=a.LOG_DATEFMT,
    )
    module, _, function = args.handler.partition(":")
    try:
        handler = getattr(importlib.import_module(module), function)
        with logging_redirect_tqdm():
            return handler(args)
    except KeyboardInterrupt as exc:
        print("interrupted", file=sys.stderr)
        return _released(exc, EXIT_INTERRUPTED)
    except Exception as exc:
        return _released(exc, _report_failure(exc))


def _report_failure(exc: Exception) -> int:
    """Report what ended a command; returns its exit status."""
    if isinstance(exc, UserError):
        _report(exc)
        return EXIT_USER_ERROR
    line = os_error_line(exc) if isinstance(exc, OSError) else None
    if line is not None:
        print(f"error: {_one_line(line)}", file=sys.stderr)
        return EXIT_USER_ERROR
    traceback.print_exception(exc, file=sys.stderr)
    print(
        f"internal error: {type(exc).__name__}: {exc} (a bug: please report it with the traceback above)",
        file=sys.stderr,
    )
    return EXIT_INTERNAL_ERROR


def _released(exc: BaseException, status: int) -> int:
    """``status``, once the failed command's frames have let go of what they held: DataLoader workers ignore
    SIGTERM, and multiprocessing would wait for them forever at exit if a reference cycle through the
    exception kept their loader alive until then."""
    traceback.clear_frames(exc.__traceback__)
    return status


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
    tools.add_decomp_arguments(p)
    args = p.parse_args(argv)
    tools.check_decomp_arguments(p, args)
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
    tools.add_bench_arguments(
        a.command_parser(sub, "bench", "speed: deploy form and RC training vs plain networks; bench decomp|scaling")
    )
    tools.add_docker_arguments(
        a.command_parser(sub, "docker", "build the Docker image; run train.py/test.py in a container")
    )
    tools.add_study_arguments(
        a.command_parser(sub, "study", "run a study (variants x tasks x a grid, e.g. seeds) and aggregate it")
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
