"""The RCM paper's RC variant: a network pretrained in RC form (bank Ws and modulator Wt per conv, trained
together; the official RCM models' format), read as a filter bank plus each task's modulator start, and
``rcm-nddr pretrain`` training one in that form."""

from pathlib import Path

import pytest
import torch
from helpers import random_orthogonal, tiny_run
from rcm_nddr.tasks.depth import DepthTask
from torch.nn.utils import parametrize

from rcm_nddr.commands import cli
from rcm_nddr.config import ConfigError, load_config
from rcm_nddr.engine.builders import build_model
from rcm_nddr.engine.pretrain import pretrain
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.nn.backbone import plain_backbone, resnet_backbone
from rcm_nddr.nn.filter_bank import reparameterized_convs
from rcm_nddr.nn.weights import FactorizedConv, WeightsError, factorize, load_state_dict_file, read_rc_form
from rcm_nddr.store import ModelStore
from rcm_nddr.task import DatasetInfo

REPO = Path(__file__).resolve().parents[1]
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def rc_pretrained(arch: str, seed: int = 0) -> torch.nn.Module:
    """A plain backbone in RC form whose modulators are far from the identity (a random rotation times a
    random positive scale per row) and whose BatchNorm statistics are not the defaults, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = factorize(plain_backbone(arch, weights="none"))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, FactorizedConv):
                n = module.Wt.weight.shape[0]
                scale = 0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64)
                module.Wt.weight.copy_((scale * random_orthogonal(n, g)).float().view_as(module.Wt.weight))
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=g)
                module.running_var.uniform_(0.5, 1.5, generator=g)
    return net.eval()


def rc_config(tmp_path: Path, weights: Path, *extra: str):
    return load_config(
        None,
        [
            "tasks=[depth]",
            f"store={tmp_path / 'store'}",
            f"backbone.weights={weights}",
            "backbone.reparam=rc",
            "backbone.ri=false",
            "head.channels=8",
            *extra,
        ],
    )


def test_an_rc_form_file_splits_into_bank_modulators_and_the_network_it_computes(tmp_path):
    net = rc_pretrained("resnet18")
    state = net.state_dict()
    convs = reparameterized_convs(resnet_backbone("resnet18"))
    assert {f"{c}.Ws.weight" for c in convs} | {f"{c}.Wt.weight" for c in convs} <= set(state)
    form = read_rc_form(state, "test")
    assert set(form.bank) == set(form.modulators) == set(convs)
    for conv in convs:
        factors = net.get_submodule(conv)
        assert torch.equal(form.bank[conv], factors.Ws.weight)
        assert torch.equal(form.modulators[conv], factors.Wt.weight.flatten(1))
    # the official models' packaging: DataParallel's module. prefix, a state_dict entry, the classifier
    official = {f"module.{k}": v for k, v in state.items()}
    official.update({"module.fc.weight": torch.zeros(1000, 512), "module.fc.bias": torch.zeros(1000)})
    torch.save({"state_dict": official, "epoch": 90}, tmp_path / "resnet18_RC.pth")
    plain = resnet_backbone("resnet18", weights=str(tmp_path / "resnet18_RC.pth")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for stage in STAGES:
            a, b = net.forward_stage(x, stage), plain.forward_stage(x, stage)
            err = ((a - b).norm() / a.norm()).item()
            assert err < 1e-5, (stage, err)  # the plain network it computes, up to float error
            x = a
    assert read_rc_form(resnet_backbone("resnet18").state_dict(), "plain") is None


@pytest.mark.parametrize(("arch", "nff"), [("resnet18", False), ("resnet18", True), ("vgg16", False)])
def test_the_rc_variant_starts_at_the_rc_pretrained_networks_outputs(tmp_path, arch, nff):
    net = rc_pretrained(arch, seed=1)
    weights = tmp_path / "rc.pth"
    torch.save(net.state_dict(), weights)
    form = read_rc_form(net.state_dict(), "test")
    stride = 8 if arch == "vgg16" else 16
    cfg = rc_config(
        tmp_path, weights, f"backbone.arch={arch}", f"backbone.output_stride={stride}", f"backbone.nff={nff}"
    )
    model = build_model(cfg, {"depth": DepthTask("depth", DatasetInfo("x"))}).eval()
    backbone = model.backbone
    # the bank is the pretrained Ws, bit for bit (VGG: its biases too); each modulator starts at Wt
    bank = backbone.filter_bank()
    assert set(bank) == set(form.bank) and all(torch.equal(bank[k], form.bank[k]) for k in bank)
    for conv, wt in form.modulators.items():
        modulator = backbone.get_submodule(conv).modulators["depth"]
        assert parametrize.is_parametrized(modulator) == nff
        assert torch.allclose(modulator.weight.flatten(1), wt, atol=0 if not nff else 1e-6)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for stage in STAGES:
            want, got = net.forward_stage(x, stage), backbone.forward_task_stage(x, stage, "depth")
            if nff:  # g v / ||v|| recomputes the modulator: equal up to float error
                assert ((want - got).norm() / want.norm()).item() < 1e-5, stage
            else:  # the same convolutions in the same order: the RC-pretrained network's outputs exactly
                assert torch.equal(want, got), stage
            x = want


def test_rc_form_files_that_do_not_fit_are_refused_naming_the_tensor(tmp_path):
    state = rc_pretrained("resnet18").state_dict()
    lacking = {k: v for k, v in state.items() if k != "layer2.1.conv1.Wt.weight"}
    with pytest.raises(WeightsError, match=r"conv 'layer2.1.conv1' has layer2.1.conv1.Ws.weight but no .*Wt.weight"):
        read_rc_form(lacking, "f.pth")
    wrong = {**state, "layer1.0.conv2.Wt.weight": torch.zeros(64, 32, 1, 1)}
    with pytest.raises(WeightsError, match=r"layer1.0.conv2.Wt.weight has shape \(64, 32, 1, 1\), expected \(64, 64"):
        read_rc_form(wrong, "f.pth")
    biased = {**state, "layer1.0.conv2.Wt.bias": torch.zeros(64)}
    with pytest.raises(WeightsError, match=r"\['layer1.0.conv2.Wt.bias'\] are not a bank"):
        read_rc_form(biased, "f.pth")
    # RI does not apply over an RC-pretrained network: refused before any decomposition is computed
    weights = tmp_path / "rc.pth"
    torch.save(state, weights)
    cfg = rc_config(tmp_path, weights, "backbone.ri=true", f"backbone.decomposition={tmp_path / 'ri.safetensors'}")
    with pytest.raises(ConfigError, match=r"key 'backbone.ri'.*pretrained in RC form"):
        build_model(cfg, {"depth": DepthTask("depth", DatasetInfo("x"))})
    assert not (tmp_path / "ri.safetensors").exists()
    # a ResNet-34 in RC form for a ResNet-18 run: the plain network it computes does not load
    torch.save(factorize(resnet_backbone("resnet34")).state_dict(), weights)
    with pytest.raises(WeightsError, match=r"do not fit this ResNet"):
        build_model(rc_config(tmp_path, weights), {"depth": DepthTask("depth", DatasetInfo("x"))})


def test_pretrain_in_rc_form_then_the_rc_variant_trains_on_its_bank(tmp_path, synth):
    out = tmp_path / "rc_bank.pth"
    args = ["pretrain", "--config", str(REPO / "configs/synthetic/pretrain_rc.yaml"), "--quiet", "--out", str(out)]
    pre = [f"dataset.root={synth}", f"store={tmp_path / 'pre'}", "dataset.crop=[48, 48]", "head.channels=8"]
    pre += ["train.max_iters=3", "train.batch_size=2", "train.num_workers=0", "train.device=cpu"]
    for item in pre:
        args += ["--set", item]
    assert cli.main(args) == 0
    state = load_state_dict_file(out)
    form = read_rc_form(state, str(out))
    assert "layer3.0.conv1.Ws.weight" in state and "layer3.0.downsample.0.weight" in state
    eye = torch.eye(256)
    assert not torch.equal(form.modulators["layer3.0.conv1"], eye)  # Wt trained with Ws, from the identity

    overrides = tiny_run(tmp_path / "rc", synth, "[semseg]", f"backbone.weights={out}", "train.max_iters=2")
    trainer = Trainer(load_config(REPO / "configs/synthetic/semseg_RC.yaml", overrides), progress=False)
    start = trainer.model.backbone.layer3[0].conv1.modulators["semseg"].weight.flatten(1).detach().clone()
    assert torch.equal(start, form.modulators["layer3.0.conv1"])
    trainer.run()  # trains and registers
    store = ModelStore(tmp_path / "rc")
    assert torch.equal(store.filter_bank()["layer3.0.conv1"], form.bank["layer3.0.conv1"])
    (record,) = store.tasks
    assert record.parameters["modulators"] == 1_396_736  # ResNet-18: its 17 convs' Co x Co
    assert record.parameters["backbone"] == 0

    # pretraining in RC form refuses RI and NFF; other reparameterizations are refused
    for item, key in (("backbone.ri=true", "backbone.ri"), ("backbone.nff=true", "backbone.nff")):
        cfg = load_config(REPO / "configs/synthetic/pretrain_rc.yaml", [*pre, item])
        with pytest.raises(ConfigError, match=f"key '{key}'"):
            pretrain(cfg, tmp_path / "x.pth", progress=False)
    cfg = load_config(REPO / "configs/synthetic/pretrain_rc.yaml", [*pre, "backbone.reparam=ra_series"])
    with pytest.raises(ConfigError, match="key 'backbone.reparam'.*not ra_series"):
        pretrain(cfg, tmp_path / "x.pth", progress=False)
    assert not (tmp_path / "x.pth").exists()


def test_pretraining_in_rc_form_follows_the_plain_pretraining_recipe():
    plain = load_config(REPO / "configs/synthetic/pretrain.yaml").to_dict()
    rc = load_config(REPO / "configs/synthetic/pretrain_rc.yaml").to_dict()
    assert (rc["backbone"]["reparam"], rc["backbone"]["ri"], rc["backbone"]["nff"]) == ("rc", False, False)
    for cfg in (plain, rc):
        del cfg["store"], cfg["backbone"]["reparam"], cfg["backbone"]["ri"], cfg["backbone"]["nff"]
    assert rc == plain  # same tasks, data, schedule and seed: only the form of the convs differs
