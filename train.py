"""Train the task group of a config: python train.py --config FILE [--set key=value ...] [--resume]."""

import sys

from rcm_nddr.commands.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
