"""Distributed training with torchrun (gloo on CPU), crash safety (SIGTERM/SIGINT checkpoints, SIGKILL and
--resume) and run provenance (env.json, kept per task in the store)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_run

from rcm_nddr.commands import cli
from rcm_nddr.config import load_config, save_config
from rcm_nddr.data.synthetic import generate
from rcm_nddr.engine.builders import build_dataset, build_tasks
from rcm_nddr.engine.checkpoint import load_checkpoint
from rcm_nddr.engine.distributed import LaunchError, ShardSampler, check_global_batch
from rcm_nddr.engine.evaluate import eval_loader, evaluate
from rcm_nddr.engine.provenance import config_sha256, container, git_state
from rcm_nddr.engine.sampler import ResumableSampler
from rcm_nddr.engine.tester import run_test
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.registry import TASKS, discover
from rcm_nddr.store import ModelStore
from rcm_nddr.task import DatasetInfo, Metric

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    # 5 validation samples: the two ranks' shards are uneven (3 + 2)
    return generate(tmp_path_factory.mktemp("data") / "SYNTH_MT", 8, 5, size=(48, 48), seed=3, progress=False)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` in the repository root, CPU (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def _config(path: Path, store: Path, data: Path, tasks: str, *extra: str) -> Path:
    cfg = load_config(None, tiny_run(store, data, tasks, "optimizer.name=adam", "optimizer.lr=0.001", *extra))
    save_config(cfg, path)
    return path


# ----------------------------------------------------------------------------- samplers and metric merging


def test_rank_slices_of_the_training_stream_make_up_the_single_process_batches():
    batch, world, iterations = 6, 3, 7
    single = iter(ResumableSampler(10, seed=4, start=2 * batch, batch_size=batch))
    ranks = [iter(ResumableSampler(10, 4, 2 * batch, rank=r, world_size=world, batch_size=batch)) for r in range(world)]
    for _ in range(iterations):
        expected = [next(single) for _ in range(batch)]
        got = [item for it in ranks for item in (next(it) for _ in range(batch // world))]
        assert got == expected  # rank r holds the r-th slice of each global batch, in order
    with pytest.raises(ValueError, match="does not split into 4"):
        ResumableSampler(10, 0, rank=0, world_size=4, batch_size=6)


def test_evaluation_shards_partition_the_set_without_repeats():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))
    assert [len(ShardSampler(11, r, 3)) for r in range(3)] == [4, 4, 3]


@pytest.mark.parametrize("task_type", ["semseg", "depth", "normals", "edge", "sal", "human_parts", "parts"])
def test_merged_metrics_of_disjoint_parts_equal_the_metrics_of_the_whole(task_type):
    discover()
    classes = {"semseg": ["a", "b", "c"], "human_parts": ["bg", "head"], "parts": ["x", "y"]}
    info = DatasetInfo("synthetic", classes=classes, extra={})
    task = TASKS.get(task_type)(task_type, info)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        prediction = task.postprocess(torch.randn(2, task.out_channels, 16, 20, generator=gen))
        batches.append((prediction, _random_target(task, gen)))
    whole, first, second = task.metric(), task.metric(), task.metric()
    for i, (prediction, target) in enumerate(batches):
        whole.update(prediction, target)
        (first if i % 2 else second).update(prediction, target)
    first.merge(second)
    expected, merged = whole.compute(), first.compute()
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        assert merged[key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), key


def _random_target(task, gen) -> torch.Tensor:
    shape = (2, 16, 20)
    key = task.target_key
    if key in ("semseg", "human_parts", "parts"):
        target = torch.randint(0, task.out_channels, shape, generator=gen)
        target[:, :2] = 255
        return target
    if key == "depth":
        target = torch.rand((2, 1, 16, 20), generator=gen) * 5
        target[..., :3] = 0
        return target
    if key == "normals":
        target = torch.nn.functional.normalize(torch.randn((2, 3, 16, 20), generator=gen), dim=1)
        target[..., :2] = 0
        return target
    target = (torch.rand((2, 1, 16, 20), generator=gen) < 0.3).float()
    target[..., 0, :] = 255
    return target


def test_a_metric_without_additive_state_says_it_cannot_be_merged():
    class Opaque(Metric):
        primary = "x"
        higher_is_better = True

        def update(self, prediction, target): ...

        def compute(self):
            return {"x": 0.0}

        def reset(self): ...

    with pytest.raises(NotImplementedError, match="Opaque cannot combine the results of several processes"):
        Opaque().merge(Opaque())


# ----------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_torchrun_two_processes_train_register_once_and_validate_like_one_process(tmp_path, synth):
    store = tmp_path / "store"
    config = _config(
        tmp_path / "run.yaml",
        store,
        synth,
        "[semseg, depth]",
        "train.batch_size=4",
        "train.max_iters=6",
        "train.val_every=3",
        "test.batch_size=2",
        # a learned weighting and a transfer net: parameters outside DistributedDataParallel
        "loss.weighting={type: uncertainty}",
        "loss.consistency=[{source: semseg, target: depth, loss: l1, weight: 0.1}]",
    )
    done = _torchrun("train.py", "--config", str(config), "--quiet")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "x 2 processes" in done.stderr  # rank 0 logs the run on 2 processes ...
    assert done.stderr.count(f"registered group 1 in {store}: semseg, depth") == 1  # ... and registers once

    records = ModelStore(store).tasks
    assert [(r.name, r.group) for r in records] == [("semseg", 1), ("depth", 1)]
    assert ModelStore(store).verify() == []
    run = store / "runs" / "semseg+depth"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # only rank 0 writes TensorBoard logs
    env = json.loads((run / "env.json").read_text())
    assert env["distributed"]["world_size"] == 2 and env["distributed"]["backend"] == "gloo"
    assert records[0].environment == env  # the store keeps the run's provenance per task

    # The validation metrics the 2 processes merged (recorded with the task) equal one process
    # evaluating the registered model on the whole split.
    cfg = load_config(config)
    val = build_dataset(cfg, "val", train=False)
    tasks = build_tasks(cfg, val.info)
    model = ModelStore(store).load_model(["semseg", "depth"])
    single = evaluate(model, eval_loader(val, 2, 0, torch.device("cpu")), tasks, torch.device("cpu"), progress=False)
    for record in records:
        for key, value in single[record.name].items():
            assert record.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), (record.name, key)

    # test.py on 2 processes: each writes its shard's predictions, rank 0 the merged metrics
    done = _torchrun("test.py", "--config", str(config), "--quiet", "--save-predictions", str(tmp_path / "pred"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "5 predictions per task written" in done.stderr
    for task in ("semseg", "depth"):
        assert len(list((tmp_path / "pred" / task).iterdir())) == 5
    report = json.loads((run / "test_metrics.json").read_text())
    assert report["environment"]["distributed"]["world_size"] == 2
    expected = run_test(cfg, progress=False)  # one process, same checkpoint
    for task, values in expected.items():
        for key, value in values.items():
            assert report["metrics"][task][key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), (task, key)


@pytest.mark.parametrize(
    ("batch", "world", "sync_bn", "why"),
    [
        (3, 2, False, "3 is the global batch and must split evenly over the 2 processes"),
        (2, 2, False, "2 is the global batch and leaves 1 image per process over the 2 processes"),
        (6, 4, True, "6 is the global batch and must split evenly over the 4 processes"),
    ],
)
def test_a_global_batch_that_does_not_split_is_refused_naming_the_smallest_valid_one(batch, world, sync_bn, why):
    cfg = load_config(None, ["tasks=[sal]", f"train.batch_size={batch}", f"train.sync_bn={str(sync_bn).lower()}"])
    with pytest.raises(LaunchError, match=why) as error:
        check_global_batch(cfg, world)
    smallest = world if sync_bn else 2 * world
    assert f"at least {smallest}, e.g. --set train.batch_size={smallest}" in str(error.value)
    for fine in ((4, 2, False), (2, 2, True), (3, 1, False)):  # SyncBatchNorm allows one image per process
        check_global_batch(
            load_config(None, ["tasks=[sal]", f"train.batch_size={fine[0]}", f"train.sync_bn={str(fine[2]).lower()}"]),
            fine[1],
        )


@pytest.mark.slow
def test_torchrun_refuses_a_global_batch_that_does_not_split_in_one_line_from_rank_0(tmp_path, synth):
    """One image per process fails in BatchNorm (the head's image pooling): refused before training, in
    one line printed by rank 0 alone, naming the smallest valid batch; no process prints a traceback."""
    config = _config(tmp_path / "run.yaml", tmp_path / "store", synth, "[sal]", "train.batch_size=2")
    done = _torchrun("train.py", "--config", str(config), "--quiet")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    why = "2 is the global batch and leaves 1 image per process over the 2 processes"
    assert f"key 'train.batch_size': {why}" in errors[0] and "at least 4" in errors[0]
    assert str(ROOT / "rcm_nddr") not in done.stderr  # no traceback through the project's code
    assert re.search(r"exitcode\s*:\s*2\b", done.stderr)  # torchrun's report: the process that failed exited 2
    assert not (tmp_path / "store").exists()


# ----------------------------------------------------------------------------- crash safety

CRASH_RUN = (
    "train.max_iters=30",
    "train.checkpoint_every=5",
    "train.val_every=15",
    "train.log_every=5",
    "train.keep_checkpoints=true",  # the weights are compared in the last checkpoints
)


def _train(config: Path, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", "--config", str(config), "--quiet", *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"training ended before {path} was written:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} was not written within {timeout} s")
        time.sleep(0.02)


def _weights(store: Path, group: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(store / "checkpoints" / group / "last.pt")["model"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def uninterrupted(module_tmp, synth) -> dict[str, torch.Tensor]:
    tmp = module_tmp
    config = _config(tmp / "run.yaml", tmp / "store", synth, "[normals]", *CRASH_RUN)
    process = _train(config)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return _weights(tmp / "store", "normals")


@pytest.mark.slow
def test_a_run_killed_with_sigkill_and_resumed_ends_with_the_same_weights(tmp_path, synth, uninterrupted):
    store = tmp_path / "store"
    config = _config(tmp_path / "run.yaml", store, synth, "[normals]", *CRASH_RUN)
    process = _train(config)
    last = store / "checkpoints" / "normals" / "last.pt"
    _wait_for(last, process)
    process.kill()  # SIGKILL: no handler runs, whatever was being written is cut off
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, err[-3000:]
    stopped_at = load_checkpoint(last)["iteration"]
    assert 5 <= stopped_at < 30 and stopped_at % 5 == 0, (stopped_at, err[-3000:])
    assert not ModelStore(store).exists or ModelStore(store).tasks == []  # nothing registered yet
    (last.parent / ".last.pt.deadbeef.tmp").write_bytes(b"torn")  # as a kill in mid-write leaves it

    resumed = _train(config, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed {last} at iteration {stopped_at}" in err, err[-3000:]
    assert not list(last.parent.glob(".*.tmp"))
    _assert_same_weights(_weights(store, "normals"), uninterrupted)
    assert [r.name for r in ModelStore(store).tasks] == ["normals"]
    assert cli.main(["store", "verify", str(store)]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_write_a_checkpoint_and_exit_cleanly(tmp_path, synth, uninterrupted, signum):
    store = tmp_path / "store"
    config = _config(tmp_path / "run.yaml", store, synth, "[normals]", *CRASH_RUN)
    process = _train(config)
    last = store / "checkpoints" / "normals" / "last.pt"
    _wait_for(last, process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err
    stopped_at = load_checkpoint(last)["iteration"]
    name = signal.Signals(signum).name
    assert f"{name} received: stopped after iteration {stopped_at}, checkpoint {last}; continue with --resume" in err
    assert 5 <= stopped_at < 30
    assert not ModelStore(store).exists or ModelStore(store).tasks == []
    if signum == signal.SIGINT:
        return  # the checkpoint a signal writes resumes alike whichever signal wrote it: resumed once, below

    resumed = _train(config, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    _assert_same_weights(_weights(store, "normals"), uninterrupted)
    assert ModelStore(store).verify() == []


# ----------------------------------------------------------------------------- provenance


def test_env_json_records_what_produced_the_run(tmp_path, synth):
    cfg = load_config(None, tiny_run(tmp_path, synth, "[sal]", "train.max_iters=1", "train.val_every=1"))
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    env = json.loads((tmp_path / "runs" / "sal" / "env.json").read_text())
    assert env["config"]["sha256"] == config_sha256(cfg)
    assert env["seed"] == cfg.train.seed
    assert env["packages"]["torch"] == importlib.metadata.version("torch")
    assert env["torch"]["version"] == str(torch.__version__)
    assert env["torch"]["cuda"] == torch.version.cuda
    assert env["devices"]["cpu_count"] == os.cpu_count()
    assert env["command"]["argv"] == sys.argv
    git = env["git"]
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert git == {"commit": head, "dirty": git["dirty"], "source": "git"} and isinstance(git["dirty"], bool)
    assert ModelStore(tmp_path).task("sal").environment == env


def test_git_state_outside_a_checkout_comes_from_the_image(tmp_path, monkeypatch):
    monkeypatch.setenv("RCM_NDDR_GIT_COMMIT", "0123abc")
    monkeypatch.setenv("RCM_NDDR_GIT_DIRTY", "false")
    monkeypatch.setenv("RCM_NDDR_IMAGE", "rcm-nddr:latest")
    monkeypatch.setenv("RCM_NDDR_IMAGE_ID", "sha256:feed")
    assert git_state(tmp_path) == {"commit": "0123abc", "dirty": False, "source": "image"}
    assert container()["image_id"] == "sha256:feed" and container()["image"] == "rcm-nddr:latest"
    assert container()["repo_digests"] is None  # (started otherwise than by rcm-nddr docker run)
    monkeypatch.setenv("RCM_NDDR_IMAGE_DIGESTS", "r.example/a@sha256:01 r.example/b@sha256:02")
    assert container()["repo_digests"] == ["r.example/a@sha256:01", "r.example/b@sha256:02"]
    monkeypatch.setenv("RCM_NDDR_IMAGE_DIGESTS", "")
    assert container()["repo_digests"] == []  # built here, never pushed
    monkeypatch.delenv("RCM_NDDR_GIT_COMMIT")
    assert git_state(tmp_path) == {"commit": None, "dirty": None, "source": None}


def test_auto_resume_continues_a_run_when_it_has_a_checkpoint_and_starts_one_otherwise(tmp_path, synth):
    config = _config(
        tmp_path / "run.yaml", tmp_path / "store", synth, "[sal]", "train.max_iters=4", "train.keep_checkpoints=true"
    )
    Trainer(load_config(config), progress=False).fit(stop_after=2)  # an interrupted run
    assert cli.train_main(["--config", str(config), "--quiet", "--auto-resume"]) == 0
    assert load_checkpoint(tmp_path / "store" / "checkpoints" / "sal" / "last.pt")["iteration"] == 4
    assert [r.name for r in ModelStore(tmp_path / "store").tasks] == ["sal"]

    fresh = _config(tmp_path / "fresh.yaml", tmp_path / "other", synth, "[sal]", "train.max_iters=2")
    assert cli.train_main(["--config", str(fresh), "--quiet", "--auto-resume"]) == 0
    assert [r.name for r in ModelStore(tmp_path / "other").tasks] == ["sal"]
    with pytest.raises(SystemExit):  # one or the other
        cli.train_main(["--config", str(fresh), "--resume", "--auto-resume"])


OBJECTIVE_RANKS = """
import torch, torch.distributed as dist
from rcm_nddr.objectives import WEIGHTINGS, GroupObjective, StepContext

class Task:
    loss_kind = "regression"
    def loss(self, output, target):
        return output.mean()

dist.init_process_group("gloo")
rank = dist.get_rank()
weighting = WEIGHTINGS.get("uncertainty")({"a": Task(), "b": Task()}, {"a": 1.0, "b": 1.0})
objective = GroupObjective({"a": Task(), "b": Task()}, weighting)
outputs = {"a": torch.full((1, 1, 2, 2), 1.0 + rank), "b": torch.full((1, 1, 2, 2), 3.0 * (rank + 1))}
objective.step(outputs, {"a": None, "b": None}, StepContext())
grads = [torch.zeros(2), torch.zeros(2)]
dist.all_gather(grads, weighting.log_vars.grad)
# d/ds (0.5 e^-s L + s / 2) at s = 0: 0.5 - 0.5 L, averaged over the ranks' losses (1, 2) and (3, 6)
expected = torch.tensor([0.5 - 0.5 * 1.5, 0.5 - 0.5 * 4.5])
assert torch.allclose(grads[0], expected) and torch.equal(grads[0], grads[1]), grads
dist.destroy_process_group()
"""


def test_the_objective_parameters_gradients_are_averaged_over_the_processes(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(OBJECTIVE_RANKS)
    done = _torchrun(str(script))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
