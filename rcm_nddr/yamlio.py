"""YAML parsing through libyaml's C parser when PyYAML was built with it (about ten times faster than
the pure-Python parser on a store.yaml, which every store operation reads), with the same safe
constructor, so both give the same Python objects."""

from __future__ import annotations

from typing import Any

import yaml

#: the safe loader; libyaml's when it is there
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, parsed by libyaml where available."""
    return yaml.load(text, Loader=SafeLoader)  # noqa: S506 -- a safe loader (CSafeLoader or SafeLoader)
