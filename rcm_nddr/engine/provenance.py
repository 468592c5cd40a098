"""Run provenance: what produced a result (packages, torch/CUDA/cuDNN, devices, source commit, Docker
image, config hash, seed, command line). Training writes it to ``runs/<group>/env.json`` and the model
store keeps it in each task's record; ``test.py`` adds it to its metrics JSON."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from rcm_nddr.config import Config
from rcm_nddr.engine import distributed
from rcm_nddr.files import file_sha256
from rcm_nddr.source import git_output, source_tree

#: the distribution this package is installed as
DISTRIBUTION = "rcm-nddr"
#: recorded even when the installed metadata cannot be read (e.g. running from a source tree)
CORE_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "safetensors", "pyyaml", "pillow")
#: environment variables of the launcher and of the Docker image that describe the run
LAUNCH_VARIABLES = ("LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
IMAGE_VARIABLES = {"image": "RCM_NDDR_IMAGE", "image_id": "RCM_NDDR_IMAGE_ID", "repo_digests": "RCM_NDDR_IMAGE_DIGESTS"}
GIT_VARIABLES = {"commit": "RCM_NDDR_GIT_COMMIT", "dirty": "RCM_NDDR_GIT_DIRTY"}


def config_sha256(cfg: Config) -> str:
    """sha256 of the resolved config (file plus ``--set`` overrides) as canonical JSON."""
    canonical = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _file_sha256(path: str) -> str | None:
    try:
        return file_sha256(path)
    except OSError:  # a config given as a pipe or removed since it was read
        return None


def package_versions() -> dict[str, str | None]:
    """Versions of this package and of every package it requires (None: not installed)."""
    names = [DISTRIBUTION, *CORE_PACKAGES]
    try:
        for requirement in importlib.metadata.requires(DISTRIBUTION) or []:
            if "extra ==" in requirement:
                continue
            match = re.match(r"[A-Za-z0-9._-]+", requirement)
            if match:
                names.append(match.group(0))
    except importlib.metadata.PackageNotFoundError:
        pass
    versions: dict[str, str | None] = {}
    for name in dict.fromkeys(n.lower() for n in names):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def devices() -> dict[str, Any]:
    out: dict[str, Any] = {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["cuda"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                "memory_bytes": torch.cuda.get_device_properties(i).total_memory,
            }
            for i in range(torch.cuda.device_count())
        ]
    else:
        out["cuda"] = []
    return out


def torch_build() -> dict[str, Any]:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "version": str(torch.__version__),
        "git_version": getattr(torch.version, "git_version", None),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def git_state(root: Path | None = None) -> dict[str, Any]:
    """The commit of the source tree and whether it has uncommitted changes. Outside a git checkout
    (an installed package, a Docker image) the values baked in at image build time are used."""
    root = root or source_tree()
    if (root / ".git").exists():
        commit = git_output(root, "rev-parse", "HEAD")
        status = git_output(root, "status", "--porcelain")  # untracked files count: they may be imported or copied
        if commit is not None:
            return {"commit": commit.strip(), "dirty": bool(status and status.strip()), "source": "git"}
    commit = os.environ.get(GIT_VARIABLES["commit"])
    if commit:
        dirty = os.environ.get(GIT_VARIABLES["dirty"], "").lower()
        return {"commit": commit, "dirty": {"true": True, "false": False}.get(dirty), "source": "image"}
    return {"commit": None, "dirty": None, "source": None}


def container() -> dict[str, Any]:
    """Whether this runs in a container, and the image ``rcm-nddr docker run`` started it from."""
    inside = Path("/.dockerenv").exists()
    if not inside:
        try:
            inside = any(word in Path("/proc/1/cgroup").read_text() for word in ("docker", "containerd"))
        except OSError:
            pass
    out: dict[str, Any] = {"in_container": inside}
    out.update({key: os.environ.get(variable) for key, variable in IMAGE_VARIABLES.items()})
    if out["repo_digests"] is not None:  # (none for an image built here and never pushed: its id is its digest)
        out["repo_digests"] = out["repo_digests"].split()
    return out


def collect(cfg: Config | None = None, argv: list[str] | None = None) -> dict[str, Any]:
    """Everything ``env.json`` records about the current process (and ``cfg``, when given)."""
    ctx = distributed.context()
    info: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": {"argv": list(sys.argv if argv is None else argv), "cwd": os.getcwd(), "python": sys.executable},
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "torch": torch_build(),
        "devices": devices(),
        "git": git_state(),
        "container": container(),
        "distributed": {
            "world_size": ctx.world_size,
            "backend": distributed.backend(),
            **{name.lower(): os.environ[name] for name in LAUNCH_VARIABLES if name in os.environ},
        },
    }
    if cfg is not None:
        info["config"] = {
            "path": cfg.source,
            "file_sha256": _file_sha256(cfg.source),
            "sha256": config_sha256(cfg),
        }
        info["seed"] = cfg.train.seed
    return info
