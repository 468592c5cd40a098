"""Shared test fixtures: a tiny dataset written in the SYNTH_MT / NYUD-MT folder layout."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_SIZE = (12, 16)
TINY_CLASSES = {"semseg": ["wall", "floor", "box", "ball"], "parts": ["top", "side"]}


def write_layout(
    root: Path, size: tuple[int, int] = TINY_SIZE, n_train: int = 3, n_val: int = 2, seed: int = 0
) -> Path:
    """Write ``n_train + n_val`` random but valid samples in the folder layout under ``root``."""
    rng = np.random.default_rng(seed)
    h, w = size
    ids = [f"{i:06d}" for i in range(n_train + n_val)]
    for folder in ("gt_sets", "images", "segmentation", "parts", "depth", "normals", "edge", "sal"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    cameras = {}
    for sample_id in ids:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(
            root / "images" / f"{sample_id}.png"
        )
        for folder, n in (("segmentation", len(TINY_CLASSES["semseg"])), ("parts", len(TINY_CLASSES["parts"]))):
            labels = rng.integers(0, n + 1, (h, w), dtype=np.uint8)  # 0 = ignore, k + 1 = class k
            Image.fromarray(labels, "L").save(root / folder / f"{sample_id}.png")
        depth = rng.uniform(0.5, 5.0, (h, w)).astype(np.float32)
        invalid = rng.random((h, w)) < 0.1
        depth[invalid] = 0.0
        np.save(root / "depth" / f"{sample_id}.npy", depth)
        normals = rng.normal(size=(h, w, 3)).astype(np.float32)
        normals[..., 2] = -np.abs(normals[..., 2]) - 0.1  # facing the camera (z forward)
        normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
        normals[invalid] = 0.0
        np.save(root / "normals" / f"{sample_id}.npy", normals)
        edge = np.where(rng.random((h, w)) < 0.2, 255, 0).astype(np.uint8)
        Image.fromarray(edge, "L").save(root / "edge" / f"{sample_id}.png")
        sal = np.where(rng.random((h, w)) < 0.4, 255, 0).astype(np.uint8)
        Image.fromarray(sal, "L").save(root / "sal" / f"{sample_id}.png")
        cameras[sample_id] = {"fx": float(w), "fy": float(w), "cx": w / 2, "cy": h / 2}
    (root / "gt_sets" / "train.txt").write_text("".join(f"{i}\n" for i in ids[:n_train]))
    (root / "gt_sets" / "val.txt").write_text("".join(f"{i}\n" for i in ids[n_train:]))
    (root / "cameras.json").write_text(json.dumps(cameras))
    meta = {
        "name": "SYNTH_MT",
        "generator_version": "test",
        "seed": seed,
        "size": [h, w],
        "splits": {"train": n_train, "val": n_val},
        "classes": TINY_CLASSES,
        "depth_unit": "m",
        "normals_frame": "camera: x right, y down, z forward",
        "files": {},
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def tiny_layout(tmp_path: Path) -> Path:
    """A dataset root with 3 train and 2 val samples of 12 x 16 pixels in the folder layout."""
    return write_layout(tmp_path / "SYNTH_MT")


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """The SYNTH_MT dataset most training tests share (6 train and 2 val samples of 48 x 48), rendered
    once per session; tests read it and never write into it."""
    from rcm_nddr.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("data") / "SYNTH_MT", 6, 2, size=(48, 48), seed=0, progress=False)


@pytest.fixture(scope="session")
def bank(tmp_path_factory) -> Path:
    """A pretrained-weights file (random, fixed) that model stores' filter banks are made from."""
    import torch

    from rcm_nddr.nn.backbone import resnet_backbone

    path = tmp_path_factory.mktemp("bank") / "resnet18.pth"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(resnet_backbone("resnet18").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """A directory for the files one test module shares (stores, runs), removed when the module's tests
    end unless one of them failed: training stores take hundreds of MB each, and the session's own
    cleanup would keep every module's until the whole run is over."""
    failed_before = request.session.testsfailed
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def aot_eager_compile(monkeypatch) -> list[str]:
    """Makes the project's ``torch.compile`` calls (``rcm_nddr.engine.fast.maybe_compile``) trace with
    TorchDynamo and run the graphs with the ``aot_eager`` backend: the same tracing, autograd and guards as
    the default inductor backend, without its minutes of C++ code generation on a CPU. Returns the list of
    the modes asked for, one entry per compiled module."""
    import torch

    from rcm_nddr.engine import fast

    modes: list[str] = []
    compile_ = torch.compile

    def compile_for_test(module, mode):
        modes.append(mode)
        return compile_(module, backend="aot_eager")

    monkeypatch.setattr(fast.torch, "compile", compile_for_test)
    return modes


class RecordedCompile:
    """What ``recorded_compile`` returns for each compiled module: the module itself, wrapped so a test can
    tell that the compiled object (and not the eager module) is the one that ran."""

    def __init__(self, module, mode: str) -> None:
        self.module, self.mode, self.calls = module, mode, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.module, name)


@pytest.fixture
def recorded_compile(monkeypatch) -> list[RecordedCompile]:
    """Replaces the project's ``torch.compile`` calls (``rcm_nddr.engine.fast.maybe_compile``) by a wrapper
    that records the mode and counts the calls, without tracing: for tests of which networks a command
    compiles and runs. TorchDynamo itself (with ``aot_eager``) runs in the tests that use
    ``aot_eager_compile`` (tests/test_fast.py, tests/test_deploy.py)."""
    from rcm_nddr.engine import fast

    compiled: list[RecordedCompile] = []

    def record(module, mode):
        compiled.append(RecordedCompile(module, mode))
        return compiled[-1]

    monkeypatch.setattr(fast.torch, "compile", record)
    return compiled


#: the modules whose tests train or run real (tiny) networks end to end, start processes or run the
#: commands: the ``integration`` tier. The rest is the ``unit`` tier (``make test-fast``). ``slow`` marks
#: the longest tests of either tier, the slow tier: ``make test`` leaves them to ``make test-slow`` (CI runs both).
INTEGRATION_MODULES = {
    "test_artifacts",
    "test_bench_scaling",
    "test_baselines",
    "test_bench_speed",
    "test_cli",
    "test_deploy",
    "test_distributed",
    "test_engine",
    "test_errors",
    "test_evaluate",
    "test_evaluated",
    "test_fast",
    "test_incremental",
    "test_nddr",
    "test_objectives_training",
    "test_plugin_task",
    "test_precision",
    "test_predict",
    "test_pretrain",
    "test_protocols",
    "test_rc_pretrained",
    "test_real_configs",
    "test_sources_auto",
    "test_store_trust",
    "test_study",
}


def pytest_configure(config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n auto``), each worker and the processes its tests start
    use their share of the cores: two processes that each run as many torch threads as there are cores
    slow each other down several times over (spinning OpenMP threads). Runs before torch is imported."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // int(workers)))


def pytest_collection_modifyitems(config, items) -> None:
    """Sort the tests into tiers (``unit`` or ``integration``), skip the tests marked ``cuda`` where no
    CUDA device is present, and run the integration tier first: under pytest-xdist (``make test`` runs
    ``--dist loadfile``: a file's tests run on one worker, so its module fixtures are built once) the long
    files start early and the short ones fill the workers' last minutes."""
    import torch

    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        item.add_marker(pytest.mark.integration if module in INTEGRATION_MODULES else pytest.mark.unit)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
    items.sort(key=lambda item: "integration" not in item.keywords)  # stable: files and tests keep their order
