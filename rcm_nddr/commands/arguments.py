"""What the user can type: the arguments of every command, with their defaults. Only the standard library
and the config schema are imported here, so that ``--help`` answers at once; each parser names the
function that does the work (``handler="module:function"``), imported when the command runs."""

from __future__ import annotations

import argparse
import re
import typing

from rcm_nddr.config import CompileMode
from rcm_nddr.protocols import PROTOCOLS
from rcm_nddr.registry import installed_names

ARCHS = ("resnet18", "resnet34", "resnet50")  # the benchmarks' ResNets
#: every backbone a decomposition can be made for (rcm_nddr.nn.backbone.ARCHS, without importing torch)
DECOMP_ARCHS = (*ARCHS, "resnet101", "resnet152", "vgg16")
#: the log lines of every command (and of the demo's worker processes)
LOG_FORMAT, LOG_DATEFMT = "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
#: the demo's defaults (``rcm-nddr demo``)
DEMO_OUT = "results/demo"
DEMO_DATA = "data/SYNTH_MT"
#: the filter bank the demo pretrains, which every synthetic config reads (``backbone.weights``)
DEMO_BANK = "results/synthetic/resnet18_bank.pth"
DEMO_TRAIN, DEMO_VAL, DEMO_SIZE = 320, 80, (128, 128)
#: training iterations of each task in the demo (the configs' own schedules are longer)
DEMO_ITERS, DEMO_PRETRAIN_ITERS = 60, 200
#: how ``rcm-nddr predict`` runs the stored tasks
PREDICT_FORMS = ("deploy", "batched", "training")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with ``(default: X)`` after every option whose default says something (not
    for flags, empty lists or options without a default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or "default:" in text or action.option_strings == []:
            return text
        if default in (None, False, [], argparse.SUPPRESS) or isinstance(action, argparse._StoreTrueAction):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


def command_parser(sub: argparse._SubParsersAction, name: str, help: str, **kwargs: typing.Any):
    """A subcommand's parser, with the project's help formatter."""
    description = kwargs.pop("description", help)
    return sub.add_parser(name, help=help, description=description, formatter_class=HelpFormatter, **kwargs)


# ----------------------------------------------------------------------------- value types


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def device_name(text: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N."""
    if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def installed(group: str) -> str:
    return ", ".join(installed_names(group)) or "none installed"


# ----------------------------------------------------------------------------- shared option groups


def add_logging_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="debug logging")


def add_config_arguments(p: argparse.ArgumentParser, example: str = "configs/synthetic/semseg_RC_RI_NFF.yaml") -> None:
    p.add_argument("--config", required=True, help=f"YAML config, e.g. {example}")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.max_iters=100 (repeatable)",
    )
    add_logging_arguments(p)


class GpuId(argparse.Action):
    """``--gpu_id N``, the official RCM commands' flag: the same as ``--set train.device=cuda:N``."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        if value < 0:
            parser.error(f"{option_string}: expected a GPU index >= 0, got {value}")
        namespace.overrides = [*(getattr(namespace, "overrides", None) or []), f"train.device=cuda:{value}"]


class Protocol(argparse.Action):
    """``--protocol NAME``: the same as ``--set evaluation.protocol=NAME``."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        namespace.overrides = [*(getattr(namespace, "overrides", None) or []), f"evaluation.protocol={value}"]


def add_protocol_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        action=Protocol,
        help="whose metric conventions to follow (= --set evaluation.protocol=NAME; default: the config's)",
    )


def add_gpu_id_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu_id", type=int, action=GpuId, metavar="N", help="run on cuda:N (= --set train.device=cuda:N)")


def add_compile_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--compile [MODE]``: a ``torch.compile`` mode of the config's ``CompileMode`` (bare: ``default``),
    None when absent; ``what`` says what it compiles."""
    modes = typing.get_args(CompileMode)
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=modes,
        metavar="MODE",
        help=f"{what}; MODE: {', '.join(modes)} (default: default)",
    )


# ----------------------------------------------------------------------------- train.py / test.py


def add_precision_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "int8"],
        default="fp32",
        help="of the deploy form: fp32; bf16 (slower than fp32 on a CPU without bf16 matrix instructions); int8 "
        "(post-training static quantization, x86 CPUs; docs/precision.md)",
    )


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_config_arguments(p)
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
    add_gpu_id_argument(p)
    p.set_defaults(handler="rcm_nddr.commands.run:train")
    return p


