"""The arguments of the tools beside training and evaluation: ``python -m decomp``, ``rcm-nddr bench`` and
``rcm-nddr docker`` (as ``arguments``: the standard library and light modules only, so ``--help`` answers at
once)."""

from __future__ import annotations

import argparse

from rcm_nddr.commands.arguments import (
    ARCHS,
    DECOMP_ARCHS,
    add_compile_argument,
    add_logging_arguments,
    command_parser,
    non_negative_int,
    positive_int,
)
from rcm_nddr.commands.docker import DEFAULT_SHM_SIZE, DEFAULT_STOP_TIMEOUT, DEFAULT_TAG, MOUNTS, WORKDIR

# ----------------------------------------------------------------------------- python -m decomp


def add_decomp_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML config: its backbone and its dataset's train split")
    source.add_argument("--images", metavar="DIR", help="a folder of .png/.jpg calibration images (recursive)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --config: override a config key, e.g. --set backbone.weights=torchvision (repeatable)",
    )
    p.add_argument(
        "--out",
        help="output .safetensors file (with --config: backbone.decomposition, else <store>/ri.safetensors)",
    )
    p.add_argument("--max-images", type=positive_int, help="use only the first N images")
    p.add_argument("--batch-size", type=positive_int, help="images per forward pass (default: train.batch_size or 8)")
    folder = p.add_argument_group("with --images")
    folder.add_argument("--arch", choices=DECOMP_ARCHS, help="backbone (default: resnet18)")
    folder.add_argument("--weights", help="'torchvision' (ImageNet, from the local cache), 'none' or a state dict path")
    folder.add_argument(
        "--output-stride",
        type=int,
        choices=[8, 16, 32],
        help="output stride (default: 16 for a ResNet, 8 for vgg16; 32: the undilated ResNet, as the official RI)",
    )
    folder.add_argument("--size", type=positive_int, nargs=2, metavar=("H", "W"), help="image size (default: 128 128)")
    folder.add_argument("--device", help="auto (default), cpu, cuda, ...")
    folder.add_argument("--workers", type=int, default=2, help="data loader workers")
    add_logging_arguments(p)
    p.set_defaults(handler="rcm_nddr.commands.decomp:decompose")


def check_decomp_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    folder_only = {"--arch": args.arch, "--weights": args.weights, "--output-stride": args.output_stride}
    folder_only.update({"--size": args.size, "--device": args.device})
    if args.config is not None:
        given = [flag for flag, value in folder_only.items() if value is not None]
        if given:
            p.error(f"{', '.join(given)} go with --images; with --config set backbone/train keys with --set")
    else:
        if args.overrides:
            p.error("--set goes with --config")
        if args.weights is None:
            p.error("--images needs --weights: 'torchvision', 'none' (random init) or a state dict path")
        if args.out is None:
            p.error("--images needs --out FILE")


# ----------------------------------------------------------------------------- rcm-nddr bench


