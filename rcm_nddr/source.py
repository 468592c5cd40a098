"""The source tree this package runs from (the repository root in a checkout) and what git says of it;
standard library only, so the commands can use it before anything heavy is imported."""

from __future__ import annotations

import subprocess
from pathlib import Path


def source_tree() -> Path:
    """The directory holding the ``rcm_nddr`` package (the repository root in a checkout)."""
    return Path(__file__).resolve().parents[1]


def git_output(root: Path, *args: str) -> str | None:
    """What ``git -C root ARGS`` prints, or None without git, outside a checkout or on an error."""
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None
