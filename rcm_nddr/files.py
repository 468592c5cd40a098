"""Crash-safe file writes and file digests, shared by the store, checkpoints, decompositions and
saved predictions: a file is written to a temporary beside it, fsynced and renamed into place."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it and rename it into place, so a
    crash leaves either the old file or the new one, never a torn one. An OSError of the temporary file
    (a full disk, a folder that cannot be written) is raised naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        # mkstemp makes 0600 (and a writer may replace the file): the result follows the umask like open()
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is not None and Path(exc.filename).parent != path.parent:
            raise  # about another path (e.g. a file that ``write`` reads): it names the right one
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def current_umask() -> int:
    """The process's umask (read from /proc where it is there, so that it is never changed, even briefly)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files ``atomic_write`` leaves in ``directory`` when its process is killed
    mid-write (the files they were replacing are intact); returns what was deleted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` through ``atomic_write``, without pickling."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # np.save(tmp) would append ".npy" to the temporary name
            np.save(f, array, allow_pickle=False)

    atomic_write(path, write)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
