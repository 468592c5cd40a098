"""What the SYNTH_MT study scripts share: one training run per cell in its own store (resumable, skipped
once finished), the data and filter bank the synthetic configs name, mean and standard deviation."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BANK = Path("results/synthetic/resnet18_bank.pth")
RC_BANK = Path("results/synthetic/resnet18_rc_bank.pth")
DATA = Path("data/SYNTH_MT")


def train_cell(store: Path, config: Path, overrides: list[str], group: str) -> dict:
    """Train ``config`` with ``overrides`` into ``store`` (``train.py --auto-resume``, one thread, log in
    ``<store>/train.log``); returns ``metrics`` and ``objective`` of ``runs/<group>/metrics.json``, the wall
    ``seconds`` and whether the run ``resumed`` from a checkpoint (its time then covers part of it only)."""
    command = [sys.executable, str(REPO / "train.py"), "--config", str(config), "--auto-resume"]
    for item in [f"store={store}", *overrides]:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    store.mkdir(parents=True, exist_ok=True)
    resumed = any(store.glob("checkpoints/*/last.pt"))
    start = time.monotonic()
    with open(store / "train.log", "w") as logfile:
        done = subprocess.run(command, env=env, stdout=logfile, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"{store.name} failed (exit {done.returncode}); see {store / 'train.log'}")
    summary = json.loads((store / "runs" / group / "metrics.json").read_text())
    return {
        "metrics": summary["metrics"],
        "objective": summary.get("objective"),
        "seconds": seconds,
        "resumed": resumed,
    }


def prepare() -> None:
    """The SYNTH_MT data and the pretrained networks the configs name (plain, and in RC form for the RC
    variant), made when missing."""
    cli = [sys.executable, "-m", "rcm_nddr"]
    if not (REPO / DATA / "meta.json").is_file():
        subprocess.run(
            [*cli, "data", "synth", "--out", str(DATA), "--train", "320", "--val", "80"], cwd=REPO, check=True
        )
    for bank, config in ((BANK, "pretrain.yaml"), (RC_BANK, "pretrain_rc.yaml")):
        if not (REPO / bank).is_file():
            config = f"configs/synthetic/{config}"
            subprocess.run([*cli, "pretrain", "--config", config, "--out", str(bank)], cwd=REPO, check=True)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
