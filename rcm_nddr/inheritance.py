"""Config files that build on others: read a YAML config and, recursively, the ``_base_`` files it names
into one mapping, remembering which file set each key so that errors can name it; ``--set a.b=value``
overrides on top."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from rcm_nddr.errors import ConfigError
from rcm_nddr.yamlio import load_yaml

#: for an error about a dotted key: the file (or command line) that set it
Where = Callable[[str], str]

#: the top-level key that lists the configs a config builds on
BASE_KEY = "_base_"

#: dotted key -> the file that set it (``"file (a base of top)"`` for a base), mirroring merged data
Origins = dict[str, str]


def origins_of(data: dict[str, Any], label: str, prefix: str = "") -> Origins:
    out: Origins = {}
    for k, v in data.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        out[dotted] = label
        if isinstance(v, dict):
            out.update(origins_of(v, label, dotted))
    return out


def below(origins: Origins, dotted: str) -> list[str]:
    return [k for k in origins if k == dotted or k.startswith(dotted + ".")]


def merge(
    base: dict[str, Any], base_origins: Origins, top: dict[str, Any], top_origins: Origins, prefix: str = ""
) -> None:
    """Merge ``top`` into ``base`` in place: mappings key by key, anything else (lists too) replaces.
    ``base_origins`` follows along: every key keeps the file it came from."""
    for k, v in top.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base_origins[dotted] = top_origins[dotted]
            merge(base[k], base_origins, v, top_origins, dotted)
        else:
            for key in below(base_origins, dotted):
                del base_origins[key]
            base[k] = copy.deepcopy(v)
            base_origins.update({key: top_origins[key] for key in below(top_origins, dotted)})


def locator(origins: Origins, default: str) -> Where:
    """For an error about a dotted key: the file that set it or the nearest enclosing key, else ``default``."""

    def where(key: str) -> str:
        key = re.sub(r"\[\d+\]", "", key)
        while key:
            if key in origins:
                return origins[key]
            key = key.rpartition(".")[0]
        return default

    return where


def read_mapping(p: Path, label: str) -> dict[str, Any]:
    """One YAML file's top-level mapping (an empty file is an empty mapping)."""
    try:
        raw = p.read_bytes()
        loaded = load_yaml(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1]
        raise ConfigError(f"{label}: not UTF-8 text (byte {exc.start} is {bad!r}); save the file as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{label}: cannot be read: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{label}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def base_paths(data: dict[str, Any], p: Path, label: str) -> list[Path]:
    """The paths named by ``data``'s ``_base_`` key (taken out of ``data``), relative to ``p``'s folder."""
    if BASE_KEY not in data:
        return []
    value = data.pop(BASE_KEY)
    names = value if isinstance(value, list) else [value]
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"{label}: key '{BASE_KEY}': expected a path or a list of paths, got {value!r}")
    return [Path(os.path.normpath(p.parent / n)) for n in names]


def load_tree(p: Path, label: str, top: str, chain: list[Path], bases: list[str]) -> tuple[dict[str, Any], Origins]:
    """``p``'s keys merged over its bases (each loaded the same way, later ones over earlier ones),
    with the file each key came from. ``chain``: the files above ``p`` (resolved), for cycles;
    ``bases`` collects every base file read, in merge order."""
    data = read_mapping(p, label)
    merged: dict[str, Any] = {}
    origins: Origins = {}
    for base in base_paths(data, p, label):
        if not base.is_file():
            raise ConfigError(f"{label}: key '{BASE_KEY}': base config {base} does not exist")
        resolved = base.resolve()
        if resolved in chain:
            cycle = " -> ".join(str(c) for c in [*chain[chain.index(resolved) :], resolved])
            raise ConfigError(f"{label}: key '{BASE_KEY}': the bases form a cycle: {cycle}")
        layer, layer_origins = load_tree(base, f"{base} (a base of {top})", top, [*chain, resolved], bases)
        bases.append(str(base))
        merge(merged, origins, layer, layer_origins)
    merge(merged, origins, data, origins_of(data, label))
    return merged, origins


def parse_override(item: str, where: str = "<command line>") -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML, so ``3`` is an int and ``[1, 2]`` a list)."""
    if "=" not in item:
        raise ConfigError(f"{where}: --set {item!r}: expected key=value, e.g. train.max_iters=100")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{where}: --set {item!r}: malformed key {key!r}")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: --set {item!r}: value is not valid YAML: {exc}") from exc
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str], where: str, schema: type) -> dict[str, Any]:
    """``data`` with each ``a.b=value`` of ``overrides`` set; a key outside the ``schema`` dataclass (walked
    by type hints; free-form mappings below it take any key) is an error."""
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item, where)
        node = data
        cls: Any = schema
        for i, part in enumerate(path[:-1]):
            dotted = ".".join(path[: i + 1])
            hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
            if dataclasses.is_dataclass(cls) and part not in hints:
                raise ConfigError(f"{where}: --set {item!r}: unknown key '{dotted}'")
            cls = hints.get(part, Any)
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{where}: --set {item!r}: '{dotted}' is not a mapping")
            node = child
        node[path[-1]] = value
    return data
