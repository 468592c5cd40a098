"""The papers' baselines and options through a config: residual adapters, the decoder-only and
BatchNorm-only encoders, DeepLabv3 without the decoder and the head's options, cross-stitch units, NDDR's
ablations, and the VGG-16 backbone. Each trains, registers, verifies and reloads like any group; the
combinations that cannot work are one error naming the key, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import rc_run, tiny_run
from rcm_nddr.decomp import load_decomposition

from rcm_nddr import ModelStore
from rcm_nddr.commands.cli import decomp_main
from rcm_nddr.config import ConfigError, load_config
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.nn.accounting import parameter_breakdown
from rcm_nddr.nn.adapters import RAResNet
from rcm_nddr.nn.assembly import probe_input
from rcm_nddr.nn.cross_stitch import CrossStitchFusion
from rcm_nddr.nn.heads import DeepLabV3Head
from rcm_nddr.nn.rc_vgg import RCVGG
from rcm_nddr.store import StoreError

ONE_STEP = ("train.max_iters=1", "train.val_every=1")


def run(cfg_overrides: list[str]) -> Trainer:
    trainer = Trainer(load_config(None, cfg_overrides), progress=False)
    trainer.run()
    return trainer


def assert_reloads_exactly(store: Path, trainer: Trainer) -> None:
    """The store verifies (the reloaded tasks reproduce their recorded probe outputs bit for bit), and they
    answer as the trained network did (to float error: training runs channels-last)."""
    s = ModelStore(store)
    assert s.verify() == []
    names = [t.name for t in s.tasks]
    loaded = s.load_model(names)
    trained = trainer.model.eval()
    with torch.no_grad():
        x = probe_input()
        expected, got = trained(x, tasks=names, raw=True), loaded(x, raw=True)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    s.load_model(names, deploy=True)  # the folded form (what predict runs) reproduces the probes too


@pytest.mark.parametrize("mode", ["series", "parallel"])
def test_residual_adapters_train_register_and_reload(tmp_path, synth, bank, mode):
    store = tmp_path / "store"
    trainer = run(rc_run(store, synth, bank, "[semseg, depth]", f"backbone.reparam=ra_{mode}", *ONE_STEP))
    assert isinstance(trainer.model.backbone, RAResNet) and trainer.model.backbone.mode == mode
    assert_reloads_exactly(store, trainer)
    counts = parameter_breakdown(trainer.model, "semseg")
    # resnet18: every shared conv's adapter (series: Co x Co and its BatchNorm; parallel: Ci x Co)
    assert counts["adapters"] == {"series": 1_404_544, "parallel": 1_220_800}[mode]
    assert counts["modulators"] == 0 and counts["batchnorm"] == 7_808 and counts["downsample"] == 173_824
    record = ModelStore(store).task("semseg")
    assert record.trainable_parameters == counts["total"]


def test_decoder_only_and_batchnorm_only_encoders(tmp_path, synth, bank):
    """``train_encoder: none`` trains the head alone (the encoder, BatchNorm statistics included, stays as it
    started); ``norm`` trains the encoder's BatchNorm and nothing else of it."""
    steps = ("train.max_iters=2", "train.val_every=2")
    fixed = Trainer(
        load_config(None, rc_run(tmp_path / "a", synth, bank, "[semseg]", "backbone.train_encoder=none", *steps)),
        progress=False,
    )
    before = {k: v.clone() for k, v in fixed.model.state_dict().items()}
    fixed.run()
    after = fixed.model.state_dict()
    encoder = [k for k in after if k.startswith("backbone.") and "filter_bank" not in k]
    assert encoder and all(torch.equal(after[k], before[k]) for k in encoder)
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("heads."))
    counts = parameter_breakdown(fixed.model, "semseg")
    assert counts["modulators"] == counts["batchnorm"] == counts["downsample"] == 0 and counts["head"] > 0
    assert_reloads_exactly(tmp_path / "a", fixed)

    norm = Trainer(
        load_config(None, rc_run(tmp_path / "b", synth, bank, "[semseg]", "backbone.train_encoder=norm", *steps)),
        progress=False,
    )
    before = {k: v.clone() for k, v in norm.model.state_dict().items()}
    norm.run()
    after = norm.model.state_dict()
    modulators = [k for k in after if ".modulators." in k]
    batchnorm = [k for k in after if ".per_task." in k and ".bn" in k and k.endswith("weight")]
    assert modulators and all(torch.equal(after[k], before[k]) for k in modulators)
    assert any(not torch.equal(after[k], before[k]) for k in batchnorm)
    counts = parameter_breakdown(norm.model, "semseg")
    assert counts["modulators"] == 0 and counts["batchnorm"] == 7_808
    assert counts["downsample"] == 2 * (128 + 256 + 512)  # the downsample copies' BatchNorm only


