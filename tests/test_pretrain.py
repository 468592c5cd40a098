"""Pretraining a shared plain backbone and using its export as an RC filter bank; parameter accounting."""

from pathlib import Path

import pytest
import torch
from rcm_nddr.decomp import DecompositionError, load_decomposition
from rcm_nddr.tasks.depth import DepthTask
from torch.nn.utils import parametrize

from rcm_nddr.commands import cli
from rcm_nddr.config import ConfigError, load_config
from rcm_nddr.engine.builders import build_model
from rcm_nddr.engine.pretrain import describe_bank, pretrain, read_recipe
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.files import file_sha256
from rcm_nddr.nn.accounting import parameter_breakdown
from rcm_nddr.nn.backbone import SharedBackbone, load_state_dict_file, resnet_backbone
from rcm_nddr.nn.filter_bank import bank_weights, filter_bank_sha256
from rcm_nddr.store import StoreError
from rcm_nddr.task import DatasetInfo

PRETRAIN = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "pretrain.yaml"
TINY = [
    "dataset.crop=[48, 48]",
    "head.channels=8",
    "train.max_iters=3",
    "train.batch_size=2",
    "train.num_workers=0",
    "train.device=cpu",
    "test.batch_size=4",
]


def test_pretrain_exports_a_torchvision_state_dict_usable_as_a_bank(tmp_path, synth):
    overrides = [f"dataset.root={synth}", f"store={tmp_path / 'pre'}", *TINY]
    cfg = load_config(PRETRAIN, overrides)
    out = pretrain(cfg, tmp_path / "bank.pth", progress=False)
    state = load_state_dict_file(out)
    assert "conv1.weight" in state and "layer4.1.conv2.weight" in state and not any(k.startswith("fc.") for k in state)
    # the recipe next to the bank says how it was made, and stops vouching for the file once it changes
    recipe = read_recipe(out)
    assert recipe["iterations"] == 3 and recipe["tasks"] == ["semseg", "depth", "normals"]
    assert recipe["dataset"]["root"] == str(synth) and recipe["dataset"]["splits"]["train"] > 0
    assert recipe["batch_size"] == 2 and set(recipe["validation"]) == {"semseg", "depth", "normals"}
    assert "3 iterations of semseg+depth+normals, batch 2" in describe_bank(out)
    plain = resnet_backbone("resnet18", weights=str(out))  # loads strictly
    assert torch.equal(plain.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    # the bank of an RC run is exactly the exported conv weights (plain RC, no RI)
    rc_cfg = load_config(
        None,
        [
            "tasks=[sal]",
            f"store={tmp_path / 'rc'}",
            f"dataset.root={synth}",
            f"backbone.weights={out}",
            "backbone.reparam=rc",
            "backbone.ri=false",
            "backbone.nff=false",
            *TINY,
        ],
    )
    trainer = Trainer(rc_cfg, progress=False)
    assert torch.equal(trainer.model.backbone.layer2[0].conv1.filter_bank, state["layer2.0.conv1.weight"])
    trainer.fit()
    assert torch.equal(trainer.model.backbone.layer2[0].conv1.filter_bank, state["layer2.0.conv1.weight"])
    # pretrained again, the bank is the same file to the byte (a study's cells keep their names)
    cfg = load_config(PRETRAIN, [f"dataset.root={synth}", f"store={tmp_path / 'pre2'}", *TINY])
    again = pretrain(cfg, tmp_path / "again" / "bank.pth", progress=False)
    assert file_sha256(again) == file_sha256(out)
    torch.save({k: v + 1 for k, v in state.items()}, out)
    assert read_recipe(out) is None and "how it was made is unknown" in describe_bank(out)
    counts = trainer.parameter_counts["sal"]
    assert counts["modulators"] == 1_396_736 and counts["backbone"] == 0 and counts["head"] > 0
    assert counts["batchnorm"] > 0 and counts["downsample"] > 0 and counts["filter_bank"] > 10_000_000
    assert counts["total"] == sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)


