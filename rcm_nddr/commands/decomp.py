"""``python -m decomp``: decompose the responses of a plain pretrained backbone over a config's train
split (``--config``) or a folder of images (``--images``) and write the decomposition file."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from rcm_nddr.commands.cli import positive_int, run_command

log = logging.getLogger("decomp")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m decomp",
        description="Decompose the pre-BN responses of every reparameterized conv of a pretrained ResNet "
        "(streaming mean and covariance, float64) for response initialization.",
    )
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
    folder.add_argument("--arch", choices=["resnet18", "resnet34", "resnet50"], help="backbone (default: resnet18)")
    folder.add_argument("--weights", help="'torchvision' (ImageNet, from the local cache), 'none' or a state dict path")
    folder.add_argument("--output-stride", type=int, choices=[8, 16], help="output stride (default: 16)")
    folder.add_argument("--size", type=positive_int, nargs=2, metavar=("H", "W"), help="image size (default: 128 128)")
    folder.add_argument("--device", help="auto (default), cpu, cuda, ...")
    folder.add_argument("--workers", type=int, default=2, help="data loader workers (default: 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
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


def _decompose(args: argparse.Namespace) -> int:
    from rcm_nddr.config import load_config
    from rcm_nddr.decomp import decompose_folder
    from rcm_nddr.engine.builders import decomposition_path, make_decomposition, resolve_device

    progress = not args.quiet
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
        out = args.out or decomposition_path(cfg)
        make_decomposition(cfg, out, max_images=args.max_images, progress=progress, batch_size=args.batch_size)
    else:
        decompose_folder(
            args.images,
            args.out,
            arch=args.arch or "resnet18",
            weights=args.weights,
            output_stride=args.output_stride or 16,
            size=tuple(args.size or (128, 128)),
            max_images=args.max_images,
            batch_size=args.batch_size or 8,
            num_workers=args.workers,
            device=resolve_device(args.device or "auto"),
            progress=progress,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    return run_command(_decompose, args)