def test_deeplabv3_head_with_the_official_init_and_no_dropout(tmp_path, synth, bank):
    store = tmp_path / "store"
    options = ("head.type=deeplabv3", "head.dropout=0", "head.init=normal", *ONE_STEP)
    trainer = run(rc_run(store, synth, bank, "[depth]", *options))
    head = trainer.model.heads["depth"]
    assert isinstance(head, DeepLabV3Head)
    assert not any(isinstance(m, torch.nn.Dropout) for m in head.modules())
    assert ModelStore(store).task("depth").model["head"] == {
        "type": "deeplabv3",
        "channels": 8,
        "dropout": 0.0,
        "init": "normal",
    }
    assert_reloads_exactly(store, trainer)


def test_cross_stitch_and_the_nddr_ablations_on_plain_backbones(tmp_path, synth, bank):
    """NDDR-CNN's setting (plain per-task backbones, ``reparam: none``) with cross-stitch units, then NDDR
    with Xavier init and no BatchNorm; a store's tasks fuse with one method."""
    store = tmp_path / "stitch"
    plain = (f"backbone.weights={bank}", "train.batch_size=2", *ONE_STEP)
    trainer = run(tiny_run(store, synth, "[semseg, depth]", "fusion.type=cross_stitch", *plain))
    assert isinstance(trainer.model.fusion, CrossStitchFusion)
    assert parameter_breakdown(trainer.model, "semseg")["fusion"] == 2 * (64 + 64 + 128 + 256 + 512)
    assert_reloads_exactly(store, trainer)
    with pytest.raises(ConfigError, match="key 'fusion.type': nddr, but the store .* fuses with another method"):
        Trainer(load_config(None, tiny_run(store, synth, "[normals]", "fusion.type=nddr", *plain)), progress=False)

    store = tmp_path / "nddr"
    ablation = ("fusion.type=nddr", "fusion.init=xavier", "fusion.bn=false")
    trainer = run(tiny_run(store, synth, "[semseg, depth]", *ablation, *plain))
    layer = trainer.model.fusion["semseg"]["layer1"]
    assert isinstance(layer.bn, torch.nn.Identity)
    assert ModelStore(store).task("depth").model["fusion"]["init"] == "xavier"
    assert_reloads_exactly(store, trainer)


def test_each_nddr_cnn_branch_starts_from_its_single_task_network(tmp_path, synth, bank):
    """``backbone.init_from``: NDDR-CNN's initialization, each task's branch (encoder and head) from the
    same-named task of a store of single-task runs; the NDDR layers start as configured."""
    plain = (f"backbone.weights={bank}", *ONE_STEP)
    singles = tmp_path / "single"
    for task in ("semseg", "depth"):
        run(tiny_run(singles, synth, f"[{task}]", *plain))
    group = ("fusion.type=nddr", f"backbone.init_from={singles}", *plain)
    trainer = Trainer(load_config(None, tiny_run(tmp_path / "nddr", synth, "[semseg, depth]", *group)), progress=False)
    state = trainer.model.state_dict()
    stored = ModelStore(singles)
    for task in ("semseg", "depth"):
        for key, value in stored.load_task_tensors(task).items():
            assert torch.equal(state[key], value), key
    layer = trainer.model.fusion["semseg"]["layer1"].conv.weight
    assert torch.equal(layer[:, :64, 0, 0], 0.9 * torch.eye(64))
    with pytest.raises(ConfigError, match="key 'backbone.init_from': the store .* has no task \\['normals'\\]"):
        Trainer(load_config(None, tiny_run(tmp_path / "n", synth, "[normals]", *group)), progress=False)
    rc = rc_run(tmp_path / "rc", synth, bank, "[semseg]", f"backbone.init_from={singles}")
    with pytest.raises(ConfigError, match="task 'semseg' of .* does not fit this run's 'semseg'"):
        Trainer(load_config(None, rc), progress=False)