def add_test_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_config_arguments(p)
    p.add_argument("--split", help="split to evaluate (default: dataset.val_split)")
    p.add_argument(
        "--checkpoint",
        choices=["best", "last"],
        help="evaluate this checkpoint of the run (default: the group as the store registers it, from the "
        "test.checkpoint checkpoint; the run's checkpoint when it is not registered)",
    )
    p.add_argument(
        "--form",
        choices=["deploy", "training"],
        default="deploy",
        help="deploy: the inference form rcm-nddr predict runs (BatchNorm and modulators folded into the convs), "
        "checked on the probe input; training: the network as trained (default: deploy)",
    )
    p.add_argument(
        "--log-performance", "--log_performance", metavar="CSV", help="append one row per task to this CSV file"
    )
    add_precision_argument(p)
    add_gpu_id_argument(p)
    add_protocol_argument(p)
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
    p.set_defaults(handler="rcm_nddr.commands.run:test")
    return p


# ----------------------------------------------------------------------------- rcm-nddr data, pretrain, demo


def add_data_arguments(sub: argparse._SubParsersAction) -> None:
    data = command_parser(sub, "data", "datasets").add_subparsers(dest="data_command", required=True)
    synth = command_parser(data, "synth", "generate the embedded synthetic dataset SYNTH_MT (deterministic)")
    synth.add_argument("--out", default="data/SYNTH_MT", help="output directory")
    synth.add_argument("--train", type=non_negative_int, default=400, help="training samples")
    synth.add_argument("--val", type=non_negative_int, default=100, help="validation samples")
    synth.add_argument("--size", type=positive_int, nargs=2, default=[128, 128], metavar=("H", "W"), help="image size")
    synth.add_argument("--seed", type=int, default=0, help="random seed of the scenes")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(handler="rcm_nddr.commands.run:data_synth")


def add_pretrain_arguments(sub: argparse._SubParsersAction) -> None:
    pre = command_parser(
        sub,
        "pretrain",
        "train one backbone shared by several tasks, plain (reparam: none) or in RC form (reparam: rc, bank and "
        "modulators together, as pretrain_rc.yaml); export it as backbone weights",
    )
    add_config_arguments(pre, example="configs/synthetic/pretrain.yaml")
    pre.add_argument("--out", help="output state dict (.pth or .safetensors; default: <store>/<arch>_bank.pth)")
    pre.add_argument("--overwrite", action="store_true", help="start over even if the run has checkpoints")
    pre.set_defaults(handler="rcm_nddr.commands.run:pretrain")


def add_demo_arguments(sub: argparse._SubParsersAction) -> None:
    d = command_parser(sub, "demo", "the main job: SYNTH_MT, a pretrained bank, baselines vs RC_RI_NFF tasks")
    d.add_argument("--out", default=DEMO_OUT, help="results directory (the demo's stores, runs and tables)")
    d.add_argument("--data", default=DEMO_DATA, help="SYNTH_MT directory (generated when missing)")
    d.add_argument("--bank", default=DEMO_BANK, help="pretrained filter bank (pretrained when missing)")
    d.add_argument("--configs", default=None, help="directory of the synthetic configs (default: configs/synthetic)")
    d.add_argument("--train", type=positive_int, default=DEMO_TRAIN, help="training samples")
    d.add_argument("--val", type=positive_int, default=DEMO_VAL, help="validation samples")
    d.add_argument("--size", type=positive_int, nargs=2, default=list(DEMO_SIZE), metavar=("H", "W"), help="image size")
    d.add_argument("--iters", type=positive_int, default=DEMO_ITERS, help="training iterations per task and variant")
    d.add_argument("--pretrain-iters", type=positive_int, default=DEMO_PRETRAIN_ITERS, help="pretraining iterations")
    d.add_argument(
        "--lanes",
        type=positive_int,
        default=None,
        help="runs trained at once, each in its own process with its share of the cores (default: 2 with two "
        "cores or more, else 1; 1 runs them one after the other in this process)",
    )
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(handler="rcm_nddr.commands.demo:main")


# ----------------------------------------------------------------------------- rcm-nddr store


