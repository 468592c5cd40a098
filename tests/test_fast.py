"""Fast paths: losses without host synchronization, losses fetched every ``train.log_every`` iterations,
the batch prefetcher, ``train.compile`` / ``test.compile``."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from helpers import tiny_run
from rcm_nddr.tasks.binary import masked_bce_with_logits
from rcm_nddr.tasks.segmentation import masked_cross_entropy

from rcm_nddr.config import ConfigError, load_config
from rcm_nddr.engine import fast
from rcm_nddr.engine.checkpoint import load_checkpoint
from rcm_nddr.engine.tester import run_test
from rcm_nddr.engine.trainer import NonFiniteLossError, Trainer
from rcm_nddr.registry import TASKS, discover
from rcm_nddr.task import DatasetInfo

PLUGIN = str(Path(__file__).parent / "plugins" / "toy_tasks.py")


def _targets(gen: torch.Generator) -> dict[str, torch.Tensor]:
    depth = torch.rand(2, 1, 8, 8, generator=gen) * 4
    depth[:, :, :2] = 0  # invalid pixels
    depth[:, :, 2, 0] = float("nan")  # ... and a non-finite one
    normals = torch.nn.functional.normalize(torch.randn(2, 3, 8, 8, generator=gen), dim=1)
    normals[:, :, :3] = 0
    binary = (torch.rand(2, 1, 8, 8, generator=gen) < 0.3).float()
    binary[:, :, 0] = 255
    labels = torch.randint(0, 5, (2, 8, 8), generator=gen)
    labels[:, 0] = 255
    return {"depth": depth, "normals": normals, "binary": binary, "labels": labels}


def test_losses_have_no_data_dependent_shapes():
    """Masking instead of boolean indexing: each loss traces into one graph (``fullgraph=True`` fails on any
    operation whose output shape depends on the data, i.e. any that would make the host wait for a GPU),
    and gives the value of the indexed formulation."""
    discover()
    info = DatasetInfo("t", classes={"semseg": [str(i) for i in range(5)]}, extra={})
    gen = torch.Generator().manual_seed(0)
    t = _targets(gen)
    output = {c: torch.randn(2, c, 8, 8, generator=gen) for c in (1, 3, 5)}
    cases = {
        "depth": (TASKS.get("depth")("depth", info).loss, output[1], t["depth"]),
        "normals": (TASKS.get("normals")("normals", info).loss, output[3], t["normals"]),
        "bce": (masked_bce_with_logits, output[1], t["binary"]),
        "bce_weighted": (functools.partial(masked_bce_with_logits, pos_weight=0.95), output[1], t["binary"]),
        "ce": (masked_cross_entropy, output[5], t["labels"]),
    }
    valid_depth = (t["depth"] > 0) & torch.isfinite(t["depth"])
    valid_normals = t["normals"].square().sum(1) > 0
    valid_binary = t["binary"] != 255
    unit = torch.nn.functional.normalize(output[3], dim=1).movedim(1, -1)[valid_normals]
    expected = {
        "depth": (output[1][valid_depth] - t["depth"][valid_depth]).abs().mean(),
        "normals": (unit - t["normals"].movedim(1, -1)[valid_normals]).abs().mean(),
        "bce": torch.nn.functional.binary_cross_entropy_with_logits(output[1][valid_binary], t["binary"][valid_binary]),
        "ce": torch.nn.functional.cross_entropy(output[5], t["labels"], ignore_index=255),
    }
    labels = t["binary"][valid_binary]
    weights = labels * 0.95 + (1 - labels) * 0.05
    expected["bce_weighted"] = torch.nn.functional.binary_cross_entropy_with_logits(
        output[1][valid_binary], labels, weight=weights
    )
    for name, (loss, out, target) in cases.items():
        torch._dynamo.reset()
        traced = torch.compile(loss, backend="eager", fullgraph=True)
        value = traced(out.clone().requires_grad_(), target)
        assert torch.isfinite(value), name
        assert value.item() == pytest.approx(expected[name].item(), rel=1e-5), name
        eager = out.clone().requires_grad_()
        loss(eager, target).backward()
        assert torch.isfinite(eager.grad).all(), f"{name}: a masked pixel leaks a non-finite gradient"


def test_label_checks_still_name_the_bad_value_on_the_cpu():
    discover()
    info = DatasetInfo("t", classes={"semseg": [str(i) for i in range(3)]}, extra={})
    with pytest.raises(ValueError, match=r"label 7 is outside \[0, 3\)"):
        TASKS.get("semseg")("semseg", info).loss(torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match=r"target value 0.5 is not 0, 1 or 255"):
        TASKS.get("sal")("sal", info).loss(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5))


def test_loss_window_fetches_every_pending_iteration_in_one_transfer():
    window = fast.LossWindow(["a", "b"], torch.device("cpu"))
    assert len(window) == 0
    window.add(1, torch.tensor([1.0, 2.0]))
    window.add(2, torch.tensor([3.0, float("nan")]))
    rows, extra = window.fetch([1.0])
    assert rows[0] == (1, {"a": 1.0, "b": 2.0})
    assert rows[1][0] == 2 and rows[1][1]["a"] == 3.0 and rows[1][1]["b"] != rows[1][1]["b"]  # NaN kept
    assert extra == [1.0] and len(window) == 0
    assert window.fetch([0.0]) == ([], [0.0])  # nothing pending: only the extra values


def test_losses_reach_the_host_every_log_every_iterations(tmp_path, synth, monkeypatch):
    fetched: list[list[int]] = []
    original = fast.LossWindow.fetch

    def counting(self, extra=()):
        rows, rest = original(self, extra)
        fetched.append([iteration for iteration, _ in rows])
        return rows, rest

    monkeypatch.setattr(fast.LossWindow, "fetch", counting)
    overrides = ("train.max_iters=7", "train.log_every=3", "train.val_every=7", "train.checkpoint_every=100")
    Trainer(load_config(None, tiny_run(tmp_path, synth, "[depth]", *overrides)), progress=False).fit()
    # every 3 iterations, and at the end (before the validation and the checkpoint): one transfer each
    assert fetched == [[1, 2, 3], [4, 5, 6], [7]]


def test_a_nan_between_fetches_is_caught_before_the_next_checkpoint(tmp_path, synth):
    """The NaN of iteration 5 reaches the host at iteration 6 (a checkpoint), before anything is saved: the
    error names iteration 5 and the checkpoint of iteration 4 is kept."""
    overrides = ("train.max_iters=10", "train.log_every=10", "train.checkpoint_every=2", "train.val_every=100")
    cfg = load_config(None, tiny_run(tmp_path, synth, "[nan_after_4]", f"plugins=[{PLUGIN}]", *overrides))
    trainer = Trainer(cfg, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"task 'nan_after_4' is nan at iteration 5"):
        trainer.fit()
    assert trainer.iteration == 6
    last = load_checkpoint(tmp_path / "checkpoints" / "nan_after_4" / "last.pt")
    assert last["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_prefetcher_passes_cpu_batches_through_and_raises_loader_errors_in_order():
    batches = [{"image": torch.randn(2, 3, 4, 4), "meta": {"id": [i]}} for i in range(3)]
    out = list(fast.DevicePrefetcher(batches, torch.device("cpu")))
    assert [b["meta"]["id"] for b in out] == [[0], [1], [2]]
    assert all(a["image"] is b["image"] for a, b in zip(batches, out, strict=True))

    def failing():
        yield batches[0]
        raise OSError("bad file")

    it = fast.DevicePrefetcher(failing(), torch.device("cpu"))
    assert next(it) is batches[0]
    with pytest.raises(OSError, match="bad file"):
        next(it)


@pytest.mark.cuda
def test_prefetcher_copies_to_the_gpu_ahead_and_in_channels_last():
    device = torch.device("cuda")
    batches = [{"image": torch.randn(2, 3, 8, 8).pin_memory(), "depth": torch.rand(2, 1, 8, 8)} for _ in range(3)]
    out = list(fast.DevicePrefetcher(batches, device))
    assert len(out) == 3
    for a, b in zip(batches, out, strict=True):
        assert b["image"].is_cuda and b["image"].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(b["image"].cpu(), a["image"]) and torch.equal(b["depth"].cpu(), a["depth"])


@pytest.mark.cuda
def test_the_training_step_never_synchronizes_with_the_gpu(tmp_path, synth):
    cfg = load_config(None, tiny_run(tmp_path, synth, "[semseg, depth, normals, edge]", "train.device=cuda"))
    trainer = Trainer(cfg, progress=False)
    batch = next(iter(fast.DevicePrefetcher(trainer._train_loader(), trainer.device)))
    trainer._step(batch)  # warm-up: first-call allocations and autotuning may synchronize
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = trainer._step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert losses.shape == (4,) and losses.is_cuda


def test_compile_settings_are_checked():
    assert fast.compile_mode(False) is None and fast.compile_mode(True) == "default"
    assert fast.compile_mode("max-autotune") == "max-autotune"
    cfg = load_config(None, ["tasks=[semseg]", "train.compile=reduce-overhead", "test.compile=true"])
    assert cfg.train.compile == "reduce-overhead" and cfg.test.compile is True
    with pytest.raises(ConfigError, match=r"key 'train.compile': expected bool \| 'default'"):
        load_config(None, ["tasks=[semseg]", "train.compile=fastest"])


@pytest.mark.slow  # TorchDynamo traces the training step, the validation and test.py
def test_compiled_training_and_testing_match_eager(tmp_path, synth, aot_eager_compile):
    """``train.compile`` / ``test.compile`` run the model through TorchDynamo (with the ``aot_eager``
    backend here: see the fixture). One step from the same weights on the same batch gives the same losses
    and the same updated weights; a whole run and test.py work compiled."""
    calls = aot_eager_compile
    common = ("train.max_iters=3", "train.val_every=3")
    eager = Trainer(load_config(None, tiny_run(tmp_path / "eager", synth, "[semseg, depth]", *common)), progress=False)
    compiled_cfg = load_config(
        None,
        tiny_run(tmp_path / "compiled", synth, "[semseg, depth]", *common, "train.compile=true", "test.compile=true"),
    )
    compiled = Trainer(compiled_cfg, progress=False)
    assert isinstance(compiled.step_module, torch._dynamo.eval_frame.OptimizedModule)
    assert calls == ["default", "default"]  # the step and the validation
    batch = next(iter(eager._train_loader()))
    losses = []
    for trainer in (eager, compiled):
        torch.manual_seed(5)  # the same dropout masks in the heads' ASPP
        losses.append(trainer._step(batch))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    after = eager.model.state_dict()
    for key, value in compiled.model.state_dict().items():
        torch.testing.assert_close(value, after[key], rtol=1e-4, atol=1e-6)

    metrics = compiled.fit()  # continues from the step above to the end, with a compiled validation
    assert set(metrics) == {"semseg", "depth"}
    tested = run_test(compiled_cfg, checkpoint="last", progress=False)
    assert tested["depth"]["rmse"] == pytest.approx(metrics["depth"]["rmse"], rel=1e-4)
    assert calls == ["default"] * 3  # and test.py
