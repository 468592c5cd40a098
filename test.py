"""Evaluate a trained task group: python test.py --config FILE [--log-performance CSV]."""

import sys

from rcm_nddr.commands.cli import test_main

if __name__ == "__main__":
    sys.exit(test_main())
