"""Stores made from one filter bank hold byte-identical copies of the bank, of the RI decomposition and
of the int8 calibration set (42 + 11 + 13 MB for ResNet-18 at the demo's size). ``link_identical`` makes
such copies one file on disk, hard-linked from every store, without changing a byte that any store
reads: a study of 30 cells, or the demo's three stores, keeps one copy instead of one per store.

Safe because these files are written once and never modified in place: every write of the store is a
new file renamed over the old name (``rcm_nddr.files.atomic_write``), which gives that store its own
file again and leaves the others' untouched. Only files whose bytes are equal (size, then sha256) are
linked, and only within one filesystem."""

from __future__ import annotations

import errno
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rcm_nddr.files import file_sha256
from rcm_nddr.store.format import BANK_FILE, CALIBRATION_FILE, DECOMPOSITION_FILE, STORE_FILE, StoreError
from rcm_nddr.store.index import StoreIndex

log = logging.getLogger(__name__)

#: the store files that are written once and are the same in every store made from one bank
SHARED_FILES = (BANK_FILE, DECOMPOSITION_FILE, CALIBRATION_FILE)
#: why a link may not be made (another filesystem, no permission, a read-only store...): the file stays
LINK_REFUSED = (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EROFS, errno.EMLINK, errno.ENOTSUP)


@dataclass
class LinkReport:
    """What ``link_identical`` did: ``linked`` (path, the file it now shares) pairs, the bytes this
    freed, and files left as they were with the reason (another filesystem, a read-only store, a link
    refused)."""

    linked: list[tuple[Path, Path]] = field(default_factory=list)
    freed_bytes: int = 0
    skipped: list[str] = field(default_factory=list)


def link_identical(stores: Iterable[str | Path], sources: Iterable[str | Path] = ()) -> LinkReport:
    """Hard-link the byte-identical filter bank, decomposition and calibration files of ``stores`` (model
    store directories) so that each content is stored once. The first file that holds a content keeps it:
    one of ``sources`` (files outside the stores, e.g. the decomposition beside the pretrained bank, never
    replaced themselves), else the first store's; the others' files are replaced by links to it, each
    replacement atomic (a link under a temporary name renamed over the file) and made under that store's
    lock. A directory that is not a store is an error naming it; a file on another filesystem, one the
    filesystem will not link, or one replaced by a writer meanwhile is left as it is and reported in
    ``skipped``."""
    paths = [Path(s) for s in stores]
    for path in paths:
        if not (path / STORE_FILE).is_file():
            raise StoreError(f"{path} is not a model store (no {STORE_FILE})")
    report = LinkReport()
    kept: dict[tuple[int, int, str], tuple[Path, os.stat_result]] = {}  # content -> the file copies link to
    digests: dict[tuple[int, int], str] = {}  # (device, inode) -> sha256: each file is read once

    def content(path: Path, stat: os.stat_result) -> tuple[int, int, str]:
        sha = digests.get((stat.st_dev, stat.st_ino))
        if sha is None:
            sha = digests[(stat.st_dev, stat.st_ino)] = file_sha256(path)
        return stat.st_dev, stat.st_size, sha

    for path in map(Path, sources):
        if path.is_file():
            stat = path.stat()
            kept.setdefault(content(path, stat), (path, stat))
    for store in paths:
        for name in SHARED_FILES:
            path = store / name
            if not path.is_file():
                continue
            stat = path.stat()
            source, source_stat = kept.setdefault(content(path, stat), (path, stat))
            if source_stat.st_ino == stat.st_ino:
                continue  # the content's first file, or already a link of it
            try:
                with StoreIndex(store).locked():
                    changed = _replace_by_link(source, source_stat, path, stat)
            except OSError as exc:
                if exc.errno not in LINK_REFUSED:
                    raise
                changed = os.strerror(exc.errno)
            if changed:
                report.skipped.append(f"{path}: not linked to {source} ({changed})")
                continue
            report.linked.append((path, source))
            if stat.st_nlink == 1:  # that was its last name: its space is freed
                report.freed_bytes += stat.st_size
    for path, source in report.linked:
        log.debug("%s is now a hard link of %s", path, source)
    for line in report.skipped:
        log.info("%s", line)
    return report


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns)


def _replace_by_link(source: Path, source_stat: os.stat_result, path: Path, stat: os.stat_result) -> str | None:
    """``path`` becomes a hard link of ``source`` if both are still the files that were hashed (same inode,
    size and modification time); else nothing is linked and the reason is returned."""
    if not _same_file(path.stat(), stat):
        return "it changed while the copies were being compared"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # what a killed writer leaves
    os.link(source, tmp)
    try:
        if not _same_file(tmp.stat(), source_stat):
            return "that file changed while the copies were being compared"
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return None
