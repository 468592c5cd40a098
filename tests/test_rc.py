"""Reparameterized convolutions: RI equivalence, the frozen bank, NFF, per-task independence, counts."""

import pytest
import torch
from helpers import random_orthogonal

from rcm_nddr.nn.backbone import STAGES, resnet_backbone
from rcm_nddr.nn.filter_bank import bank_weights, filter_bank_sha256, reparameterized_convs
from rcm_nddr.nn.rc import RCBasicBlock, RCBottleneck, RCConv2d, RCResNet, rc_block


def pretrained_like(arch: str = "resnet18", seed: int = 0):
    """A plain backbone with non-trivial BatchNorm statistics, standing in for pretrained weights."""
    torch.manual_seed(seed)
    net = resnet_backbone(arch, output_stride=16)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 3, 64, 64))
    return net.eval()


def eigenvectors_for(net, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    modules = dict(net.named_modules())
    return {name: random_orthogonal(modules[name].out_channels, g) for name in reparameterized_convs(net)}


def stage_outputs(backbone, x, task=None):
    out, features = {}, ({task: x} if task else None)
    for stage in STAGES:
        if task is None:
            x = backbone.forward_stage(x, stage)
            out[stage] = x
        else:
            features = backbone.forward_stage(features, stage)
            out[stage] = features[task]
    return out


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("nff", [False, True])
def test_ri_starts_exactly_at_the_pretrained_network(arch, nff):
    plain = pretrained_like(arch)
    rc = RCResNet(plain, ["a", "b"], eigenvectors_for(plain), nff=nff).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = stage_outputs(plain, x)
        for task in ("a", "b"):
            got = stage_outputs(rc, x, task)
            for stage in STAGES:
                err = (got[stage] - expected[stage]).norm() / expected[stage].norm()
                assert err < 1e-4, (task, stage, float(err))


def test_rc_without_ri_keeps_the_pretrained_bank_and_default_modulators():
    plain = pretrained_like()
    rc = RCResNet(plain, ["a"])
    assert torch.equal(rc.conv1.filter_bank, plain.conv1.weight)
    assert torch.equal(rc.layer3[1].conv2.filter_bank, plain.layer3[1].conv2.weight)
    m = rc.conv1.modulators["a"].weight.squeeze()
    assert not torch.allclose(m, torch.eye(64), atol=1e-2)  # PyTorch's default conv init, not identity


def test_filter_bank_is_frozen_and_never_in_the_optimizer():
    plain = pretrained_like()
    rc = RCResNet(plain, ["a", "b"], eigenvectors_for(plain), nff=True)
    banks = {name: b.clone() for name, b in rc.named_buffers() if name.endswith("filter_bank")}
    assert len(banks) == len(reparameterized_convs(plain)) == 17
    assert all(not name.endswith("filter_bank") for name, _ in rc.named_parameters())
    optimizer = torch.optim.SGD(rc.parameters(), lr=0.1, momentum=0.9)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not held & {id(b) for name, b in rc.named_buffers() if name.endswith("filter_bank")}
    rc.train()
    for task in ("a", "b", "a"):
        out = stage_outputs(rc, torch.randn(2, 3, 64, 64), task)["layer4"]
        optimizer.zero_grad()
        out.square().mean().backward()
        optimizer.step()
    for name, b in rc.named_buffers():
        if name.endswith("filter_bank"):
            assert torch.equal(b, banks[name]), name
            assert b.grad is None


def test_nff_modulators_are_weight_normalized_rows_starting_at_u():
    u = random_orthogonal(8, torch.Generator().manual_seed(3)).float()
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
    rc = RCConv2d.from_conv(conv, ["t"], u, nff=True)
    modulator = rc.modulators["t"]
    g = modulator.parametrizations.weight.original0
    assert g.shape == (8, 1, 1, 1) and torch.allclose(g.flatten(), torch.ones(8), atol=1e-6)  # rows of U
    assert torch.allclose(modulator.weight.squeeze(), u, atol=1e-6)
    with torch.no_grad():
        g.mul_(3.0)  # scaling g scales the row norms, whatever v holds
    assert torch.allclose(modulator.weight.squeeze().norm(dim=1), torch.full((8,), 3.0), atol=1e-5)


def test_tasks_are_independent_and_a_new_task_starts_at_the_initialization():
    plain = pretrained_like()
    rc = RCResNet(plain, ["a", "b"], eigenvectors_for(plain), nff=False)
    x = torch.randn(2, 3, 64, 64)
    rc.eval()
    with torch.no_grad():
        before_b = stage_outputs(rc, x, "b")["layer4"].clone()
    rc.train()
    optimizer = torch.optim.SGD([p for n, p in rc.named_parameters() if ".a." in f".{n}."], lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        stage_outputs(rc, x, "a")["layer4"].square().mean().backward()
        optimizer.step()
    rc.eval()
    with torch.no_grad():
        assert torch.equal(stage_outputs(rc, x, "b")["layer4"], before_b)  # b's BN stats untouched too
        assert not torch.allclose(stage_outputs(rc, x, "a")["layer4"], before_b)
        rc.add_task("c")
        assert torch.allclose(stage_outputs(rc, x, "c")["layer4"], before_b, rtol=1e-4, atol=1e-5)


def test_resnet18_modulator_count_and_bank_identity():
    plain = pretrained_like()
    rc = RCResNet(plain, ["a"], eigenvectors_for(plain))
    modulators = sum(p.numel() for n, p in rc.named_parameters() if ".modulators." in n)
    assert modulators == 1_396_736  # stem + 16 block convs, Co x Co each, no bias
    assert filter_bank_sha256(bank_weights(plain)) == filter_bank_sha256(bank_weights(pretrained_like()))
    assert filter_bank_sha256(bank_weights(plain)) != filter_bank_sha256(bank_weights(pretrained_like(seed=1)))


def test_rc_blocks_are_torchvision_blocks_written_out_with_torchvision_names():
    basic = RCResNet(pretrained_like("resnet18"), ["a"])
    assert all(isinstance(b, RCBasicBlock) for s in STAGES[1:] for b in getattr(basic, s))
    bottleneck = RCResNet(pretrained_like("resnet50"), ["a"])
    assert all(isinstance(b, RCBottleneck) for s in STAGES[1:] for b in getattr(bottleneck, s))
    # the bank tensors are named like the torchvision convs they come from
    assert set(bottleneck.filter_bank()) == set(reparameterized_convs(pretrained_like("resnet50")))
    assert {"layer1.0.conv3.filter_bank", "layer1.0.bn3.per_task.a.running_mean"} <= set(bottleneck.state_dict())
    with pytest.raises(TypeError, match="BasicBlock and Bottleneck"):
        rc_block(torch.nn.Identity(), ["a"])


def test_an_rc_block_computes_its_task_s_torchvision_block():
    """Without RI the modulators are free; set them to the identity and the block is the pretrained one."""
    plain = pretrained_like("resnet50")
    block = plain.layer2[0]  # a Bottleneck with a downsample
    rc = rc_block(block, ["a"])
    with torch.no_grad():
        for conv in (rc.conv1, rc.conv2, rc.conv3):
            conv.modulators["a"].weight.copy_(torch.eye(conv.out_channels)[:, :, None, None])
    x = torch.randn(2, 256, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rc.eval()(x, "a"), block(x), rtol=1e-4, atol=1e-5)
