"""The digests that seal store.yaml: one per task record and one over the whole document (its last key),
each the sha256 of the record's or document's canonical JSON. Every reader checks them, so an edit, a
truncation, a flipped byte or a reordering of store.yaml is refused naming the record it touched.

The digests detect damage and hand edits; they are not signatures: whoever can write store.yaml can
also recompute them (see docs/store.md, "Trust")."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DIGEST_KEY = "digest"


class SealError(ValueError):
    """store.yaml does not match its digests (``rcm_nddr.store.format`` reports it as a StoreError)."""


def canonical_sha256(value: Any) -> str:
    """The sha256 of ``value`` (plain data) as canonical JSON: sorted keys, no spaces, UTF-8."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _unsealed(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != DIGEST_KEY}


def seal(doc: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` (store.yaml as plain data) with each task record's digest as its last key and the
    document's digest, over everything including the records' digests, as the document's last key."""
    body = _unsealed(doc)
    body["tasks"] = [{**_unsealed(t), DIGEST_KEY: canonical_sha256(_unsealed(t))} for t in doc["tasks"]]
    return {**body, DIGEST_KEY: canonical_sha256(body)}


def check_seal(doc: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """SealError unless every digest of ``doc`` (a loaded store.yaml at ``path``) matches, naming the
    task record that changed, or else the header or list of tasks; ``doc`` without its digests."""
    hint = "restore it from a copy, or register the tasks again"
    tasks = doc.get("tasks")
    if not isinstance(tasks, list):
        raise SealError(f"{path}: missing key 'tasks' (a list of task records): the file is truncated or edited")
    for i, task in enumerate(tasks):
        where = f"{path}: tasks[{i}]" + (f" (task {task.get('name')!r})" if isinstance(task, Mapping) else "")
        if not isinstance(task, Mapping) or DIGEST_KEY not in task:
            raise SealError(f"{where}: the record has no '{DIGEST_KEY}': the file is truncated or edited; {hint}")
        if _digest(_unsealed(task), where) != task[DIGEST_KEY]:
            raise SealError(
                f"{where}: the record does not match its digest: it was changed after it was written; {hint}"
            )
    if DIGEST_KEY not in doc:
        raise SealError(f"{path}: missing key '{DIGEST_KEY}' (the last one): the file is truncated or edited; {hint}")
    if _digest(_unsealed(doc), str(path)) != doc[DIGEST_KEY]:
        names = [t.get("name") for t in tasks]
        raise SealError(
            f"{path}: the header or the list of tasks ({names}) does not match the file's digest: a record was "
            f"removed, added or moved, or the backbone or decomposition entry was changed; {hint}"
        )
    return {**_unsealed(doc), "tasks": [_unsealed(t) for t in tasks]}


def _digest(value: Any, where: str) -> str:
    try:
        return canonical_sha256(value)
    except (TypeError, ValueError) as exc:
        raise SealError(f"{where}: holds values that are not plain data ({exc})") from exc
