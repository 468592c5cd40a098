"""The host's pip settings, made fit for a pip that runs in a container: what the Docker smoke test
(``scripts/docker-smoke.sh``) gives the pip that installs torch into its stand-in base image.

pip's settings (``pip config list``: its configuration files and ``PIP_*`` variables) may name files
and folders of the host: a constraints or requirements file, wheel folders (``find-links``), local
indexes (``file://`` URLs). Passed into a container as they are, they name paths the container does not
have, and pip fails there (``Could not open requirements file``). Each such path is instead mounted
read-only at the same place when it exists on the host (for a local index in the ``<root>/simple``
layout, its root, whose pages link files beside it), and left out, with the reason, when it does not;
settings that only make sense on the host (its CA bundle, cache and log files) are left out too.

``python -m rcm_nddr.commands.pip_settings`` prints the outcome as tab-separated lines for the shell:
``MOUNT <path>``, ``ENV <PIP_VARIABLE> <value>`` and ``NOTE <what was left out and why>``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

#: settings whose values are paths (or, for find-links, paths or URLs), one or several
PATH_KEYS = frozenset({"constraint", "requirement", "find-links", "client-cert"})
#: settings whose values are index URLs, one or several: a ``file://`` one is a path of the host
URL_KEYS = frozenset({"index-url", "extra-index-url"})
#: settings of the host alone, never passed on, with the reason
HOST_ONLY = {
    "cert": "the image trusts its own CA bundle",
    "cache-dir": "the container's pip keeps no cache",
    "log": "a log file of the host",
    "target": "an install location of the host",
    "prefix": "an install location of the host",
    "root": "an install location of the host",
    "src": "a source folder of the host",
}


@dataclass
class ContainerPip:
    """What the container's pip gets: ``env`` (``PIP_*`` variables), ``mounts`` (host paths to mount
    read-only at the same place) and ``notes`` (what was left out, and why)."""

    env: dict[str, str] = field(default_factory=dict)
    mounts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def parse_config_list(text: str) -> dict[str, str]:
    """The settings of ``pip config list`` output (``section.key='value'`` lines; ``:env:.key`` for
    ``PIP_*`` variables) that apply to ``pip install``: key -> value, a variable overriding a file and
    ``install`` overriding ``global``, as pip itself does."""
    rank = {"global": 0, "install": 1, ":env:": 2}
    found: dict[str, tuple[int, str]] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        section, dot, key = name.strip().rpartition(".")
        if not sep or not dot or section not in rank:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key not in found or rank[section] >= found[key][0]:
            found[key] = (rank[section], value)
    return {key: value for key, (_, value) in found.items()}


def _local_path(item: str, key: str) -> str | None:
    """The host path ``item`` names (None for a remote URL)."""
    parsed = urlparse(item)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme in ("http", "https") or (key in URL_KEYS and parsed.scheme):
        return None
    return os.path.abspath(os.path.expanduser(item))


def _mount_of(path: str, key: str) -> str:
    """What to mount for ``path``: itself, but for a local index in the ``<root>/simple`` layout its root,
    since the index pages link the files beside it (``../../files/...``)."""
    path = path.rstrip("/") or "/"
    if key in URL_KEYS and os.path.basename(path) == "simple":
        return os.path.dirname(path)
    return path


def container_settings(settings: Mapping[str, str], exists: Callable[[str], bool] = os.path.exists) -> ContainerPip:
    """``settings`` (``parse_config_list``) made fit for a container (see the module docstring)."""
    out = ContainerPip()
    for key, value in settings.items():
        if key in HOST_ONLY:
            out.notes.append(f"pip setting {key} left out: {HOST_ONLY[key]}")
            continue
        items = value.split()
        if key in PATH_KEYS | URL_KEYS:
            kept = []
            for item in items:
                path = _local_path(item, key)
                if path is None:
                    kept.append(item)
                elif ":" in path or "," in path:
                    out.notes.append(f"pip setting {key}: {item} left out (a mount cannot name a path with ':' or ',')")
                elif not exists(path):
                    out.notes.append(f"pip setting {key}: {item} left out (no such path on this machine)")
                else:
                    kept.append(item if urlparse(item).scheme == "file" else path)  # (a relative path made absolute)
                    mount = _mount_of(path, key)
                    if mount not in out.mounts:
                        out.mounts.append(mount)
            if not kept:
                continue
            items = kept
        out.env["PIP_" + key.upper().replace("-", "_")] = " ".join(items)
    return out


def host_settings(python: str = sys.executable) -> dict[str, str]:
    """This machine's pip settings for ``pip install`` (``pip config list`` of ``python``)."""
    listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False)
    return parse_config_list(listed.stdout)


def main() -> int:
    result = container_settings(host_settings())
    for path in result.mounts:
        print(f"MOUNT\t{path}")
    for name, value in result.env.items():
        print(f"ENV\t{name}\t{value}")
    for note in result.notes:
        print(f"NOTE\t{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
