"""store.yaml, the index of a model store: read and written atomically under a file lock, with the
journal that lets the next writer complete a registration interrupted while it replaced files. Readers
need no write access: they take a shared lock where they can open the lock file, and none otherwise."""

from __future__ import annotations

import errno
import fcntl
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from rcm_nddr.files import atomic_write_text, remove_stale_temporaries
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
from rcm_nddr.store.sealing import seal
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
        """Hold the store's lock. An exclusive holder (a writer) first completes an interrupted
        registration and deletes what killed writers left (staged files, temporaries). A shared holder
        (a reader) opens the lock file read-only, and reads unlocked where it cannot (a read-only mount,
        no permission; nobody can be writing there either), or where it does not exist yet."""
        lock_path = self.path / LOCK_FILE
        if shared:
            try:
                lock = open(lock_path)  # noqa: SIM115 -- closed below
            except OSError:
                if (self.path / PENDING_FILE).exists():
                    raise self._pending_error() from None
                yield  # no lock file: nobody has written yet; unreadable: nobody can write
                return
        else:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                lock = open(lock_path, "a")  # noqa: SIM115 -- closed below
            except OSError as exc:
                raise StoreError(f"cannot write to the model store {self.path}: {exc.strerror or exc}") from exc
        with lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            self._held += 1
            try:
                if (self.path / PENDING_FILE).exists():
                    if shared:
                        self._finish_pending_as_reader(lock.fileno())
                    else:
                        self.finish_pending()
                if not shared:
                    self.clean_staged()
                    for folder in (self.path, self.path / TASKS_DIR):
                        for stale in remove_stale_temporaries(folder):
                            log.info("deleted %s, left by a writer that was killed", stale)
                yield
            finally:
                self._held -= 1
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _finish_pending_as_reader(self, fd: int) -> None:
        """Complete a journaled registration found by a reader: under the exclusive lock when the reader
        may write the store, else StoreError (a reader never sees a half-finished registration)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.finish_pending()
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise self._pending_error() from exc
            raise
        finally:
            fcntl.flock(fd, fcntl.LOCK_SH)

    def _pending_error(self) -> StoreError:
        return StoreError(
            f"{self.path / PENDING_FILE}: a registration was interrupted and only a writer can complete it; "
            f"open the store once with write access (e.g. rcm-nddr store verify {self.path})"
        )

    def read(self, legacy: bool = False) -> dict[str, Any]:
        """store.yaml parsed and checked (tasks as TaskRecords); ``legacy``: one of schema_version 1."""
        if not self._held and (self.path / PENDING_FILE).exists():
            with self.locked(shared=True):  # completes the interrupted registration first
                pass
        return parse_store(self._load(), self.file, legacy)

    def schema_version(self) -> Any:
        """The ``schema_version`` store.yaml states (None when it states none), without checking the rest."""
        doc = self._load()
        return doc.get("schema_version") if isinstance(doc, Mapping) else None

    def _load(self) -> Any:
        """store.yaml as YAML, unchecked."""
        if not self.file.is_file():
            raise StoreError(f"no model store at {self.path} ({STORE_FILE} is missing)")
        try:
            return load_yaml(self.file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise StoreError(f"{self.file} is not UTF-8 text (byte {exc.start}): it is damaged") from exc
        except (OSError, yaml.YAMLError) as exc:
            raise StoreError(f"{self.file} could not be read as YAML: {exc}") from exc

    def write(self, doc: Mapping[str, Any]) -> None:
        """Replace store.yaml with ``doc`` atomically (under the exclusive lock)."""
        text = yaml.safe_dump(seal(plain_doc(doc)), sort_keys=False, default_flow_style=False)
        atomic_write_text(self.file, text)

    def write_journal(self, doc: Mapping[str, Any], renames: Mapping[str, str]) -> None:
        """Journal a registration whose files are staged: its store.yaml ``doc`` and the renames (staged
        file to the file it replaces, relative to the store) that ``finish_pending`` then performs."""
        journal = {"store": seal(plain_doc(doc)), "renames": dict(renames)}
        atomic_write_text(self.path / PENDING_FILE, yaml.safe_dump(journal, sort_keys=False))

    def finish_pending(self) -> None:
        """Complete a journaled registration (under the exclusive lock): rename the staged files that are
        still there over the files they replace, write the journal's store.yaml, drop the journal. Each
        step can be repeated, so a crash during this is completed by the next access."""
        pending = self.path / PENDING_FILE
        if not pending.exists():
            return
        try:
            journal = load_yaml(pending.read_text(encoding="utf-8"))
            renames, doc = dict(journal["renames"]), journal["store"]
            parse_store(doc, pending)  # a damaged journal must not become store.yaml
        except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError, StoreError) as exc:
            raise StoreError(f"{pending}: the journal of an interrupted registration is unreadable: {exc}") from exc
        files = {f for task in doc["tasks"] for f in task["files"]}
        strays = [f"{k} -> {v}" for k, v in renames.items() if v not in files or k != v + STAGED_SUFFIX]
        if strays:
            raise StoreError(f"{pending}: renames files that are not the tasks' own: {strays}")
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
