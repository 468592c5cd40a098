"""``python -m decomp`` (parsed in ``rcm_nddr.commands.cli``): decompose the responses of a plain
pretrained backbone over a config's train split (``--config``) or a folder of images (``--images``) and
write the decomposition file."""

from __future__ import annotations

import argparse

from rcm_nddr.config import load_config
from rcm_nddr.decomp import decompose_folder
from rcm_nddr.engine.builders import decomposition_path, make_decomposition, resolve_device


def decompose(args: argparse.Namespace) -> int:
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
            output_stride=args.output_stride,
            size=tuple(args.size or (128, 128)),
            max_images=args.max_images,
            batch_size=args.batch_size or 8,
            num_workers=args.workers,
            device=resolve_device(args.device or "auto"),
            progress=progress,
        )
    return 0
