"""The rcm-nddr command: data synth, the demo (tiny), python -m rcm_nddr, and error reporting."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcm_nddr import ModelStore
from rcm_nddr.commands import cli
from rcm_nddr.commands.demo import BENCHMARK_SPEC, _run_jobs, run_demo
from rcm_nddr.config import load_config
from rcm_nddr.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def test_data_synth_command(tmp_path, capsys):
    out = tmp_path / "synth"
    args = ["data", "synth", "--out", str(out), "--train", "3", "--val", "2", "--size", "32", "40", "--quiet"]
    assert cli.main(args) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["size"] == [32, 40] and meta["splits"] == {"train": 3, "val": 2}
    assert len((out / "gt_sets" / "train.txt").read_text().split()) == 3
    assert cli.main(args) == 0  # same arguments: the dataset is reused
    assert cli.main([*args, "--seed", "5"]) == 2  # different dataset in the same place
    assert "pick another directory" in capsys.readouterr().err
    assert cli.main(["data", "synth", "--out", str(tmp_path / "small"), "--size", "8", "8", "--quiet"]) == 2
    assert "size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["data", "synth", "--train", "-1"])


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "rcm_nddr", "--help"], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert result.returncode == 0
    for command in ("data", "demo", "train", "test"):
        assert command in result.stdout


def test_plugins_key_errors_name_the_key(tmp_path):
    cfg = load_config(None, ["tasks=[semseg]", f"dataset.root={tmp_path}", f"plugins=[{tmp_path / 'absent.py'}]"])
    with pytest.raises(Exception, match=r"key 'plugins': plug-in file .*absent.py does not exist"):
        Trainer(cfg, progress=False)


def _lane_job(value: int, progress: bool) -> tuple[int, int, int, bool]:
    """A demo job for the test below: what it was given, the process it ran in and its thread count."""
    if value < 0:
        raise ValueError(f"job {value} fails")
    return value, os.getpid(), torch.get_num_threads(), progress


def test_demo_lanes_run_jobs_in_processes_and_return_their_results_in_order():
    jobs = [(_lane_job, (k,)) for k in range(5)]
    # one lane: the jobs run here, one after the other, with the demo's progress setting
    assert _run_jobs(jobs, 1, progress=True) == [(k, os.getpid(), torch.get_num_threads(), True) for k in range(5)]
    results = _run_jobs(jobs, 2, progress=False)
    assert [r[0] for r in results] == list(range(5))
    assert os.getpid() not in {r[1] for r in results} and len({r[1] for r in results}) <= 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert {r[2] for r in results} == {max(1, cores // 2)}  # each lane its share of the cores
    assert not any(r[3] for r in results)  # no per-job progress bars in the lanes
    with pytest.raises(ValueError, match="job -1 fails"):
        _run_jobs([(_lane_job, (0,)), (_lane_job, (-1,)), (_lane_job, (2,))], 2, progress=False)


@pytest.mark.slow  # the whole main job, twice (about a minute)
def test_tiny_demo_runs_the_incremental_sequence(tmp_path, capsys):
    bank = tmp_path / "demo" / "resnet18_bank.pth"
    tiny = dict(bank=bank, n_train=4, n_val=2, size=(48, 48), max_iters=1, pretrain_iters=1, progress=False)
    stale = tmp_path / "demo" / "resnet18_bank_ri.safetensors"  # the decomposition of an earlier bank
    stale.parent.mkdir()
    stale.write_bytes(b"not the decomposition of the bank the demo pretrains")
    summary = run_demo(out=tmp_path / "demo", data=tmp_path / "SYNTH_MT", **tiny)
    configs = REPO / "configs" / "synthetic" / "incremental"
    sequence = [load_config(p).tasks for p in sorted(configs.glob("*.yaml"))]
    assert len(sequence[0]) == 2 and all(len(tasks) == 1 for tasks in sequence[1:])
    rows = summary["rows"]
    names = [t for tasks in sequence for t in tasks]
    assert [r["task"] for r in rows] == names
    for r in rows:
        assert r["RC_RI_NFF_parameters"] < r["single_task_parameters"] / 2  # the bank is shared, not owned
        assert r["RC_RI_NFF_NDDR_parameters"] > r["RC_RI_NFF_parameters"]  # plus its NDDR layers
        assert {"trivial", "single_task", "RC_RI_NFF", "RC_RI_NFF_NDDR", "delta_RC_RI_NFF_NDDR"} <= set(r)
        group_mates = [t for tasks in sequence if r["task"] in tasks for t in tasks if t != r["task"]]
        older = [t for tasks in sequence[: next(k for k, g in enumerate(sequence) if r["task"] in g)] for t in tasks]
        assert sorted(r["reads"]) == sorted(older + group_mates)
    assert [s["verified"] for s in summary["steps"]] == [names[: 2 + k] for k in range(len(sequence))]
    store = ModelStore(tmp_path / "demo" / "incremental")
    assert [t.name for t in store.tasks] == names and store.verify() == []
    # one bank, decomposition and calibration set on disk for the three stores (hard links)
    for name, stores in (("filter_bank", 2), ("ri", 2), ("calibration", 3)):
        files = list((tmp_path / "demo").glob(f"*/{name}.safetensors"))
        assert len(files) == stores and len({f.stat().st_ino for f in files}) == 1
    assert (tmp_path / "demo" / "resnet18_bank.pth").is_file()
    ri = tmp_path / "demo" / "resnet18_bank_ri.safetensors"  # the decomposition the stores' copies link to
    assert ri.stat().st_ino == (tmp_path / "demo" / "incremental" / "ri.safetensors").stat().st_ino
    table = capsys.readouterr().out
    assert table.startswith("| task | reads | metric | trivial | single_task | RC_RI_NFF | RC_RI_NFF_NDDR")
    assert f"{summary['delta_mtl']['RC_RI_NFF_NDDR']:+.2f}%" in table
    # the table says which bank the numbers come from: the quick one it pretrained, by its recipe
    assert summary["bank"]["iterations"] == 1 and summary["bank"]["dataset"]["root"] == str(tmp_path / "SYNTH_MT")
    assert f"filter bank: {bank} (1 iterations of semseg+depth+normals, batch 8, on {tmp_path / 'SYNTH_MT'}" in table
    # and where the multi-seed figures are: a spec the repository ships
    assert f"rcm-nddr study --spec {BENCHMARK_SPEC}`" in table and (REPO / BENCHMARK_SPEC).is_file()
    assert (tmp_path / "demo" / "demo_results.md").read_text().strip() == table.strip()
    assert json.loads((tmp_path / "demo" / "demo_results.json").read_text())["rows"] == rows
    # a second run starts its stores afresh and reuses the bank (on the sequence's last step alone)
    shorter = tmp_path / "configs"
    shutil.copytree(REPO / "configs", shorter)  # the configs' _base_ paths are relative to them
    for step in sorted((shorter / "synthetic" / "incremental").glob("*.yaml"))[:-1]:
        step.unlink()  # the sequence's last step alone: one task
    written = bank.stat().st_mtime_ns
    # (in one lane: its runs one after the other in this process)
    again = run_demo(out=tmp_path / "demo", data=tmp_path / "SYNTH_MT", configs=shorter / "synthetic", lanes=1, **tiny)
    assert [r["task"] for r in again["rows"]] == sequence[-1] == [t.name for t in store.tasks]
    assert again["rows"][0]["reads"] == []
    assert bank.stat().st_mtime_ns == written


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_with_bf16_autocast(tmp_path):
    data = tmp_path / "SYNTH_MT"
    cli.main(["data", "synth", "--out", str(data), "--train", "4", "--val", "2", "--size", "48", "48", "--quiet"])
    cfg = load_config(
        None,
        [
            "tasks=[semseg, normals]",
            f"store={tmp_path / 'store'}",
            f"dataset.root={data}",
            "dataset.crop=[48, 48]",
            "train.max_iters=3",
            "train.batch_size=2",
            "train.num_workers=0",
            "train.device=cuda",
            "train.amp=true",
        ],
    )
    trainer = Trainer(cfg, progress=False)
    assert trainer.device.type == "cuda"
    metrics = trainer.fit()
    assert set(metrics) == {"semseg", "normals"}


def test_the_official_rcm_flags_are_accepted():
    """``train.py --gpu_id N`` and ``test.py --log_performance FILE`` as the official RCM README writes them."""
    from rcm_nddr.commands.cli import parser

    args = parser().parse_args(["train", "--config", "c.yaml", "--set", "train.seed=1", "--gpu_id", "1"])
    assert args.overrides == ["train.seed=1", "train.device=cuda:1"]
    again = parser().parse_args(["train", "--config", "c.yaml"])
    assert again.overrides == []  # the default list is not shared between parses
    args = parser().parse_args(["test", "--config", "c.yaml", "--gpu_id", "0", "--log_performance", "perf.csv"])
    assert args.log_performance == "perf.csv" and args.overrides == ["train.device=cuda:0"]
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--config", "c.yaml", "--gpu_id", "-1"])
