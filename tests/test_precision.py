"""Reduced precision of the deploy form: bf16 and int8 (FX graph mode, x86 engine) outputs within their
tolerance of fp32 on a store with NDDR groups, int8 calibrated on the calibration set the store keeps or
on given images, the fallback rules, the probe check catching a broken quantization, int8 falling back to
fp32 with a message where it cannot run, and test.py/predict on the reduced forms."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import rc_run

from rcm_nddr import ModelStore
from rcm_nddr.commands import cli
from rcm_nddr.commands.bench_precision import bench_precision
from rcm_nddr.config import ConfigError, load_config
from rcm_nddr.engine.tester import run_test
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.nn import precision as precision_module
from rcm_nddr.nn.precision import PrecisionError, int8_units, quantize_int8, relative_error
from rcm_nddr.store import StoreError, loading
from rcm_nddr.store.index import StoreIndex
from rcm_nddr.store.integrity import PRECISION_RTOL

pytestmark = pytest.mark.skipif(
    precision_module.int8_unsupported() is not None, reason="int8 needs the x86 quantized engine and AVX2"
)


def overrides(store: Path, synth: Path, bank: Path, tasks: str, *extra: str) -> list[str]:
    return rc_run(store, synth, bank, tasks, "fusion.type=nddr", "train.max_iters=4", "head.channels=16", *extra)


@pytest.fixture(scope="module")
def store(module_tmp, synth, bank) -> Path:
    """An NDDR group of two tasks, then a task reading both."""
    path = module_tmp / "store"
    Trainer(load_config(None, overrides(path, synth, bank, "[semseg, depth]")), progress=False).run()
    Trainer(load_config(None, overrides(path, synth, bank, "[normals]")), progress=False).run()
    return path


def images(n: int = 2, size: tuple[int, int] = (48, 48)) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(5))


def test_the_store_keeps_a_calibration_set_from_its_first_registration(store, synth):
    s = ModelStore(store)
    kept = s.calibration_images()
    assert kept.dtype == torch.uint8 and kept.shape == (6, 3, 48, 48)  # every training sample of the tiny set
    recorded = s.metadata()["calibration"]
    assert recorded["images"] == 6 and recorded["size"] == [48, 48] and "train" in recorded["source"]
    assert not s.add_calibration(kept[:2], "other")  # written once
    assert torch.equal(s.calibration_images(), kept) and s.verify() == []


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_each_precision_is_within_its_tolerance_of_fp32(store, precision):
    s = ModelStore(store)
    fp32 = s.load_model(deploy=True)
    reduced = s.load_model(deploy=True, precision=precision)  # checked on the probes on the way
    x = images()
    with torch.no_grad():
        expected, actual = fp32(x, raw=True), reduced(x, raw=True)
        for name in fp32.task_names:
            assert relative_error(actual[name], expected[name]) <= PRECISION_RTOL[precision], name
        agree = (fp32(x)["semseg"] == reduced(x)["semseg"]).float().mean().item()
    assert agree >= 0.99  # the class maps
    quantized = [m for m in reduced.modules() if type(m).__module__.startswith("torch.ao.nn.quantized")]
    assert bool(quantized) == (precision == "int8")
    if precision == "bf16":
        assert all(p.dtype == torch.bfloat16 for p in reduced.parameters())


def test_int8_units_and_the_fallback_rules(store):
    model = ModelStore(store).load_model(deploy=True)
    units = int8_units(model)
    assert "backbone.paths.normals.stages.layer3" in units and "heads.semseg.aspp" in units
    assert "fusion.normals.layer2.conv" in units
    calibration = [images(4)]
    _, report = quantize_int8(model, calibration)
    assert set(report.errors) == set(units) and set(report.task_errors) == set(model.task_names)
    assert all(report.task_errors[t] <= precision_module.INT8_TASK_RTOL for t in model.task_names)
    # the unit rule: a unit over its tolerance stays fp32 (here every unit, at a tolerance of 0)
    kept, strict = quantize_int8(model, calibration, unit_rtol=0.0)
    assert strict.fp32_units == units and not strict.int8_units
    assert not [m for m in kept.modules() if type(m).__module__.startswith("torch.ao.nn.quantized")]
    # the task rule: units of the task go back to fp32 until its output is within the task tolerance
    _, loose = quantize_int8(model, calibration, unit_rtol=1.0, task_rtol=1e-6)
    assert sorted(loose.fp32_units) == sorted(units) and all(e == 0 for e in loose.task_errors.values())


def test_int8_on_given_calibration_images(store):
    model = ModelStore(store).load_model(deploy=True, precision="int8", calibration=images(8))
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


def test_the_probe_check_catches_a_broken_quantization(store, monkeypatch):
    quantize = loading.quantize_int8

    def broken(model, calibration):
        quantized, report = quantize(model, calibration)
        wrong = copy.deepcopy(model.heads["depth"].predict)  # depth's prediction unit, at a wrong scale
        with torch.no_grad():
            wrong.weight.mul_(3.0)
        quantized.heads["depth"].predict = wrong
        return quantized, report

    monkeypatch.setattr(loading, "quantize_int8", broken)
    with pytest.raises(StoreError, match=r"int8 deploy form does not reproduce.*task 'depth': its int8 outputs"):
        ModelStore(store).load_model(deploy=True, precision="int8")


def test_int8_falls_back_to_fp32_with_a_message_where_it_cannot_run(store, monkeypatch, caplog):
    monkeypatch.setattr(loading, "int8_unsupported", lambda: "this CPU lacks the AVX2 instructions (test)")
    with caplog.at_level(logging.WARNING):
        model = ModelStore(store).load_model(deploy=True, precision="int8")
    assert "int8 is not available: this CPU lacks the AVX2 instructions (test); the model runs in fp32" in caplog.text
    assert not [m for m in model.modules() if type(m).__module__.startswith("torch.ao.nn.quantized")]


def test_precisions_refused_where_they_do_not_apply(store, synth, tmp_path):
    s = ModelStore(store)
    with pytest.raises(PrecisionError, match="precision 'fp16': expected one of fp32, bf16, int8"):
        s.load_model(deploy=True, precision="fp16")
    with pytest.raises(ValueError, match="applies to the deploy form"):
        s.load_model(precision="bf16")
    with pytest.raises(PrecisionError, match="not the batched one"):
        s.load_model(deploy=True, batched=True, precision="int8")
    with pytest.raises(PrecisionError, match="int8 runs on the CPU"):
        s.load_model(deploy=True, precision="int8", device="cuda")
    # a store registered before stores kept a calibration set needs calibration images
    old = tmp_path / "old"
    shutil.copytree(store, old)
    index = StoreIndex(old)
    with index.locked():
        doc = index.read()
        doc.pop("calibration")
        index.write(doc)
    (old / "calibration.safetensors").unlink()
    assert ModelStore(old).verify() == []
    with pytest.raises(StoreError, match="keeps no calibration set.*--calibration DIR"):
        ModelStore(old).load_model(deploy=True, precision="int8")
    # the accuracy benchmark says so before evaluating anything, and takes calibration images instead
    with pytest.raises(ConfigError, match="keeps no calibration set.*--calibration DIR"):
        bench_precision(str(old), str(synth), precisions=["fp32", "int8"], progress=False)
    given = bench_precision(str(old), str(synth), precisions=["int8"], progress=False, calibration=synth / "images")
    assert [row["task"] for row in given["rows"]] == ["semseg", "depth", "normals"] and given["precisions"] == ["int8"]


def test_test_py_evaluates_a_precision(store, synth, bank):
    cfg = load_config(None, overrides(store, synth, bank, "[normals]"))
    fp32 = run_test(cfg, progress=False)
    bf16 = run_test(cfg, progress=False, precision="bf16")
    saved = json.loads((store / "runs" / "normals" / "test_metrics.json").read_text())
    assert saved["precision"] == "bf16" and saved["form"] == "deploy"
    assert bf16["normals"]["mean"] == pytest.approx(fp32["normals"]["mean"], rel=0.02)
    int8 = run_test(cfg, progress=False, precision="int8")
    assert int8["normals"]["mean"] == pytest.approx(fp32["normals"]["mean"], rel=0.05)
    with pytest.raises(Exception, match="a precision of the deploy form"):
        run_test(cfg, progress=False, precision="int8", form="training")


def test_the_accuracy_benchmark_reports_each_task_against_fp32(store, synth, tmp_path, capsys):
    report = bench_precision(str(store), str(synth), progress=False)
    assert [row["task"] for row in report["rows"]] == ["semseg", "depth", "normals"]
    assert report["delta_mtl_vs_fp32"]["fp32"] == 0.0
    for row in report["rows"]:
        assert row["fp32_change_pct"] == 0.0
        assert row["bf16"] == pytest.approx(row["fp32"], rel=0.05, abs=1e-3)
    args = ["bench", "precision", "--store", str(store), "--root", str(synth), "--precisions", "fp32", "bf16"]
    assert cli.main([*args, "--quiet", "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "| semseg | mIoU (higher is better) |" in out and "Delta_MTL of bf16 against fp32" in out
    assert json.loads((tmp_path / "p.json").read_text())["precisions"] == ["fp32", "bf16"]


def test_predict_runs_each_precision(store, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), "RGB").save(folder / f"i{i}.png")
    outputs = {}
    for precision in ("fp32", "bf16", "int8"):
        out = tmp_path / precision
        argv = ["predict", "--store", str(store), "--images", str(folder), "--out", str(out), "--device", "cpu"]
        assert cli.main([*argv, "--precision", precision, "--quiet"]) == 0
        outputs[precision] = np.load(out / "depth" / "i0.npy")
    for precision in ("bf16", "int8"):
        error = np.linalg.norm(outputs[precision] - outputs["fp32"]) / np.linalg.norm(outputs["fp32"])
        assert error <= PRECISION_RTOL[precision], precision
    argv = ["predict", "--store", str(store), "--images", str(folder), "--out", str(tmp_path / "c"), "--device", "cpu"]
    assert cli.main([*argv, "--precision", "int8", "--calibration", str(folder), "--quiet"]) == 0
