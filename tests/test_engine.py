"""Training engine on a tiny generated SYNTH_MT: a run is built without writing anything, then trains
end to end (outputs, resume, NaN abort, plug-in tasks), test.py's metrics JSON and CSV, the command-line
entry points; the optimizer's groups and schedules on a toy module."""

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_run
from rcm_nddr.decomp import load_decomposition
from torch import nn

from rcm_nddr.commands import cli
from rcm_nddr.config import ConfigError, load_config
from rcm_nddr.data.synthetic import generate
from rcm_nddr.engine import run as run_module
from rcm_nddr.engine.builders import build_optimizer, build_scheduler, lr_factor
from rcm_nddr.engine.checkpoint import load_checkpoint
from rcm_nddr.engine.evaluate import to_json
from rcm_nddr.engine.tester import run_test
from rcm_nddr.engine.trainer import NonFiniteLossError, RunExistsError, Trainer
from rcm_nddr.store import ModelStore

PLUGIN = str(Path(__file__).parent / "plugins" / "toy_tasks.py")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "SYNTH_MT", 8, 4, size=(48, 48), seed=1, progress=False)


def tiny(store: Path, data: Path, tasks: str, *extra: str) -> list[str]:
    return tiny_run(
        store,
        data,
        tasks,
        "optimizer.name=adam",
        "optimizer.lr=0.001",
        "train.max_iters=6",
        "train.val_every=3",
        "train.log_every=1",
        "test.batch_size=4",
        *extra,
    )


def test_train_then_test_writes_every_output(tmp_path, synth):
    cfg = load_config(None, tiny(tmp_path / "store", synth, "[semseg, depth]"))
    trainer = Trainer(cfg, progress=False)
    metrics = trainer.fit()
    assert set(metrics) == {"semseg", "depth"} and "mIoU" in metrics["semseg"] and "rmse" in metrics["depth"]
    run = tmp_path / "store" / "runs" / "semseg+depth"
    assert load_config(run / "config.yaml").to_dict() == {**cfg.to_dict()}
    assert json.loads((run / "metrics.json").read_text())["iteration"] == 6
    assert list(run.glob("events.out.tfevents.*"))
    last = load_checkpoint(tmp_path / "store" / "checkpoints" / "semseg+depth" / "last.pt")
    best = load_checkpoint(tmp_path / "store" / "checkpoints" / "semseg+depth" / "best.pt")
    assert last["iteration"] == 6 and best["iteration"] in (3, 6)

    csv_path = tmp_path / "perf.csv"
    deployed = run_test(cfg, log_performance=csv_path, checkpoint="last", progress=False)  # the deploy form
    assert json.loads((run / "test_metrics.json").read_text())["form"] == "deploy"
    for name, values in metrics.items():  # folding rounds differently, nothing more
        assert deployed[name] == pytest.approx(values, rel=1e-4, abs=1e-6), name
    tested = run_test(cfg, log_performance=csv_path, checkpoint="last", progress=False, form="training")
    assert tested == metrics  # the last checkpoint is the model that produced the final validation
    saved = json.loads((run / "test_metrics.json").read_text())
    assert saved["metrics"] == tested and saved["iteration"] == 6 and saved["form"] == "training"
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("config,store,group,task") and len(lines) == 5  # one header, 2 runs x 2 tasks
    rows = list(csv.DictReader(csv_path.open()))
    assert {r["task"] for r in rows} == {"semseg", "depth"}
    assert all(json.loads(r["metrics"])[r["primary"]] == pytest.approx(float(r["value"]), rel=1e-5) for r in rows)


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, synth, workers):
    extra = (f"train.num_workers={workers}", "train.max_iters=8", "train.val_every=4")
    straight = Trainer(load_config(None, tiny(tmp_path / "a", synth, "[normals]", *extra)), progress=False)
    straight.fit()
    cfg = load_config(None, tiny(tmp_path / "b", synth, "[normals]", *extra))
    Trainer(cfg, progress=False).fit(stop_after=3)  # interrupted between validations
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "normals" / "last.pt")["iteration"] == 3
    resumed = Trainer(cfg, resume=True, progress=False)
    assert resumed.iteration == 3
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.last_metrics == straight.last_metrics


def test_a_fresh_run_does_not_overwrite_checkpoints_unless_asked(tmp_path, synth):
    cfg = load_config(None, tiny(tmp_path, synth, "[sal]", "train.max_iters=2"))
    Trainer(cfg, progress=False).fit()
    with pytest.raises(RunExistsError, match="--resume"):
        Trainer(cfg, progress=False)
    Trainer(cfg, overwrite=True, progress=False).fit()
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        Trainer(load_config(None, tiny(tmp_path / "other", synth, "[sal]")), resume=True, progress=False)