def test_vgg16_largefov_with_rc_ri_nff(tmp_path, synth):
    store = tmp_path / "store"
    vgg = ("backbone.arch=vgg16", "backbone.output_stride=8", "backbone.weights=none", "backbone.reparam=rc")
    trainer = run(tiny_run(store, synth, "[sal]", *vgg, "test.batch_size=2", *ONE_STEP))
    assert isinstance(trainer.model.backbone, RCVGG)
    counts = parameter_breakdown(trainer.model, "sal")
    # RC + NFF: every conv's modulator (Co x Co) and its row norms (Co); VGG has no BatchNorm
    widths = [64] * 2 + [128] * 2 + [256] * 3 + [512] * 6 + [1024] * 2
    assert counts["modulators"] == sum(c * c + c for c in widths) and counts["batchnorm"] == 0
    assert_reloads_exactly(store, trainer)


@pytest.mark.parametrize("reparam", ["none", "rc"])
def test_hard_parameter_sharing_trains_one_encoder_for_the_group(tmp_path, synth, bank, reparam):
    """``backbone.sharing: shared``: the group's tasks run on its first task's encoder (a plain trunk, or
    one set of modulators as RCM's common_mt_params); the other tasks own their heads and read the first
    task, so either loads alone from the store."""
    store = tmp_path / "store"
    options = (f"backbone.reparam={reparam}", "backbone.sharing=shared", *ONE_STEP)
    trainer = run(rc_run(store, synth, bank, "[semseg, depth, normals]", *options))
    backbone = trainer.model.backbone
    assert backbone.routes == {"depth": "semseg", "normals": "semseg"}
    owned = {t: parameter_breakdown(trainer.model, t) for t in ("semseg", "depth", "normals")}
    head = sum(p.numel() for p in trainer.model.heads["depth"].parameters())
    assert owned["depth"]["total"] == owned["depth"]["head"] == head
    encoder = "backbone" if reparam == "none" else "modulators"
    assert owned["semseg"][encoder] > 0 and owned["depth"][encoder] == owned["normals"][encoder] == 0
    s = ModelStore(store)
    record = s.task("depth")
    assert record.sources == ["semseg"] and record.model["trunk"] == "semseg" and record.model["fusion"] is None
    assert_reloads_exactly(store, trainer)
    alone = s.load_model(["normals"])  # loads the encoder of semseg too, frozen, without its head
    with torch.no_grad():
        x = probe_input()
        torch.testing.assert_close(alone(x, raw=True)["normals"], trainer.model(x, raw=True)["normals"])
    assert list(alone.heads) == ["normals"]
    for names in (["normals"], ["semseg", "depth", "normals"]):  # the deploy forms, checked on the probes
        for batched in (False, True):
            s.load_model(names, deploy=True, batched=batched)
    with pytest.raises(StoreError, match="read"):
        s.remove("semseg")
    # a later group fuses with the stored tasks by any method (the shared encoder is not a fusion)
    reader = run(
        rc_run(store, synth, bank, "[sal]", f"backbone.reparam={reparam}", "fusion.type=cross_stitch", *ONE_STEP)
    )
    assert reader.plan.frozen == ["semseg", "depth", "normals"] and ModelStore(store).verify() == []


