"""The shipped NYUD and PASCAL-Context configs run end to end on tiny datasets in the published layouts:
train (registering in a store), test.py --save-predictions, and rcm-nddr evaluate on those files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_nyud import _split as write_nyud_split
from test_nyud import write_astmt
from test_pascal import write_sample, write_split

from rcm_nddr.commands import cli
from rcm_nddr.config import load_config
from rcm_nddr.store import ModelStore

REPO = Path(__file__).resolve().parents[1]


def smoke(store: Path, root: Path, *extra: str) -> list[str]:
    """Overrides shrinking a paper config to a few CPU seconds (the protocol keys stay as shipped)."""
    overrides = [
        f"store={store}",
        f"dataset.root={root}",
        "dataset.crop=[32, 32]",
        "backbone.weights=none",  # no ImageNet weights offline
        f"backbone.decomposition={store.parent / 'ri.safetensors'}",
        "head.channels=8",
        "train.max_iters=2",
        "train.val_every=2",
        "train.batch_size=2",
        "train.num_workers=0",
        "train.device=cpu",
        "test.batch_size=2",
        *extra,
    ]
    return [a for o in overrides for a in ("--set", o)]


def train_test_evaluate(config: Path, store: Path, root: Path, dataset: str, task: str, capsys, *extra: str):
    args = ["--config", str(config), "--quiet", *smoke(store, root, *extra)]
    assert cli.train_main(args) == 0
    assert [t.name for t in ModelStore(store).tasks] == [task]
    pred = store.parent / "pred"
    assert cli.test_main([*args, "--save-predictions", str(pred)]) == 0
    tested = json.loads((store / "runs" / task / "test_metrics.json").read_text())["metrics"][task]
    capsys.readouterr()
    # the saved predictions scored apart under the config's protocol give the same numbers
    protocol = ["--protocol", load_config(config).protocol]
    evaluate = ["evaluate", "--dataset", dataset, "--root", str(root), "--task", task, "--pred", str(pred), *protocol]
    assert cli.main(evaluate) == 0
    # `--json` is not used here so the text output is covered too; read the JSON through a second call
    assert f"{task} on {dataset} val" in capsys.readouterr().out
    assert cli.main([*evaluate, "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)["metrics"]
    assert evaluated.keys() == tested.keys()
    for key, value in tested.items():
        if value is not None:
            assert evaluated[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
    return tested


def test_pascal_human_parts_rc_ri_nff_config(tmp_path, capsys):
    root = tmp_path / "PASCAL_MT"
    train_ids, val_ids = ["t0", "t1", "t2", "t3"], ["v0", "v1", "v2"]
    for i, sid in enumerate(train_ids + val_ids):
        write_sample(root, sid, seed=i, person=sid not in ("t3", "v2"))
    write_split(root, train_ids, "train")
    write_split(root, val_ids, "val")
    metrics = train_test_evaluate(
        REPO / "configs" / "PascalContext" / "human_parts_RC_RI_NFF.yaml",
        tmp_path / "store",
        root,
        "pascal",
        "human_parts",
        capsys,
    )
    assert 0 <= metrics["mIoU"] <= 100


def test_nyud_edge_single_task_config(tmp_path, capsys):
    root = tmp_path / "NYUD_MT"
    train_ids, val_ids = ["0001", "0002", "0003"], ["0004", "0005"]
    for i, sid in enumerate(train_ids + val_ids):
        write_astmt(root, sid, seed=i)
    write_nyud_split(root, train_ids, "train")
    write_nyud_split(root, val_ids, "val")
    metrics = train_test_evaluate(
        REPO / "configs" / "NYUD" / "edge_single_task.yaml", tmp_path / "store", root, "nyud", "edge", capsys
    )
    assert 0 <= metrics["odsF"] <= 100
