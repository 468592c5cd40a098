"""``rcm-nddr store list|show|verify|remove|migrate|dedupe``: read and check a model store, remove a
task, upgrade a store written by an earlier version, or share the identical files of several stores."""

from __future__ import annotations

import argparse
import json
import logging

import yaml

from rcm_nddr.store import ModelStore
from rcm_nddr.store.format import SCHEMA_VERSION
from rcm_nddr.store.sharing import link_identical

log = logging.getLogger("rcm_nddr")


def list_tasks(args: argparse.Namespace) -> int:
    rows = [("name", "type", "group", "sources", "trainable params", "primary metric")]
    for t in ModelStore(args.store).tasks:
        key, value = t.primary_metric or ("", "")
        metric = f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" if key else "-"
        rows.append((t.name, t.type, str(t.group), ",".join(t.sources) or "-", f"{t.trainable_parameters:,}", metric))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {2, 4}  # numbers
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        print("  ".join(cells).rstrip())
    return 0


def show(args: argparse.Namespace) -> int:
    content = ModelStore(args.store).metadata()
    print(json.dumps(content, indent=2) if args.json else yaml.safe_dump(content, sort_keys=False), end="\n")
    return 0


def verify(args: argparse.Namespace) -> int:
    problems = ModelStore(args.store).verify(probes=not args.sha_only, allow_plugins=args.allow_plugins)
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{len(problems)} problem(s) in {args.store}" if problems else "ok")
    return 1 if problems else 0


def remove(args: argparse.Namespace) -> int:
    ModelStore(args.store).remove(args.name)
    log.info("task '%s' removed from %s", args.name, args.store)
    return 0


def migrate(args: argparse.Namespace) -> int:
    done = ModelStore(args.store).migrate(allow_plugins=args.allow_plugins)
    for line in done:
        print(line)
    if not done:
        print(f"{args.store} is current (schema_version {SCHEMA_VERSION}); nothing to do")
    return 0


def dedupe(args: argparse.Namespace) -> int:
    report = link_identical(args.stores)
    for path, source in report.linked:
        print(f"{path} -> {source}")
    print(f"{len(report.linked)} file(s) linked, {report.freed_bytes / 1e6:.1f} MB freed")
    return 0
