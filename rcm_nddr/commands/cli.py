"""The ``rcm-nddr`` console script (also ``python -m rcm_nddr``) and the ``train.py``/``test.py`` entry points."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("rcm_nddr")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by bad input: reported in one line, without a traceback."""
    from rcm_nddr.commands.docker import DockerError
    from rcm_nddr.commands.evaluate import EvaluateError
    from rcm_nddr.commands.predict import PredictError
    from rcm_nddr.config import ConfigError
    from rcm_nddr.data.folder import DatasetError
    from rcm_nddr.decomp import DecompositionError
    from rcm_nddr.engine.saved import PredictionError
    from rcm_nddr.engine.trainer import NonFiniteLossError, RunExistsError
    from rcm_nddr.nn.backbone import WeightsError
    from rcm_nddr.registry import RegistryError
    from rcm_nddr.store import StoreError

    return (
        ConfigError,
        DatasetError,
        DecompositionError,
        WeightsError,
        RegistryError,
        RunExistsError,
        NonFiniteLossError,
        PredictError,
        PredictionError,
        EvaluateError,
        StoreError,
        DockerError,
        FileNotFoundError,
    )


def run_command(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Set up logging, run ``main(args)``, and report bad input in one ``error:`` line (exit 2)."""
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        with logging_redirect_tqdm():
            return main(args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/synthetic/semseg_single_task.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.max_iters=100 (repeatable)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="debug logging")


# ----------------------------------------------------------------------------- train.py / test.py


@contextlib.contextmanager
def _process_group(device: str) -> Iterator[None]:
    """Under ``torchrun``: join the process group for the command, and let only rank 0 log below
    warnings (one process prints progress, the others stay quiet)."""
    from rcm_nddr.engine import distributed

    ctx = distributed.init_from_environment(device)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        yield
    finally:
        distributed.shutdown()


def _train(args: argparse.Namespace) -> int:
    from rcm_nddr.config import load_config
    from rcm_nddr.engine.trainer import RunPaths, Trainer, TrainingInterrupted

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


def _add_train_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_config_args(p)
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    resume.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue from the last checkpoint when there is one, else start (for jobs that are requeued)",
    )
    p.add_argument("--overwrite", action="store_true", help="start over even if the run has checkpoints")
    p.add_argument(
        "--replace",
        action="store_true",
        help="retrain tasks the store already registers, starting over (refused while other tasks read them)",
    )
    p.set_defaults(func=_train)
    return p


def train_parser() -> argparse.ArgumentParser:
    return _add_train_args(argparse.ArgumentParser(prog="train.py", description="Train the task group of a config."))


def train_main(argv: Sequence[str] | None = None) -> int:
    return run_command(_train, train_parser().parse_args(argv))


def _test(args: argparse.Namespace) -> int:
    from rcm_nddr.config import load_config
    from rcm_nddr.engine.tester import run_test

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


def _add_test_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_config_args(p)
    p.add_argument("--split", help="split to evaluate (default: dataset.val_split)")
    p.add_argument("--checkpoint", choices=["best", "last"], help="which checkpoint (default: test.checkpoint)")
    p.add_argument("--log-performance", metavar="CSV", help="append one row per task to this CSV file")
    p.add_argument(
        "--save-predictions",
        metavar="DIR",
        help="also write every prediction to DIR/<task>/<sample id>.png|.npy (what `rcm-nddr evaluate` reads)",
    )
    p.add_argument(
        "--baselines",
        metavar="STORE_OR_JSON",
        help="single-task results (a model store or a JSON file) for Delta_MTL (default: test.baselines)",
    )
    p.set_defaults(func=_test)
    return p


def test_parser() -> argparse.ArgumentParser:
    return _add_test_args(argparse.ArgumentParser(prog="test.py", description="Evaluate the trained task group."))


def test_main(argv: Sequence[str] | None = None) -> int:
    return run_command(_test, test_parser().parse_args(argv))


# ----------------------------------------------------------------------------- rcm-nddr


def _data_synth(args: argparse.Namespace) -> int:
    from rcm_nddr.data.synthetic import generate

    try:
        out = generate(args.out, args.train, args.val, size=tuple(args.size), seed=args.seed, progress=not args.quiet)
    except (ValueError, FileExistsError) as exc:  # bad arguments, or --out holds something else
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("SYNTH_MT written to %s", out)
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from rcm_nddr.config import load_config
    from rcm_nddr.engine.pretrain import pretrain

    cfg = load_config(args.config, args.overrides)
    pretrain(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rcm_nddr.commands.demo import run_demo

    run_demo(
        out=args.out,
        data=args.data,
        configs=args.configs,
        n_train=args.train,
        n_val=args.val,
        size=tuple(args.size),
        max_iters=args.iters,
        pretrain_iters=args.pretrain_iters,
        progress=not args.quiet,
    )
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_compile_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--compile [MODE]``: a ``torch.compile`` mode of the config's ``CompileMode`` (bare: ``default``),
    None when absent; ``what`` says what it compiles."""
    import typing

    from rcm_nddr.config import CompileMode

    modes = typing.get_args(CompileMode)
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=modes,
        metavar="MODE",
        help=f"{what}; MODE: {', '.join(modes)} (default: default)",
    )


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _store_list(args: argparse.Namespace) -> int:
    from rcm_nddr.store import ModelStore

    rows = [("name", "type", "group", "sources", "trainable params", "primary metric")]
    for t in ModelStore(args.store).tasks:
        key, value = t.primary_metric or ("", "")
        metric = f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" if key else "-"
        rows.append((t.name, t.type, str(t.group), ",".join(t.sources) or "-", f"{t.trainable_parameters:,}", metric))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {2, 4}  # numbers
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        print("  ".join(cells).rstrip())
    return 0