def test_plugin_task_type_from_outside_the_package_trains(tmp_path, synth):
    cfg = load_config(
        None, tiny(tmp_path, synth, "[inverse_depth]", f"plugins=[{PLUGIN}]", "loss.inverse_depth.scale=2.0")
    )
    trainer = Trainer(cfg, progress=False)
    assert trainer.tasks["inverse_depth"].scale == 2.0
    metrics = trainer.fit()
    assert metrics["inverse_depth"]["mse"] >= 0
    bad = load_config(
        None, tiny(tmp_path, synth, "[inverse_depth]", f"plugins=[{PLUGIN}]", "loss.inverse_depth.scal=2")
    )
    with pytest.raises(
        Exception, match=r"key 'loss.inverse_depth' of task type 'inverse_depth':.*scal.*it takes: scale"
    ):
        Trainer(bad, overwrite=True, progress=False)


def test_non_finite_loss_aborts_naming_iteration_and_task_and_keeps_last_checkpoint(tmp_path, synth):
    cfg = load_config(
        None,
        tiny(
            tmp_path, synth, "[nan_after_4]", f"plugins=[{PLUGIN}]", "train.checkpoint_every=2", "train.val_every=100"
        ),
    )
    trainer = Trainer(cfg, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"task 'nan_after_4' is nan at iteration 5"):
        trainer.fit()
    last = load_checkpoint(tmp_path / "checkpoints" / "nan_after_4" / "last.pt")
    assert last["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_entry_points_and_their_errors(tmp_path, synth, capsys):
    config = tmp_path / "edge.yaml"
    config.write_text("tasks: [edge]\n")
    args = ["--config", str(config), "--quiet"]
    for item in tiny(tmp_path / "store", synth, "[edge]", "train.max_iters=2")[1:]:
        args += ["--set", item]
    assert cli.train_main(args) == 0
    assert cli.test_main([*args, "--log-performance", str(tmp_path / "p.csv")]) == 0
    assert (tmp_path / "p.csv").read_text().count("\n") == 2
    assert cli.train_main([*args, "--set", "train.max_iters=oops"]) == 2
    assert "key 'train.max_iters': expected int" in capsys.readouterr().err
    assert cli.train_main(args) == 2  # registered (the finished run's checkpoints are removed): --replace needed
    assert "already registers 'edge'" in capsys.readouterr().err
    kept = [*args, "--set", "train.keep_checkpoints=true", "--set", f"store={tmp_path / 'kept'}"]
    assert cli.train_main(kept) == 0
    assert cli.train_main(kept) == 2  # checkpoints exist and neither --resume nor --overwrite
    assert "--resume" in capsys.readouterr().err
    assert cli.train_main([*args, "--set", f"dataset.root={tmp_path / 'absent'}"]) == 2
    assert "key 'dataset.root'" in capsys.readouterr().err
    assert cli.train_main([*args, "--set", "tasks=[no_such_task]", "--overwrite"]) == 2
    assert "unknown task type 'no_such_task'" in capsys.readouterr().err


def test_building_a_run_writes_nothing_until_it_starts(tmp_path, synth, monkeypatch):
    """Every check comes before the first write: constructing a Trainer (even one that computes its RI
    decomposition, which defaults to a file inside the store) leaves the disk as it was, and so does an
    error anywhere in the build; the run's files appear when it starts."""
    store = tmp_path / "store"
    rc = ("backbone.reparam=rc", "backbone.weights=none")
    bad = load_config(None, tiny(store, synth, "[inverse_depth]", f"plugins=[{PLUGIN}]", "loss.inverse_depth.scal=2"))
    with pytest.raises(ConfigError, match="scal"):
        Trainer(bad, progress=False)
    assert not store.exists()

    cfg = load_config(None, tiny(store, synth, "[sal]", *rc))

    def late_error(*args, **kwargs):
        raise ConfigError("refused at the end of the build")

    with monkeypatch.context() as m:
        m.setattr(run_module, "build_optimizer", late_error)  # after the data, the decomposition and the model
        with pytest.raises(ConfigError, match="end of the build"):
            Trainer(cfg, progress=False)
    assert not store.exists()

    trainer = Trainer(cfg, progress=False)
    assert not store.exists()
    assert trainer.setup.ri.content is not None  # computed, held in memory
    trainer.setup.start()
    assert ModelStore(store).exists and ModelStore(store).tasks == []
    assert {p.name for p in (store / "runs" / "sal").iterdir()} == {"config.yaml", "parameters.json", "env.json"}
    layers, _ = load_decomposition(ModelStore(store).decomposition_path)
    modulator = trainer.model.backbone.layer1[0].conv1.modulators["sal"].weight.squeeze()
    assert torch.allclose(modulator, layers["layer1.0.conv1"].U.float(), atol=1e-6)  # the file the run used


class ToyNet(nn.Module):
    """A network with fusion, another trainable part and a frozen part, as build_optimizer sees one."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(3, 3)
        self.fusion = nn.Linear(3, 3)
        self.frozen = nn.Linear(3, 3).requires_grad_(False)


def test_fusion_group_keeps_its_lr_ratio_and_decay_through_the_schedule():
    extra = ("optimizer.name=sgd", "optimizer.lr=0.01", "fusion.lr_mult=100", "fusion.weight_decay=0.001")
    cfg = load_config(None, ["tasks=[semseg, depth]", "fusion.type=nddr", *extra])
    net = ToyNet()
    optimizer = build_optimizer(cfg, net)
    base, fused = optimizer.param_groups
    assert [id(p) for p in fused["params"]] == [id(p) for p in net.fusion.parameters()]
    assert [id(p) for p in base["params"]] == [id(p) for p in net.backbone.parameters()]  # nothing frozen
    assert fused["weight_decay"] == 0.001 and base["weight_decay"] == 1e-4
    scheduler = build_scheduler(cfg, optimizer, max_iters=4)
    seen = []  # the lrs each optimizer step applies
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append((base["lr"], fused["lr"])))
    for _ in range(4):
        net.backbone(torch.ones(1, 3)).sum().add(net.fusion(torch.ones(1, 3)).sum()).backward()
        optimizer.step()
        scheduler.step()
    assert len(seen) == 4  # the last one, at iteration max_iters - 1, is the last with a non-zero poly lr
    for i, (lr, fused_lr) in enumerate(seen):
        assert lr == pytest.approx(0.01 * (1 - i / 4) ** 0.9) and fused_lr == pytest.approx(100 * lr)
    assert seen[-1][0] > 0
    assert len(build_optimizer(cfg, nn.Linear(3, 3)).param_groups) == 1  # no fusion: one group


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (["scheduler.name=poly", "scheduler.power=0.9"], [1.0, 0.5**0.9, 0.0]),
        (["scheduler.name=cosine"], [1.0, 0.5, 0.0]),
        (["scheduler.name=step", "scheduler.milestones=[5, 8]", "scheduler.gamma=0.1"], [1.0, 0.1, 0.01]),
        (["scheduler.name=constant"], [1.0, 1.0, 1.0]),
    ],
)
def test_lr_schedules_are_stepped_per_iteration(schedule, expected):
    factor = lr_factor(load_config(None, ["tasks=[semseg]", *schedule]), max_iters=10)
    assert [factor(0), factor(5), factor(10)] == pytest.approx(expected)
    warm = lr_factor(load_config(None, ["tasks=[semseg]", "scheduler.warmup_iters=4", *schedule]), max_iters=10)
    assert warm(0) == pytest.approx(0.25 * expected[0]) and warm(4) == pytest.approx(factor(4))


def test_epochs_set_the_training_length_and_the_optimizer_follows_the_schedule(tmp_path, synth):
    cfg = load_config(
        None, tiny(tmp_path, synth, "[depth]", "train.max_iters=null", "train.epochs=2", "optimizer.name=sgd")
    )
    trainer = Trainer(cfg, progress=False)
    assert trainer.max_iters == 2 * 4  # 8 train samples / batch 2 = 4 iterations per epoch
    trainer.fit(stop_after=4)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * (1 - 4 / 8) ** 0.9)
    trainer.fit()
    assert trainer.iteration == 8 and trainer.optimizer.param_groups[0]["lr"] == 0.0
    assert isinstance(trainer.optimizer, torch.optim.SGD)


def test_metric_json_is_strict():
    text = to_json({"semseg": {"mIoU": 50.0, "IoU/cone": float("nan")}, "x": [1.0, float("inf")]})
    assert json.loads(text) == {"semseg": {"mIoU": 50.0, "IoU/cone": None}, "x": [1.0, None]}
    assert "NaN" not in text and "Infinity" not in text