def add_store_arguments(sub: argparse._SubParsersAction) -> None:
    store = command_parser(sub, "store", "the model store: list, show, verify or remove tasks; share files")
    commands = store.add_subparsers(dest="store_command", required=True)
    for name, function, help_text in (
        ("list", "list_tasks", "one line per task: type, group, sources, parameters, primary metric"),
        ("show", "show", "everything store.yaml records"),
        ("verify", "verify", "recheck every sha256 and rerun every probe; exit 1 naming each problem"),
        ("remove", "remove", "remove a task no other task reads"),
        ("migrate", "migrate", "check a store of schema_version 1 and rewrite its store.yaml as the current one"),
        ("dedupe", "dedupe", "hard-link the identical filter bank, decomposition and calibration files of stores"),
    ):
        p = command_parser(commands, name, help_text)
        if name == "dedupe":
            p.add_argument("stores", nargs="+", metavar="STORE", help="model store directories (hold store.yaml)")
        else:
            p.add_argument("store", metavar="STORE", help="model store directory (holds store.yaml)")
        p.set_defaults(handler=f"rcm_nddr.commands.store:{function}")
        if name == "show":
            p.add_argument("--json", action="store_true", help="JSON instead of YAML")
        if name == "verify":
            p.add_argument("--sha-only", action="store_true", help="check the sha256s only, run no probe")
        if name in ("verify", "migrate"):
            add_allow_plugins_argument(p)
        if name == "remove":
            p.add_argument("name", metavar="NAME", help="task to remove")


# ----------------------------------------------------------------------------- rcm-nddr predict, evaluate


def add_allow_plugins_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-plugins",
        action="append",
        default=[],
        metavar="PLUGIN",
        help="a plug-in (module name or .py path) that the store's records name and that may be imported to "
        "define their task types (repeat for several); a store runs no code unless it is listed here "
        "(see docs/store.md, Trust)",
    )


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="model store directory (holds store.yaml)")
    p.add_argument(
        "--images",
        required=True,
        nargs="+",
        metavar="FILE_OR_DIR",
        help=f"image files, or directories whose image files ({' '.join(IMAGE_EXTENSIONS)}) are all read "
        "(not recursively); every image must have a distinct file name stem",
    )
    p.add_argument("--out", required=True, help="output directory: <out>/<task>/<stem>.png and .npy")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks to predict (default: every task of the store)")
    p.add_argument("--device", type=device_name, default="auto", help="auto (cuda if present), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per forward pass, of equal size")
    p.add_argument(
        "--form",
        choices=PREDICT_FORMS,
        default="deploy",
        help="deploy: modulators and BatchNorm folded into the convs; batched: the deploy form with the tasks' "
        "backbone convs grouped; training: the unfolded network as trained (same outputs up to float rounding)",
    )
    add_precision_argument(p)
    p.add_argument(
        "--calibration",
        metavar="DIR",
        help="int8: calibrate on the image files of DIR (default: the calibration set the store keeps)",
    )
    add_allow_plugins_argument(p)
    add_compile_argument(p, "run the network through torch.compile (the first batch of each image size compiles)")
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast on CUDA (default: on; no effect on a CPU)",
    )
    add_logging_arguments(p)
    p.set_defaults(handler="rcm_nddr.commands.predict:main")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help=f"dataset name: {installed('rcm_nddr.datasets')}, or a plug-in's")
    p.add_argument("--root", required=True, help="the dataset's root folder")
    p.add_argument("--split", default="val", help="split to evaluate")
    p.add_argument(
        "--task", required=True, help=f"task type: {installed('rcm_nddr.tasks')}, or one registered by --plugin"
    )
    p.add_argument(
        "--pred",
        required=True,
        help="folder of predictions named like the ground truth: <id>.png (class maps) or <id>.npy; "
        "a folder holding <task>/ subfolders (what test.py --save-predictions writes) works too",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="dataset option, e.g. classes=7")
    p.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option, e.g. max_dist=0.011 or matching=distance for edge",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="project",
        help="whose metric conventions to follow (default: project; see docs/metrics.md#protocols)",
    )
    p.add_argument(
        "--switch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an evaluation switch over the protocol's, e.g. beta2=0.3 for sal or ois_ties=first for edge",
    )
    p.add_argument("--plugin", action="append", default=[], help="module or .py file registering task types")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    add_logging_arguments(p)
    p.set_defaults(handler="rcm_nddr.commands.evaluate:main")
