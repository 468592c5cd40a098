"""Packaging and first contact: what gets installed, what ``import rcm_nddr`` and ``--help`` load, and
that unrelated ``tasks.py``/``decomp.py`` files in the working directory change nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_run

from rcm_nddr.data.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "numpy", "scipy", "PIL", "safetensors", "skimage", "sklearn", "matplotlib")


def _python(code: str, cwd: Path = REPO) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_and_every_help_load_no_heavy_package():
    code = f"""
import contextlib, io, json, sys
import rcm_nddr
from rcm_nddr.commands import cli
helps = []
for argv in ([], ["data", "synth"], ["pretrain"], ["demo"], ["train"], ["test"], ["store", "verify"],
             ["predict"], ["evaluate"], ["bench"], ["bench", "decomp"], ["bench", "scaling"], ["docker", "run"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        cli.main([*argv, "--help"])
    helps.append(out.getvalue())
for main in (cli.train_main, cli.test_main, cli.decomp_main):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(["--help"])
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
print(json.dumps({{"loaded": loaded, "helps": helps}}))
"""
    result = json.loads(_python(code))
    assert result["loaded"] == []
    top, synth, pretrain, demo = result["helps"][:4]
    assert "predict" in top and "evaluate" in top and "store" in top
    assert "(default: data/SYNTH_MT)" in synth and "(default: 400)" in synth  # defaults are shown
    assert "configs/synthetic/pretrain.yaml" in pretrain
    assert "(default: results/synthetic/resnet18_bank.pth)" in demo
    evaluate = result["helps"][8]
    assert "semseg" in evaluate and "human_parts" in evaluate and "cityscapes" in evaluate  # from entry points


def test_package_exports_resolve_lazily():
    import rcm_nddr

    for name in rcm_nddr.__all__:
        assert getattr(rcm_nddr, name) is not None
    assert set(rcm_nddr.__all__) <= set(dir(rcm_nddr))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rcm_nddr.nope  # noqa: B018


def test_every_package_folder_is_installed_under_the_namespace():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = {"rcm_nddr": "rcm_nddr", **setuptools["package-dir"]}
    folders = set()
    for package, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder).parts
            folders.add(".".join((package, *relative)))
    assert set(setuptools["packages"]) == folders
    assert all(p == "rcm_nddr" or p.startswith("rcm_nddr.") for p in setuptools["packages"])


@pytest.mark.slow
def test_train_test_predict_ignore_tasks_and_decomp_modules_in_the_working_directory(tmp_path):
    """``python -m rcm_nddr`` puts the working directory first on sys.path: the project's own task
    plug-ins and decomposition code must not be looked up there under generic names."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "tasks.py").write_text("raise ImportError('the unrelated tasks.py was imported')\n")
    (work / "decomp.py").write_text("raise ImportError('the unrelated decomp.py was imported')\n")
    data = generate(tmp_path / "SYNTH_MT", 4, 2, size=(48, 48), seed=0, progress=False)
    store = tmp_path / "store"
    config = REPO / "configs" / "synthetic" / "semseg_RC_RI_NFF.yaml"
    # an RC + RI config: the decomposition is computed from the train split (rcm_nddr.decomp at work)
    ri = f"backbone.decomposition={tmp_path / 'ri.safetensors'}"
    overrides = tiny_run(store, data, "[semseg]", "backbone.weights=none", ri, "train.max_iters=2", "train.val_every=2")
    sets = [arg for o in overrides for arg in ("--set", o)]

    def rcm_nddr(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "rcm_nddr", *args]
        return subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600)

    trained = rcm_nddr("train", "--config", str(config), *sets, "--quiet")
    assert trained.returncode == 0, trained.stderr
    tested = rcm_nddr("test", "--config", str(config), *sets, "--quiet")
    assert tested.returncode == 0, tested.stderr
    images = sorted((data / "images").iterdir())[:2]
    out = tmp_path / "pred"
    predicted = rcm_nddr("predict", "--store", str(store), "--images", *map(str, images), "--out", str(out), "--quiet")
    assert predicted.returncode == 0, predicted.stderr
    assert np.load(out / "semseg" / f"{images[0].stem}.npy").shape == (48, 48)
    assert (tmp_path / "ri.safetensors").is_file()
