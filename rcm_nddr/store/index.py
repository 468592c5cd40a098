"""store.yaml, the index of a model store: read and written atomically under a file lock, with the
journal that lets the next access complete a registration interrupted while it replaced files."""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from rcm_nddr.files import atomic_write_text
from rcm_nddr.store.format import (
    LOCK_FILE,
    PENDING_FILE,
    STAGED_SUFFIX,
    STORE_FILE,
    TASKS_DIR,
    StoreError,
    parse_store,
    plain_doc,
)
from rcm_nddr.yamlio import load_yaml

log = logging.getLogger(__name__)


class StoreIndex:
    """The ``store.yaml`` of the store directory ``path``. Writers hold an exclusive ``flock`` on
    ``store.yaml.lock`` for the whole read-modify-write, readers a shared one, so concurrent
    registrations into one store cannot lose a task."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path / STORE_FILE
        self._held = 0  # depth of locked() in this object (a nested flock on a new descriptor would block)

    @contextmanager
    def locked(self, shared: bool = False) -> Iterator[None]:
        """Hold the store's lock; an exclusive holder first deletes stray staged files, and any holder
        first completes an interrupted registration."""
        lock_path = self.path / LOCK_FILE
        if shared and not lock_path.exists():
            yield  # nobody has written yet, so nobody is writing
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            self._held += 1
            try:
                if not shared:
                    self.clean_staged()
                if (self.path / PENDING_FILE).exists():
                    if shared:  # completing the journal writes: take the lock exclusively meanwhile
                        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                    self.finish_pending()
                    if shared:
                        fcntl.flock(lock.fileno(), fcntl.LOCK_SH)
                yield
            finally:
                self._held -= 1
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def read(self) -> dict[str, Any]:
        """store.yaml parsed and checked (tasks as TaskRecords)."""
        if not self._held and (self.path / PENDING_FILE).exists():
            with self.locked():  # completes the interrupted registration first
                pass
        if not self.file.is_file():
            raise StoreError(f"no model store at {self.path} ({STORE_FILE} is missing)")
        try:
            doc = load_yaml(self.file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise StoreError(f"{self.file} could not be read as YAML: {exc}") from exc
        return parse_store(doc, self.file)

    def write(self, doc: Mapping[str, Any]) -> None:
        """Replace store.yaml with ``doc`` atomically (under the exclusive lock)."""
        text = yaml.safe_dump(plain_doc(doc), sort_keys=False, default_flow_style=False)
        atomic_write_text(self.file, text)

    def write_journal(self, doc: Mapping[str, Any], renames: Mapping[str, str]) -> None:
        """Journal a registration whose files are staged: its store.yaml ``doc`` and the renames (staged
        file to the file it replaces, relative to the store) that ``finish_pending`` then performs."""
        journal = {"store": plain_doc(doc), "renames": dict(renames)}
        atomic_write_text(self.path / PENDING_FILE, yaml.safe_dump(journal, sort_keys=False))

    def finish_pending(self) -> None:
        """Complete a journaled registration (under the exclusive lock): rename the staged files that are
        still there over the files they replace, write the journal's store.yaml, drop the journal. Each
        step can be repeated, so a crash during this is completed by the next access."""
        pending = self.path / PENDING_FILE
        if not pending.exists():
            return
        try:
            journal = load_yaml(pending.read_text())
            renames, doc = dict(journal["renames"]), journal["store"]
        except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
            raise StoreError(f"{pending}: the journal of an interrupted registration is unreadable: {exc}") from exc
        for staged, final in renames.items():
            if (self.path / staged).exists():
                (self.path / staged).replace(self.path / final)
        atomic_write_text(self.file, yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
        pending.unlink()
        log.info("completed an interrupted registration in %s", self.path)

    def clean_staged(self) -> None:
        """Delete staged files of a registration that died before writing its journal (the store never
        referred to them); under the exclusive lock, with no journal pending."""
        if (self.path / PENDING_FILE).exists() or not (self.path / TASKS_DIR).is_dir():
            return
        for path in (self.path / TASKS_DIR).glob(f"*{STAGED_SUFFIX}"):
            path.unlink(missing_ok=True)