def add_architecture_arguments(parser: argparse.ArgumentParser) -> None:
    """``--output-stride`` and ``--head-channels``: the config's ``backbone.output_stride`` and
    ``head.channels`` of the networks a benchmark builds."""
    parser.add_argument("--output-stride", type=int, choices=[8, 16], default=16, help="backbone.output_stride")
    parser.add_argument("--head-channels", type=positive_int, default=256, help="head.channels, the DeepLabv3+ width")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """``rcm-nddr bench`` (the model benchmark) and its subcommands ``decomp``, ``scaling`` and ``precision``."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the networks run")
    parser.add_argument("--size", type=positive_int, nargs=2, default=[256, 256], metavar=("H", "W"), help="image size")
    parser.add_argument("--batch", type=positive_int, default=4, help="images per batch")
    parser.add_argument("--tasks", type=positive_int, default=4, help="tasks of the inference pass")
    parser.add_argument("--arch", choices=ARCHS, default="resnet18", help="backbone")
    add_architecture_arguments(parser)
    parser.add_argument("--warmup", type=positive_int, default=2, help="untimed rounds, which compile")
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed rounds; medians are reported")
    add_compile_argument(parser, "time every network (both sides of each ratio) compiled by torch.compile")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's peak TFLOP/s for the MFU column (default: the bf16 peak of a known GPU; none on CPU)",
    )
    parser.add_argument("--json", help="also write the report to this JSON file")
    parser.set_defaults(handler="rcm_nddr.commands.bench_speed:main")

    sub = parser.add_subparsers(dest="bench_command", required=False)
    d = command_parser(sub, "decomp", "streaming response decomposition vs keeping every response")
    d.add_argument("--images", type=positive_int, nargs="+", default=[200, 2000], help="image counts")
    d.add_argument("--size", type=positive_int, nargs=2, default=[128, 128], metavar=("H", "W"), help="image size")
    d.add_argument("--batch", type=positive_int, default=16, help="images per forward pass")
    d.add_argument("--seed", type=int, default=0, help="random seed of the images")
    d.add_argument("--json", help="also write the report to this JSON file")
    d.set_defaults(handler="rcm_nddr.commands.bench:main")

    s = command_parser(sub, "scaling", "inference time, FLOPs and parameters of 1..N tasks: rcm, rcm_nddr, plain x T")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the networks run")
    s.add_argument("--tasks-max", type=int, default=10, help="measure 1..N tasks")
    s.add_argument("--size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"), help="image size")
    s.add_argument("--batch", type=int, default=2, help="images per batch")
    s.add_argument("--arch", choices=ARCHS, default="resnet18", help="backbone")
    add_architecture_arguments(s)
    s.add_argument("--warmup", type=int, default=1, help="warm-up calls of each network, all tasks")
    s.add_argument("--repeats", type=int, default=3, help="measured rounds; the median is reported")
    s.add_argument("--json", help="also write the report (setup, machine, rows per T, fits) to this JSON file")
    s.add_argument("--plot", help="also draw time and parameters against T into this PNG (default: no plot)")
    s.set_defaults(handler="rcm_nddr.commands.bench_scaling:main")

    p = command_parser(sub, "precision", "accuracy of every task of a store in fp32, bf16 and int8 (deploy form, CPU)")
    p.add_argument(
        "--store", required=True, help="model store whose tasks are evaluated (e.g. results/demo/incremental)"
    )
    p.add_argument("--root", help="the dataset's root folder (default: the one the store's first task was trained on)")
    p.add_argument("--split", help="split to evaluate (default: the dataset's val split)")
    p.add_argument(
        "--precisions", nargs="+", choices=["fp32", "bf16", "int8"], default=["fp32", "bf16", "int8"], help="precisions"
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per batch")
    p.add_argument(
        "--calibration",
        metavar="DIR",
        help="calibrate int8 on the images of DIR (default: the calibration set the store keeps; needed for a "
        "store registered before stores kept one)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.set_defaults(handler="rcm_nddr.commands.bench_precision:main")


# ----------------------------------------------------------------------------- rcm-nddr docker


def add_docker_arguments(p: argparse.ArgumentParser) -> None:
    """The ``docker build`` and ``docker run`` subcommands, under ``p``."""
    sub = p.add_subparsers(dest="docker_command", required=True)
    b = command_parser(
        sub,
        "build",
        help="build the image (the commit of the checkout is recorded in it)",
        description="Build the rcm-nddr image from the Dockerfile of a checkout, streaming the build output.",
    )
    b.add_argument("--tag", default=DEFAULT_TAG, help=f"image name:tag (default: {DEFAULT_TAG})")
    b.add_argument("--base-image", help="base image with Python and torch (default: the Dockerfile's BASE_IMAGE)")
    b.add_argument("--context", help="build context holding the Dockerfile (default: this project's root)")
    b.add_argument("--network", help="network of the build's RUN steps, e.g. host (default: the engine's)")
    b.add_argument(
        "--build-arg", action="append", default=[], metavar="KEY=VALUE", help="extra build argument (repeatable)"
    )
    b.add_argument("--pull", action="store_true", help="pull a newer base image first")
    b.add_argument("--verbose", action="store_true", help="debug logging")
    b.set_defaults(handler="rcm_nddr.commands.docker:build")

    r = command_parser(
        sub,
        "run",
        help="run a command (python train.py ...) in the image with the host folders mounted",
        description=(
            f"Run COMMAND in the image as the host user, with --data mounted read-only at {MOUNTS['data']}, "
            f"--results at {MOUNTS['results']}, --ri at {MOUNTS['ri']} and --models at {MOUNTS['models']} "
            f"(TORCH_HOME), in the working directory {WORKDIR}. Exits with the command's status."
        ),
    )
    r.add_argument("--image", default=DEFAULT_TAG, help=f"image to run (default: {DEFAULT_TAG})")
    r.add_argument("--gpus", default="none", help="GPUs: all, a count N, device=ID[,ID...], or none (default: none)")
    r.add_argument("--data", required=True, help=f"host datasets folder, mounted read-only at {MOUNTS['data']}")
    r.add_argument("--results", required=True, help=f"host results folder (created), mounted at {MOUNTS['results']}")
    r.add_argument("--ri", help=f"host folder of RI decompositions (created), mounted at {MOUNTS['ri']}")
    r.add_argument(
        "--models",
        help=f"host folder of pretrained weights (created), mounted at {MOUNTS['models']} = TORCH_HOME, "
        "e.g. ~/.cache/torch (torchvision weights in hub/checkpoints/)",
    )
    r.add_argument(
        "--shm-size",
        default=DEFAULT_SHM_SIZE,
        help=f"size limit of /dev/shm for DataLoader workers (default: {DEFAULT_SHM_SIZE})",
    )
    r.add_argument("--ipc-host", action="store_true", help="share the host's IPC namespace instead (--ipc=host)")
    r.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable (repeatable)")
    r.add_argument("--user", help="UID:GID to run as (default: the calling user's, so results belong to them)")
    r.add_argument("--name", help="container name (default: a generated one)")
    r.add_argument("--network", help="network mode, e.g. none or host (default: the engine's)")
    r.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="[IP:]HOST:CONTAINER",
        help="publish the container's TCP port CONTAINER on the host's HOST (optionally bound to IP), e.g. "
        "6006:6006 for TensorBoard (repeatable; needs a network with port publishing, not none or host)",
    )
    r.add_argument(
        "--stop-timeout",
        type=non_negative_int,
        default=DEFAULT_STOP_TIMEOUT,
        help=f"seconds from SIGTERM to SIGKILL when interrupted (default: {DEFAULT_STOP_TIMEOUT})",
    )
    r.add_argument("--verbose", action="store_true", help="debug logging")
    r.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="what to run, after --, e.g. -- python train.py --config configs/synthetic/semseg_RC_RI_NFF.yaml",
    )
    r.set_defaults(handler="rcm_nddr.commands.docker:run")


# ----------------------------------------------------------------------------- rcm-nddr study


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True, help="study spec (YAML), e.g. studies/synth_mt.yaml")
    p.add_argument(
        "--workers", type=positive_int, default=1, help="cells run at once by the local executor (default: 1)"
    )
    p.add_argument(
        "--executor",
        choices=("local", "slurm", "submitit-local"),
        default="local",
        help="local worker processes; SLURM jobs through submitit (the spec's slurm: parameters); or "
        "submitit's local executor, the SLURM path run here (every cell at once) (default: local)",
    )
    p.add_argument(
        "--gpus",
        type=non_negative_int,
        help="GPUs the local workers share out, one per running cell (default: every visible GPU)",
    )
    p.add_argument("--dry-run", action="store_true", help="list the cells, finished or not, and run nothing")
    p.add_argument("--report-only", action="store_true", help="aggregate the finished cells, run nothing")
    add_logging_arguments(p)
    p.set_defaults(handler="rcm_nddr.commands.study:main")