def test_shared_backbone_computes_once_and_pretraining_refuses_adapters(tmp_path, synth):
    net = resnet_backbone("resnet18")
    shared = SharedBackbone(net)
    x = torch.randn(1, 3, 32, 32)
    out = shared.forward_stage({"a": x, "b": x}, "stem")
    assert out["a"] is out["b"]
    cfg = load_config(PRETRAIN, ["backbone.reparam=ra_parallel", f"dataset.root={synth}"])
    with pytest.raises(ConfigError, match="backbone.reparam"):
        pretrain(cfg, tmp_path / "x.pth", progress=False)
    args = [
        "pretrain",
        "--config",
        "configs/synthetic/pretrain.yaml",
        "--quiet",
        "--out",
        str(tmp_path / "b.safetensors"),
    ]
    for item in [f"dataset.root={synth}", f"store={tmp_path / 'p'}", *TINY]:
        args += ["--set", item]
    assert cli.main(args) == 0
    assert set(load_state_dict_file(tmp_path / "b.safetensors")) == set(resnet_backbone("resnet18").state_dict())


def test_single_task_baseline_owns_a_whole_backbone():
    cfg = load_config(None, ["tasks=[depth]", "head.channels=8"])
    model = build_model(cfg, {"depth": DepthTask("depth", DatasetInfo("x"))})
    counts = parameter_breakdown(model, "depth")
    assert counts["backbone"] == sum(p.numel() for p in resnet_backbone("resnet18").parameters())
    assert counts["modulators"] == 0 and counts["filter_bank"] == 0
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_rc_ri_nff_run_makes_its_decomposition_and_refuses_another_banks(tmp_path, synth):
    bank = tmp_path / "bank.pth"
    torch.manual_seed(0)
    torch.save(resnet_backbone("resnet18").state_dict(), bank)
    ri = tmp_path / "ri.safetensors"
    overrides = [
        "tasks=[edge]",
        f"store={tmp_path / 'rc'}",
        f"dataset.root={synth}",
        f"backbone.weights={bank}",
        "backbone.reparam=rc",
        f"backbone.decomposition={ri}",
        *TINY,
    ]
    trainer = Trainer(load_config(None, overrides), progress=False)  # RI and NFF are the defaults
    modulator = trainer.model.backbone.layer1[0].conv1.modulators["edge"].weight.squeeze().detach().clone()
    assert not ri.exists()  # computed by the build, written when the run starts
    trainer.fit()
    sha = filter_bank_sha256(bank_weights(resnet_backbone("resnet18", weights=str(bank))))
    layers, meta = load_decomposition(ri, expected_bank_sha256=sha)
    assert meta["filter_bank_sha256"] == sha and len(layers) == 17
    u = layers["layer1.0.conv1"].U.float()
    assert torch.allclose(modulator, u, atol=1e-6)

    torch.manual_seed(1)
    torch.save(resnet_backbone("resnet18").state_dict(), bank)  # another bank
    other = filter_bank_sha256(bank_weights(resnet_backbone("resnet18", weights=str(bank))))
    # the store holds the first bank: refused naming both banks' sha256
    with pytest.raises(StoreError, match=f"{other}.*{sha}"):
        Trainer(load_config(None, overrides), overwrite=True, progress=False)
    # a new store with the first bank's decomposition file: refused by the file
    with pytest.raises(DecompositionError, match=sha):
        Trainer(load_config(None, [*overrides, f"store={tmp_path / 'rc2'}"]), progress=False)


def test_ri_decomposition_is_made_for_the_exact_bank_even_with_random_weights(tmp_path, synth):
    overrides = [
        "tasks=[sal]",
        f"store={tmp_path / 'rc'}",
        f"dataset.root={synth}",
        "backbone.weights=none",
        "backbone.reparam=rc",  # no backbone.decomposition: the store's ri.safetensors
        *TINY,
    ]
    trainer = Trainer(load_config(None, overrides), progress=False)  # would refuse a decomposition of another bank
    assert not (tmp_path / "rc").exists()  # building the run writes nothing, not even inside the store
    trainer.setup.start()
    assert (tmp_path / "rc" / "ri.safetensors").is_file()
    assert parametrize.is_parametrized(trainer.model.backbone.conv1.modulators["sal"])  # NFF
