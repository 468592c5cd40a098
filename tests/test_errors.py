"""Bad input through the real entry points (train.py, test.py, rcm-nddr): one ``error:`` line that names the
file or the config key and what was expected, exit status 2, no traceback, and nothing already written
lost; a bug exits 70 with its traceback; the exit statuses are documented."""

from __future__ import annotations

import builtins
import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from helpers import tiny_run

from rcm_nddr.commands import cli
from rcm_nddr.commands import store as store_command
from rcm_nddr.config import Config, ConfigError, load_config
from rcm_nddr.engine import checkpoint
from rcm_nddr.engine.distributed import LaunchError, check_global_batch
from rcm_nddr.store import ModelStore

REPO = Path(__file__).resolve().parents[1]


def error_line(err: str) -> str:
    """The one ``error:`` line of a command's stderr (which holds no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def config_file(tmp_path: Path, text: str = "tasks: [sal]\n") -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def train_args(config: Path, store: Path, data: Path, *extra: str, tasks: str = "[sal]") -> list[str]:
    """train.py/test.py arguments of a tiny run of ``tasks``: 2 iterations, validated at the end."""
    args = ["--config", str(config), "--quiet"]
    for item in tiny_run(store, data, tasks, "train.max_iters=2", "train.val_every=2", "test.batch_size=2", *extra):
        args += ["--set", item]
    return args


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` by relative path, with its sha256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(module_tmp, synth) -> tuple[Path, list[str]]:
    """A store whose group ``sal`` a train.py run trained and registered (keeping its checkpoints), and
    that run's arguments."""
    store = module_tmp / "store"
    args = train_args(config_file(module_tmp), store, synth, "train.keep_checkpoints=true")
    assert cli.train_main(args) == 0
    return store, args


# ----------------------------------------------------------------------------- 1: checkpoints


def _checkpoint_bytes(state: typing.Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


UNREADABLE = {
    "truncated": _checkpoint_bytes({"model": {"w": torch.zeros(4096)}, "iteration": 1})[:300],
    "not a checkpoint file": b"hello\n",
    "no model state": _checkpoint_bytes([1, 2, 3]),
}


@pytest.mark.parametrize("flag", ["--resume", "--auto-resume"])
@pytest.mark.parametrize("content", list(UNREADABLE))
def test_an_unreadable_checkpoint_names_the_file_and_what_to_do(tmp_path, synth, capsys, flag, content):
    store = tmp_path / "store"
    last = store / "checkpoints" / "sal" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(UNREADABLE[content])
    assert cli.train_main([*train_args(config_file(tmp_path), store, synth), flag]) == 2
    line = error_line(capsys.readouterr().err)
    assert str(last) in line and "delete it" in line and "without --resume" in line
    assert not (store / "store.yaml").exists()  # refused before the run started


def test_a_checkpoint_of_another_model_is_refused_naming_it(tmp_path, synth, trained, capsys):
    store, _ = trained
    last = tmp_path / "store" / "checkpoints" / "sal" / "last.pt"
    last.parent.mkdir(parents=True)
    shutil.copyfile(store / "checkpoints" / "sal" / "last.pt", last)
    args = train_args(config_file(tmp_path), tmp_path / "store", synth, "head.channels=16")
    assert cli.train_main([*args, "--resume"]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{last} does not fit the model of this config" in line and "size mismatch" in line


def test_test_py_names_an_unreadable_best_checkpoint_and_the_other_one(tmp_path, synth, capsys):
    best = tmp_path / "store" / "checkpoints" / "sal" / "best.pt"
    best.parent.mkdir(parents=True)
    best.write_bytes(UNREADABLE["truncated"])
    assert cli.test_main(train_args(config_file(tmp_path), tmp_path / "store", synth)) == 2
    line = error_line(capsys.readouterr().err)
    assert str(best) in line and "unreadable" in line and "--checkpoint last" in line


# ----------------------------------------------------------------------------- 2-4: config values


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["optimizer.lr=-0.1"], "optimizer.lr"),
        (["optimizer.momentum=1.5"], "optimizer.momentum"),
        (["optimizer.momentum=-0.1"], "optimizer.momentum"),
        (["optimizer.weight_decay=-0.0001"], "optimizer.weight_decay"),
        (["optimizer.name=adam", "optimizer.betas=[1.5, 0.999]"], "optimizer.betas[0]"),
        (["optimizer.name=adamw", "optimizer.betas=[0.9, 1.0]"], "optimizer.betas[1]"),
        (["fusion.weight_decay=-1"], "fusion.weight_decay"),
        (["scheduler.power=-0.9"], "scheduler.power"),
        (["scheduler.power=0"], "scheduler.power"),
        (["scheduler.name=step", "scheduler.gamma=-0.1"], "scheduler.gamma"),
        (["optimizer.lr=.inf"], "optimizer.lr"),
        (["fusion.alpha=.nan"], "fusion.alpha"),
        (["fusion.beta=.nan"], "fusion.beta"),
        (["fusion.lr_mult=.inf"], "fusion.lr_mult"),
        (["loss={sal: {weight: .nan}}"], "loss.sal.weight"),
        (["dataset.scales=[1.0, .inf]"], "dataset.scales[1]"),
        (["train.batch_size=1"], "train.batch_size"),
    ],
)
def test_config_values_torch_would_refuse_are_config_errors_before_anything_is_written(
    tmp_path, synth, capsys, overrides, key
):
    extra = [item for o in overrides for item in ("--set", o)]
    assert cli.train_main([*train_args(config_file(tmp_path), tmp_path / "store", synth), *extra]) == 2
    assert f"key '{key}'" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "store").exists()