def _store_show(args: argparse.Namespace) -> int:
    import json

    import yaml

    from rcm_nddr.store import ModelStore

    content = ModelStore(args.store).metadata()
    print(json.dumps(content, indent=2) if args.json else yaml.safe_dump(content, sort_keys=False), end="\n")
    return 0


def _store_verify(args: argparse.Namespace) -> int:
    from rcm_nddr.store import ModelStore

    problems = ModelStore(args.store).verify(probes=not args.sha_only)
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{len(problems)} problem(s) in {args.store}" if problems else "ok")
    return 1 if problems else 0


def _store_remove(args: argparse.Namespace) -> int:
    from rcm_nddr.store import ModelStore

    ModelStore(args.store).remove(args.name)
    log.info("task '%s' removed from %s", args.name, args.store)
    return 0


def _add_store_args(sub: argparse._SubParsersAction) -> None:
    store = sub.add_parser("store", help="the model store: list, show, verify or remove tasks")
    commands = store.add_subparsers(dest="store_command", required=True)
    for name, func, help_text in (
        ("list", _store_list, "one line per task: type, group, sources, parameters, primary metric"),
        ("show", _store_show, "everything store.yaml records"),
        ("verify", _store_verify, "recheck every sha256 and rerun every probe; exit 1 naming each problem"),
        ("remove", _store_remove, "remove a task no other task reads"),
    ):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("store", metavar="STORE", help="model store directory (holds store.yaml)")
        p.set_defaults(func=func)
        if name == "show":
            p.add_argument("--json", action="store_true", help="JSON instead of YAML")
        if name == "verify":
            p.add_argument("--sha-only", action="store_true", help="check the sha256s only, run no probe")
        if name == "remove":
            p.add_argument("name", metavar="NAME", help="task to remove")


def parser() -> argparse.ArgumentParser:
    from rcm_nddr.commands import demo

    p = argparse.ArgumentParser(prog="rcm-nddr", description="Incremental multi-task dense prediction.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="generate the embedded synthetic dataset SYNTH_MT")
    synth.add_argument("--out", default="data/SYNTH_MT", help="output directory (default: data/SYNTH_MT)")
    synth.add_argument("--train", type=non_negative_int, default=400, help="training samples (default: 400)")
    synth.add_argument("--val", type=non_negative_int, default=100, help="validation samples (default: 100)")
    synth.add_argument("--size", type=positive_int, nargs=2, default=[128, 128], metavar=("H", "W"))
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--quiet", action="store_true")
    synth.set_defaults(func=_data_synth)

    pre = sub.add_parser("pretrain", help="train a plain ResNet shared by several tasks; export it as a bank")
    _add_config_args(pre)
    pre.add_argument("--out", help="output state dict (.pth or .safetensors; default <store>/<arch>_bank.pth)")
    pre.add_argument("--overwrite", action="store_true", help="start over even if the run has checkpoints")
    pre.set_defaults(func=_pretrain)

    d = sub.add_parser("demo", help="the main job: SYNTH_MT, a pretrained bank, baselines vs RC_RI_NFF tasks")
    d.add_argument("--out", default=demo.DEFAULT_OUT, help=f"results directory (default: {demo.DEFAULT_OUT})")
    d.add_argument("--data", default=demo.DEFAULT_DATA, help=f"SYNTH_MT directory (default: {demo.DEFAULT_DATA})")
    d.add_argument("--configs", default=None, help="directory of the synthetic configs (default: configs/synthetic)")
    d.add_argument("--train", type=positive_int, default=demo.DEFAULT_TRAIN, help="training samples")
    d.add_argument("--val", type=positive_int, default=demo.DEFAULT_VAL, help="validation samples")
    d.add_argument("--size", type=positive_int, nargs=2, default=list(demo.DEFAULT_SIZE), metavar=("H", "W"))
    d.add_argument(
        "--iters", type=positive_int, default=demo.DEFAULT_ITERS, help="training iterations per task and variant"
    )
    d.add_argument(
        "--pretrain-iters", type=positive_int, default=demo.DEFAULT_PRETRAIN_ITERS, help="pretraining iterations"
    )
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_demo)

    from rcm_nddr.commands import bench

    bench.add_arguments(
        sub.add_parser("bench", help="speed: deploy form and RC training vs plain networks; bench decomp")
    )
    from rcm_nddr.commands import docker

    docker.add_arguments(sub.add_parser("docker", help="build the Docker image; run train.py/test.py in a container"))

    _add_store_args(sub)
    from rcm_nddr.commands import predict

    predict.add_arguments(
        sub.add_parser("predict", help="run stored tasks on images: PNG visualizations and .npy outputs per task")
    )
    from rcm_nddr.commands import evaluate as offline_eval

    offline_eval.add_arguments(
        sub.add_parser("evaluate", help="score saved predictions (.png/.npy files) against a dataset split")
    )
    _add_train_args(sub.add_parser("train", help="train the task group of a config (= python train.py)"))
    _add_test_args(sub.add_parser("test", help="evaluate a trained task group (= python test.py)"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