def test_shared_modulators_keep_per_task_batchnorm(tmp_path, synth, bank):
    """``backbone.shared_modulators``: the group's tasks compute with its first task's modulators and keep
    their own BatchNorm and downsample copies."""
    store = tmp_path / "store"
    trainer = run(rc_run(store, synth, bank, "[semseg, depth]", "backbone.shared_modulators=true", *ONE_STEP))
    semseg, depth = (parameter_breakdown(trainer.model, t) for t in ("semseg", "depth"))
    assert depth["modulators"] == 0 and semseg["modulators"] > 0
    assert depth["batchnorm"] == semseg["batchnorm"] > 0 and depth["downsample"] == semseg["downsample"] > 0
    conv = trainer.model.backbone.layer1[0].conv1
    assert conv.modulator("depth") is conv.modulator("semseg") and "depth" not in conv.modulators
    state = trainer.model.state_dict()
    bn = "backbone.layer1.0.bn1.per_task.{}.weight"
    assert not torch.equal(state[bn.format("semseg")], state[bn.format("depth")])  # each task's own BatchNorm
    s = ModelStore(store)
    assert s.task("depth").model["modulators_of"] == "semseg" and s.task("depth").sources == ["semseg"]
    assert_reloads_exactly(store, trainer)
    s.load_model(["depth"], deploy=True)  # folds the shared modulators with depth's BatchNorm (checked on probes)


def test_the_official_ri_from_an_image_folder_at_output_stride_32_serves_a_dilated_run(tmp_path, synth, bank):
    """RI the official code's way: the undilated network (output stride 32) over a folder of images
    (``python -m decomp --images ... --output-stride 32``). Its bank is the same, so a run at output stride
    16 takes the file (``backbone.decomposition``) and its modulators start at the file's eigenvectors; up
    to layer3 the two networks compute the same responses (the same eigenvectors), layer4's differ."""
    folder = synth / "images"
    official, dilated = tmp_path / "os32.safetensors", tmp_path / "os16.safetensors"
    for out, stride in ((official, "32"), (dilated, "16")):
        argv = ["--images", str(folder), "--weights", str(bank), "--size", "48", "48", "--out", str(out)]
        assert decomp_main([*argv, "--output-stride", stride, "--quiet", "--device", "cpu"]) == 0
    a, meta = load_decomposition(official)
    b, _ = load_decomposition(dilated)
    assert meta["output_stride"] == "32"
    assert all(torch.equal(a[k].U, b[k].U) for k in a if not k.startswith("layer4"))
    assert not torch.equal(a["layer4.1.conv2"].U, b["layer4.1.conv2"].U)
    store = tmp_path / "store"
    trainer = Trainer(
        load_config(
            None, rc_run(store, synth, bank, "[depth]", f"backbone.decomposition={official}", "backbone.nff=false")
        ),
        progress=False,
    )
    modulator = trainer.model.backbone.layer4[1].conv2.modulators["depth"].weight.detach().flatten(1)
    assert torch.equal(modulator, a["layer4.1.conv2"].U.float())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["backbone.arch=vgg16"], "key 'backbone.output_stride': VGG-16 .* has output stride 8, got 16"),
        (
            ["backbone.arch=vgg16", "backbone.output_stride=8", "backbone.reparam=ra_series"],
            "key 'backbone.reparam': residual adapters",
        ),
        (["fusion.type=cross_stitch", "fusion.shortcut=true"], "key 'fusion.shortcut': is an option of NDDR"),
        (["fusion.type=cross_stitch", "fusion.bn=false"], "key 'fusion.bn': is an option of NDDR"),
        (["head.dropout=1.5"], "key 'head.dropout': expected a rate in \\[0, 1\\)"),
        (["backbone.train_encoder=some"], "key 'backbone.train_encoder'"),
        (["head.type=fcn"], "key 'head.type'"),
        (["backbone.sharing=shared", "fusion.type=nddr"], "key 'backbone.sharing': shared .* does not combine"),
        (["backbone.shared_modulators=true"], "key 'backbone.shared_modulators': shares RC modulators, but reparam"),
    ],
)
def test_combinations_that_cannot_work_are_one_error_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["tasks=[semseg]", *overrides])


def test_a_store_refuses_residual_adapters_over_an_rc_bank(tmp_path, synth, bank):
    store = tmp_path / "store"
    run(rc_run(store, synth, bank, "[semseg]", *ONE_STEP))
    with pytest.raises(StoreError, match="reparam"):
        Trainer(load_config(None, rc_run(store, synth, bank, "[depth]", "backbone.reparam=ra_series")), progress=False)
    assert [t.name for t in ModelStore(store).tasks] == ["semseg"]