def _float_keys(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted key, YAML value holding a NaN)`` for every float field of the schema."""
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += _float_keys(tp, f"{key}.")
        elif typing.get_origin(tp) in (list, tuple) and float in typing.get_args(tp):
            n = len(typing.get_args(tp)) if typing.get_origin(tp) is tuple else 1
            out.append((f"{key}[0]", f"{key}=[{', '.join(['.nan'] * n)}]"))
        elif tp is float or float in typing.get_args(tp):
            out.append((key, f"{key}=.nan"))
    return out


def test_every_float_key_of_the_schema_refuses_nan_and_infinity():
    keys = _float_keys(Config)
    assert {"optimizer.lr", "fusion.alpha", "fusion.beta", "scheduler.power", "optimizer.betas[0]"} <= dict(keys).keys()
    for key, override in keys:
        for bad in (override, override.replace(".nan", "-.inf")):
            with pytest.raises(ConfigError, match=re.escape(f"key '{key}': expected a finite number")):
                load_config(None, ["tasks=[sal]", bad])


# ----------------------------------------------------------------------------- 5: disk full, read-only stores


class FullDisk:
    """A file opened for writing on a full disk: every write fails with ENOSPC."""

    def __init__(self, f: typing.BinaryIO) -> None:
        self.f = f

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        self.f.flush()


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_names_the_checkpoint_and_loses_nothing(
    trained, synth, tmp_path, capsys, monkeypatch
):
    store, _ = trained
    before = (store / "store.yaml").read_bytes()
    monkeypatch.setattr(checkpoint, "open", lambda path, mode="r": FullDisk(builtins.open(path, mode)), raising=False)
    assert cli.train_main(train_args(config_file(tmp_path), store, synth, tasks="[edge]")) == 2
    line = error_line(capsys.readouterr().err)
    assert re.search(rf"{re.escape(str(store / 'checkpoints' / 'edge'))}/(best|last)\.pt: No space left", line)
    assert "the disk is full" in line
    assert not list((store / "checkpoints" / "edge").glob(".*.tmp"))  # the temporary is gone
    assert (store / "store.yaml").read_bytes() == before and ModelStore(store).verify() == []


@pytest.mark.slow
@pytest.mark.parametrize(("code", "cause"), [(errno.EROFS, "read-only"), (errno.EACCES, "permissions")])
def test_a_store_that_cannot_be_written_at_registration_is_one_error_and_loses_nothing(
    trained, synth, tmp_path, capsys, monkeypatch, code, cause
):
    store, _ = trained
    before = (store / "store.yaml").read_bytes()
    replace = os.replace

    def refusing(src, dst, *args, **kwargs):
        if Path(dst).parent == store / "tasks":
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refusing)
    group = {errno.EROFS: "[depth]", errno.EACCES: "[normals]"}[code]
    assert cli.train_main(train_args(config_file(tmp_path), store, synth, tasks=group)) == 2
    line = error_line(capsys.readouterr().err)
    assert str(store / "tasks") in line and os.strerror(code) in line and cause in line
    assert (store / "store.yaml").read_bytes() == before and ModelStore(store).verify() == []
    assert not list((store / "tasks").glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory regardless of its mode")
def test_a_read_only_store_directory_is_one_error(trained, synth, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(trained[0], store, ignore=shutil.ignore_patterns("checkpoints", "runs"))
    before = snapshot(store)
    for folder in (store, store / "tasks"):
        folder.chmod(0o555)
    try:
        assert cli.train_main(train_args(config_file(tmp_path), store, synth, tasks="[edge]")) == 2
    finally:
        for folder in (store, store / "tasks"):
            folder.chmod(0o755)
    assert str(store) in error_line(capsys.readouterr().err)
    assert snapshot(store) == before


# ----------------------------------------------------------------------------- 6, 7: paths and files


@pytest.mark.parametrize("which", ["decomposition is a directory", "store is a file", "store under a file"])
def test_a_path_of_the_wrong_kind_names_its_key(tmp_path, synth, capsys, which):
    taken = tmp_path / "notes.txt"
    taken.write_text("not a store\n")
    override, key = {
        "decomposition is a directory": (f"backbone.decomposition={tmp_path}", "backbone.decomposition"),
        "store is a file": (f"store={taken}", "store"),
        "store under a file": (f"store={taken / 'store'}", "store"),
    }[which]
    args = train_args(config_file(tmp_path), tmp_path / "store", synth, override)
    assert cli.train_main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert f"key '{key}'" in line and (str(tmp_path) if key != "store" else str(taken)) in line
    assert taken.read_text() == "not a store\n" and not (tmp_path / "store").exists()


@pytest.mark.parametrize("main", [cli.train_main, cli.test_main])
def test_a_config_that_is_not_utf8_names_the_file(tmp_path, synth, capsys, main):
    top = tmp_path / "run.yaml"
    top.write_bytes("tasks: [sal]  # café\n".encode("latin-1"))
    assert main(train_args(top, tmp_path / "store", synth)) == 2
    assert f"{top}: not UTF-8 text (byte 19 is b'\\xe9')" in error_line(capsys.readouterr().err)
    base = tmp_path / "base.yaml"
    base.write_bytes("train: {seed: 1}  # café\n".encode("latin-1"))
    top.write_text("_base_: base.yaml\ntasks: [sal]\n")
    assert main(train_args(top, tmp_path / "store", synth)) == 2
    assert f"{base} (a base of {top}): not UTF-8 text" in error_line(capsys.readouterr().err)


def test_train_py_in_a_process_exits_2_with_one_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_bytes("tasks: [sal]\noptimizer: {lr: 0.01}  # \xb5\n".encode("latin-1"))
    done = subprocess.run(
        [sys.executable, "train.py", "--config", str(config)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2
    assert str(config) in error_line(done.stderr)


@pytest.mark.slow
def test_a_bad_file_read_by_a_loader_worker_is_one_line_and_the_process_exits(tmp_path, synth):
    """The worker's traceback stays out of the line, and the workers (which ignore SIGTERM) do not keep the
    failed process from exiting."""
    data = tmp_path / "SYNTH_MT"
    shutil.copytree(synth, data)
    for sample in ("000001", "000002", "000003", "000004", "000005"):  # sample 0 is checked before training
        (data / "images" / f"{sample}.png").write_bytes(b"not a png")
    args = train_args(config_file(tmp_path), tmp_path / "store", data, "train.num_workers=2")
    done = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert re.match(rf"error: bad file {re.escape(str(data / 'images'))}/00000[1-5]\.png: ", error_line(done.stderr))


# ----------------------------------------------------------------------------- 8: the global batch under torchrun


def test_the_global_batch_must_leave_two_images_to_each_process():
    cfg = load_config(None, ["tasks=[sal]", "train.batch_size=2"])
    check_global_batch(cfg, 1)
    with pytest.raises(LaunchError, match=r"leaves 1 image per process over the 2 processes.*at least 4"):
        check_global_batch(cfg, 2)
    cfg.train.sync_bn = True  # normalized over the global batch
    check_global_batch(cfg, 2)
    cfg = load_config(None, ["tasks=[sal]", "train.batch_size=6"])
    check_global_batch(cfg, 3)
    with pytest.raises(LaunchError, match=r"must split evenly over the 4 processes.*at least 8"):
        check_global_batch(cfg, 4)


def test_under_torchrun_an_error_of_every_process_is_printed_by_rank_0_alone(monkeypatch, capsys):
    def refuse(args):
        raise LaunchError("key 'train.batch_size': refused")

    monkeypatch.setattr(store_command, "list_tasks", refuse)
    monkeypatch.setattr(cli, "QUIET_RANK_WAIT_S", 0.0)
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["store", "list", "somewhere"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["store", "list", "somewhere"]) == 2
    assert error_line(capsys.readouterr().err) == "error: key 'train.batch_size': refused"


# ----------------------------------------------------------------------------- 9: requeued jobs


@pytest.mark.slow
def test_auto_resume_of_a_run_that_registered_its_group_exits_0_and_writes_nothing(trained, capsys, caplog):
    store, args = trained
    before = snapshot(store)
    with caplog.at_level("INFO"):
        assert cli.train_main([*args, "--auto-resume"]) == 0
    assert [r.message for r in caplog.records if "already registered" in r.message] == [
        f"group sal is already registered in {store} (group 1) by this run: nothing to do"
    ]
    assert "error:" not in capsys.readouterr().err
    assert snapshot(store) == before

    assert cli.train_main([*args, "--resume"]) == 2  # an explicit --resume has nothing to resume
    line = error_line(capsys.readouterr().err)
    assert "--resume: group 'sal' has ended and is registered" in line and "--replace" in line
    assert snapshot(store) == before


@pytest.mark.slow
def test_auto_resume_refuses_a_group_the_store_holds_from_another_run(trained, capsys):
    store, args = trained
    before = snapshot(store)
    assert cli.train_main([*args, "--set", "train.max_iters=3", "--auto-resume"]) == 2  # another config
    assert "already registers 'sal' (group 1), not from this run's checkpoint" in error_line(capsys.readouterr().err)
    registered = store / "runs" / "sal" / "registered.json"  # what the run registered: another file now
    written = registered.read_bytes()
    registered.write_text(json.dumps({"sal": "0" * 64}))
    try:
        assert cli.train_main([*args, "--auto-resume"]) == 2
        assert "not from this run's checkpoint" in error_line(capsys.readouterr().err)
        # a run registered by an earlier version (no registered.json): what registration took, other tensors now
        registered.unlink()
        best = store / "checkpoints" / "sal" / "best.pt"
        saved = best.read_bytes()
        state = torch.load(best, weights_only=True)
        name = next(k for k, v in state["model"].items() if k.startswith("heads.sal") and v.is_floating_point())
        state["model"][name] += 1
        torch.save(state, best)
        try:
            assert cli.train_main([*args, "--auto-resume"]) == 2
            assert "not from this run's checkpoint" in error_line(capsys.readouterr().err)
        finally:
            best.write_bytes(saved)
    finally:
        registered.write_bytes(written)
    assert snapshot(store) == before


# ----------------------------------------------------------------------------- 10: exit statuses


@pytest.mark.parametrize(
    ("raised", "status", "output"),
    [
        (ZeroDivisionError("division by zero"), 70, "Traceback"),
        (OSError(errno.EBADF, "Bad file descriptor"), 70, "Traceback"),
        (PermissionError(errno.EACCES, "Permission denied", "/results/store"), 2, "error: /results/store: Permission"),
        (OSError(errno.ENOSPC, "No space left on device", "/results/x.pt"), 2, "error: /results/x.pt: No space left"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_exit_statuses(monkeypatch, capsys, raised, status, output):
    def handler(args):
        raise raised

    monkeypatch.setattr(store_command, "list_tasks", handler)
    assert cli.main(["store", "list", "somewhere"]) == status
    err = capsys.readouterr().err
    assert output in err
    if status == 70:
        assert "internal error: " in err and not any(line.startswith("error:") for line in err.splitlines())
    if status == 2:
        error_line(err)


@pytest.mark.slow
def test_store_verify_alone_exits_1_when_it_finds_problems(trained, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(trained[0], store, ignore=shutil.ignore_patterns("checkpoints", "runs"))
    assert cli.main(["store", "verify", str(store)]) == 0
    tensors = store / "tasks" / "sal.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"\x00" * 8)
    assert cli.main(["store", "verify", str(store)]) == 1
    assert "sal.safetensors" in capsys.readouterr().out


def test_the_exit_statuses_are_documented():
    text = (REPO / "docs" / "training.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for status in (0, 1, cli.EXIT_USER_ERROR, cli.EXIT_INTERNAL_ERROR, cli.EXIT_INTERRUPTED, 143):
        assert f"`{status}`" in section
