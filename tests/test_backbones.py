"""The deeper ResNets (101, 152) and VGG-16 DeepLab-LargeFOV: stages, weights, the RC form of VGG with its
bias in the filter bank, RI (random and real decompositions), NFF, the bank and per-task counts."""

import numpy as np
import pytest
import torch
from helpers import random_orthogonal
from PIL import Image
from rcm_nddr.decomp import ResponseStatistics, decompose_folder, load_decomposition
from safetensors.torch import save_file
from torchvision.models import vgg as tv_vgg

from rcm_nddr.nn.accounting import parameter_breakdown
from rcm_nddr.nn.backbone import (
    ARCHS,
    STAGES,
    ResNetBackbone,
    WeightsError,
    plain_backbone,
    torchvision_weights_path,
)
from rcm_nddr.nn.filter_bank import bank_weights, filter_bank_sha256, reparameterized_convs
from rcm_nddr.nn.rc import RCConv2d, RCResNet
from rcm_nddr.nn.rc_vgg import RCVGG, rc_backbone
from rcm_nddr.nn.vgg import TORCHVISION_FEATURES, VGGBackbone

VGG_CONVS = [
    "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
    "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7",
]  # fmt: skip
#: output channels of VGG_CONVS
VGG_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]


def cheap_orthogonal(n: int, generator: torch.Generator, block: int = 64) -> torch.Tensor:
    """An orthogonal n x n matrix at the cost of n / 64 small QRs: a block diagonal of random orthogonal
    64 x 64 blocks between two random permutations (the deep ResNets have many 1024- and 2048-wide convs)."""
    blocks = torch.block_diag(*(random_orthogonal(block, generator) for _ in range(n // block)))
    rows, cols = torch.randperm(n, generator=generator), torch.randperm(n, generator=generator)
    return blocks[rows][:, cols]


def eigenvectors_for(net, make=random_orthogonal, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    modules = dict(net.named_modules())
    return {name: make(modules[name].out_channels, g) for name in reparameterized_convs(net)}


def pretrained_like_vgg(seed: int = 0) -> VGGBackbone:
    """A plain VGG with non-zero biases (its initialization zeroes them), standing in for ImageNet weights."""
    torch.manual_seed(seed)
    net = plain_backbone("vgg16", "none")
    with torch.no_grad():
        for name in VGG_CONVS:
            getattr(net, name).bias.normal_(0.0, 0.1)
    return net.eval()


def stage_outputs(backbone, x, task=None) -> dict[str, torch.Tensor]:
    """Every stage's output: of a plain backbone, or of ``task`` through a per-task one."""
    out, features = {}, {task: x}
    with torch.no_grad():
        for stage in STAGES:
            if task is None:
                x = backbone.forward_stage(x, stage)
                out[stage] = x
            else:
                features = backbone.forward_stage(features, stage)
                out[stage] = features[task]
    return out


def assert_same_stages(got, expected, rtol=1e-5):
    for stage in STAGES:
        scale = float(expected[stage].abs().max())
        torch.testing.assert_close(got[stage], expected[stage], rtol=rtol, atol=rtol * scale, msg=stage)


# ResNet-101 and ResNet-152


@pytest.mark.parametrize(("arch", "blocks"), [("resnet101", [3, 4, 23, 3]), ("resnet152", [3, 8, 36, 3])])
def test_deep_resnets_have_their_stages_and_ri_starts_at_the_plain_network(arch, blocks):
    torch.manual_seed(0)
    plain = plain_backbone(arch, "none")
    assert isinstance(plain, ResNetBackbone) and plain.output_stride == 16
    assert [len(getattr(plain, s)) for s in STAGES[1:]] == blocks
    with torch.no_grad():  # non-trivial BatchNorm, as pretrained weights have
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    plain.eval()
    x = torch.randn(1, 3, 32, 32)
    expected = stage_outputs(plain, x)
    channels = {"stem": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    for stage, out in expected.items():
        assert out.shape[1] == plain.stage_channels[stage] == channels[stage]
        assert out.shape[-2:] == (32 // plain.stage_strides[stage],) * 2

    u = eigenvectors_for(plain, cheap_orthogonal)
    rc = RCResNet(plain, ["a"], u).eval()
    assert_same_stages(stage_outputs(rc, x, "a"), expected, rtol=1e-4)
    # each task owns one Co x Co modulator per reparameterized conv, no bias
    modules = dict(plain.named_modules())
    formula = sum(modules[n].out_channels ** 2 for n in reparameterized_convs(plain))
    assert parameter_breakdown(rc, "a")["modulators"] == formula
    assert len(reparameterized_convs(plain)) == 1 + 3 * sum(blocks)  # stem + three convs per Bottleneck


# VGG-16 DeepLab-LargeFOV: the plain backbone


def test_vgg16_stages_strides_and_channels():
    net = pretrained_like_vgg()
    assert isinstance(net, VGGBackbone) and net.output_stride == 8
    assert net.stage_channels == {"stem": 64, "layer1": 128, "layer2": 256, "layer3": 512, "layer4": 1024}
    assert net.stage_strides == {"stem": 2, "layer1": 4, "layer2": 8, "layer3": 8, "layer4": 8}
    with torch.no_grad():
        features = net(torch.randn(1, 3, 48, 64))
    assert list(features) == list(STAGES)
    for stage, out in features.items():
        stride = net.stage_strides[stage]
        assert out.shape == (1, net.stage_channels[stage], 48 // stride, 64 // stride), stage
    with pytest.raises(KeyError, match="unknown stage"):
        net.forward_stage(torch.randn(1, 3, 8, 8), "layer5")


def test_vgg16_is_deeplab_largefov_without_batchnorm():
    net = plain_backbone("vgg16")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    convs = {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert list(convs) == VGG_CONVS and all(m.bias is not None for m in convs.values())
    assert [m.out_channels for m in convs.values()] == VGG_WIDTHS
    dilations = {n: convs[n].dilation[0] for n in ("conv4_3", "conv5_1", "conv5_3", "fc6", "fc7")}
    assert dilations == {"conv4_3": 1, "conv5_1": 2, "conv5_3": 2, "fc6": 12, "fc7": 1}
    assert convs["fc6"].kernel_size == (3, 3) and convs["fc7"].kernel_size == (1, 1)
    assert [getattr(net, f"pool{i}").stride for i in range(1, 6)] == [2, 2, 2, 1, 1]
    # dropout after fc6 and fc7 in training only
    conv4 = torch.ones(1, 512, 4, 4)
    with torch.no_grad():
        net.train()
        assert not torch.equal(net.layer4(conv4), net.layer4(conv4))
        net.eval()
        assert torch.equal(net.layer4(conv4), net.layer4(conv4))
    with pytest.raises(ValueError, match="output stride 8"):
        plain_backbone("vgg16", output_stride=16)


def test_plain_backbone_builds_every_arch_by_name():
    assert ARCHS == ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16")
    assert isinstance(plain_backbone("resnet18", output_stride=8), ResNetBackbone)
    with pytest.raises(ValueError, match=r"unknown backbone arch 'vgg19'; known: .*resnet152, vgg16"):
        plain_backbone("vgg19")
    with pytest.raises(TypeError, match="no RC form of a Identity"):
        rc_backbone(torch.nn.Identity(), ["a"])


def torchvision_vgg16_features(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with torchvision's VGG-16 names: its real feature layers (random), a stand-in classifier."""
    torch.manual_seed(seed)
    features = tv_vgg.make_layers(tv_vgg.cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(8, 4)  # dropped: fc6 is a conv of another shape
    return state


def test_vgg16_weights_torchvision_cache_path_and_own_names(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = torchvision_weights_path("vgg16")
    assert cached == tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    with pytest.raises(WeightsError, match="nothing is downloaded") as info:
        plain_backbone("vgg16", "torchvision")
    assert str(cached) in str(info.value) and tv_vgg.VGG16_Weights.IMAGENET1K_V1.url in str(info.value)

    state = torchvision_vgg16_features()
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    torch.manual_seed(1)
    from_cache = plain_backbone("vgg16", "torchvision")
    torch.manual_seed(1)
    fresh = plain_backbone("vgg16", "none")
    for name, index in TORCHVISION_FEATURES.items():
        assert torch.equal(getattr(from_cache, name).weight, state[f"features.{index}.weight"]), name
        assert torch.equal(getattr(from_cache, name).bias, state[f"features.{index}.bias"]), name
    for name in ("fc6", "fc7"):  # not in torchvision's weights: their random initialization stays
        assert torch.equal(getattr(from_cache, name).weight, getattr(fresh, name).weight)
    assert torch.equal(plain_backbone("vgg16", str(cached)).conv5_3.weight, state["features.28.weight"])

    # this module's own names, fc6 and fc7 included, load bit for bit (a pretrain export)
    own, expected = tmp_path / "vgg.safetensors", pretrained_like_vgg(seed=2).state_dict()
    save_file({k: v.contiguous() for k, v in expected.items()}, str(own))
    loaded = plain_backbone("vgg16", str(own)).state_dict()
    assert list(loaded) == list(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_vgg16_weights_that_do_not_fit_are_clear_errors(tmp_path):
    state = torchvision_vgg16_features()
    del state["features.24.bias"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"do not fit this VGG: missing \['conv5_1.bias'\]"):
        plain_backbone("vgg16", str(path))
    own = {k: v for k, v in plain_backbone("vgg16").state_dict().items() if k != "fc6.bias"}
    torch.save(own, path)
    with pytest.raises(WeightsError, match=r"missing \['fc6.bias'\]"):  # fc6 is loaded whole or not at all
        plain_backbone("vgg16", str(path))
    torch.save({**torchvision_vgg16_features(), "features.3.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match=r"unexpected \['features.3.weight'\]"):
        plain_backbone("vgg16", str(path))


# the filter bank and the decomposition on VGG


def test_vgg_bank_lists_the_convs_in_forward_order_with_their_biases():
    net = pretrained_like_vgg()
    called = []
    handles = [getattr(net, n).register_forward_hook(lambda *_, n=n: called.append(n)) for n in VGG_CONVS]
    with torch.no_grad():
        net(torch.randn(1, 3, 16, 16))
    for handle in handles:
        handle.remove()
    assert reparameterized_convs(net) == called == VGG_CONVS
    weights = bank_weights(net)
    assert list(weights) == [k for n in VGG_CONVS for k in (n, f"{n}.bias")]
    assert all(weights[n] is getattr(net, n).weight and weights[f"{n}.bias"] is getattr(net, n).bias for n in VGG_CONVS)
    # a bias is part of the bank's identity
    before = filter_bank_sha256(weights)
    with torch.no_grad():
        net.fc7.bias[0] += 1.0
    assert filter_bank_sha256(bank_weights(net)) != before
    # the ResNets' banks keep their names and carry no bias
    resnet = plain_backbone("resnet50")
    assert list(bank_weights(resnet)) == reparameterized_convs(resnet)
    assert not any(".downsample." in n for n in reparameterized_convs(resnet))


def test_decomposition_of_vgg_sees_the_pre_activation_response_whose_bias_moves_the_mean_only():
    net = pretrained_like_vgg()
    unbiased = pretrained_like_vgg()
    with torch.no_grad():
        unbiased.conv1_1.bias.zero_()
    images = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    stats, stats0 = ResponseStatistics(net), ResponseStatistics(unbiased)
    stats.update(images)
    stats0.update(images)
    d, d0 = stats.decompose()["conv1_1"], stats0.decompose()["conv1_1"]
    torch.testing.assert_close(d.mean - d0.mean, net.conv1_1.bias.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(d.eigenvalues, d0.eigenvalues, rtol=0, atol=1e-5 * float(d.eigenvalues[0]))


# the RC form of VGG


@pytest.mark.parametrize("nff", [False, True])
def test_rc_vgg_with_random_eigenvectors_starts_at_the_plain_network(nff):
    plain = pretrained_like_vgg()
    rc = RCVGG(plain, ["a", "b"], eigenvectors_for(plain), nff=nff).eval()
    x = torch.randn(1, 3, 32, 32)
    expected = stage_outputs(plain, x)
    for task in ("a", "b"):
        assert_same_stages(stage_outputs(rc, x, task), expected)
    # the bank as used is U^T W and U^T b
    u = eigenvectors_for(plain)["fc6"]
    bank = rc.filter_bank()
    torch.testing.assert_close(bank["fc6.bias"].double(), u.T @ plain.fc6.bias.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        bank["fc6"].double().flatten(1), u.T @ plain.fc6.weight.double().flatten(1), rtol=0, atol=1e-6
    )


def test_rc_vgg_with_the_decomposition_of_real_responses_starts_at_the_plain_network():
    plain = pretrained_like_vgg()
    stats = ResponseStatistics(plain)
    for seed in (4, 5):
        stats.update(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
    decomposition = stats.decompose()
    assert list(decomposition) == VGG_CONVS
    rc = rc_backbone(plain, ["a"], {n: d.U for n, d in decomposition.items()}, nff=True).eval()
    assert isinstance(rc, RCVGG)
    x = torch.randn(2, 3, 40, 40)
    assert_same_stages(stage_outputs(rc, x, "a"), stage_outputs(plain, x))


def test_rc_vgg_with_identity_modulators_is_bitwise_the_plain_network():
    """Without RI the bank is W, b as they are: with identity modulators RC computes what the plain convs do."""
    plain = pretrained_like_vgg()
    rc = RCVGG(plain, ["a"]).eval()
    assert torch.equal(rc.conv3_2.filter_bank, plain.conv3_2.weight)
    assert torch.equal(rc.conv3_2.filter_bank_bias, plain.conv3_2.bias)
    with torch.no_grad():
        for conv in rc.modules():
            if isinstance(conv, RCConv2d):
                conv.modulators["a"].weight.copy_(torch.eye(conv.out_channels)[:, :, None, None])
    x = torch.randn(1, 3, 32, 32)
    got, expected = stage_outputs(rc, x, "a"), stage_outputs(plain, x)
    assert all(torch.equal(got[s], expected[s]) for s in STAGES)


def test_rc_vgg_add_task_starts_where_the_first_task_started_and_tasks_share_the_stem_response():
    plain = pretrained_like_vgg()
    rc = RCVGG(plain, ["a"], eigenvectors_for(plain)).eval()
    x = torch.randn(1, 3, 32, 32)
    before = stage_outputs(rc, x, "a")
    with torch.no_grad():  # a trains away from its start; b, added later, starts where a started
        rc.conv2_1.modulators["a"].weight.mul_(1.5)
    rc.add_task("b")
    rc.add_task("c", nff=True)
    assert rc.tasks == ["a", "b", "c"]
    after = stage_outputs(rc, x, "b")
    assert all(torch.equal(after[s], before[s]) for s in STAGES)
    assert_same_stages(stage_outputs(rc, x, "c"), before)
    assert not torch.allclose(stage_outputs(rc, x, "a")["layer1"], before["layer1"])
    # the tasks reading one image share conv1_1's bank response, computed once
    response, calls = rc.conv1_1.response, []
    rc.conv1_1.response = lambda image: calls.append(image) or response(image)
    with torch.no_grad():
        stem = rc.forward_stage({"a": x, "b": x, "c": x}, "stem")
    assert len(calls) == 1 and torch.equal(stem["b"], before["stem"])


def test_rc_vgg_filter_bank_is_a_frozen_buffer_never_a_parameter():
    plain = pretrained_like_vgg()
    rc = RCVGG(plain, ["a", "b"], eigenvectors_for(plain), nff=True)
    bank = {k: v.clone() for k, v in rc.filter_bank().items()}
    assert list(bank) == list(bank_weights(plain))  # the same names as the plain bank
    buffers = {n for n, _ in rc.named_buffers()}
    assert {"fc7.filter_bank", "fc7.filter_bank_bias", "conv1_1.filter_bank_bias"} <= buffers
    assert not any("filter_bank" in n for n, _ in rc.named_parameters())
    optimizer = torch.optim.SGD(rc.parameters(), lr=0.1)
    rc.train()
    for task in ("a", "b"):
        optimizer.zero_grad()
        out = rc.forward_stage({task: torch.randn(1, 3, 32, 32)}, "stem")
        for stage in STAGES[1:]:
            out = rc.forward_stage(out, stage)
        out[task].square().mean().backward()
        optimizer.step()
    assert all(torch.equal(rc.filter_bank()[k], v) for k, v in bank.items())
    # a store's bank loads bit for bit; one without the biases is refused
    other = RCVGG(pretrained_like_vgg(seed=1), ["a"])
    other.load_filter_bank(bank)
    assert all(torch.equal(other.filter_bank()[k], v) for k, v in bank.items())
    with pytest.raises(ValueError, match=r"missing \['conv1_1.bias'"):
        other.load_filter_bank({k: v for k, v in bank.items() if not k.endswith(".bias")})


@pytest.mark.parametrize("nff", [False, True])
def test_rc_vgg_per_task_parameters(nff):
    """A task owns one Co x Co modulator per conv (15 convs), plus with NFF the Co row norms g of each; the
    biases stay in the shared bank. Sum over VGG_WIDTHS: 3,907,584 weights, 6,272 row norms."""
    plain = pretrained_like_vgg()
    rc = RCVGG(plain, ["a", "b"], nff=nff)
    formula = sum(co * co for co in VGG_WIDTHS) + (sum(VGG_WIDTHS) if nff else 0)
    assert formula == 3_907_584 + (6_272 if nff else 0)
    for task in ("a", "b"):
        counts = parameter_breakdown(rc, task)
        assert counts["modulators"] == counts["total"] == formula
    assert counts["filter_bank"] == sum(p.numel() for p in plain.parameters())  # weights and biases, once
    assert sum(p.numel() for p in rc.parameters()) == 2 * formula


def test_decompose_folder_makes_the_file_of_a_vgg_bank(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    weights = tmp_path / "vgg.pth"
    torch.save(pretrained_like_vgg().state_dict(), weights)
    out = decompose_folder(
        folder,
        tmp_path / "ri.safetensors",
        arch="vgg16",
        weights=str(weights),
        size=(24, 24),
        num_workers=0,
        progress=False,
    )
    sha = filter_bank_sha256(bank_weights(plain_backbone("vgg16", str(weights))))
    layers, meta = load_decomposition(out, expected_bank_sha256=sha)
    assert list(layers) == VGG_CONVS and meta["arch"] == "vgg16" and meta["output_stride"] == "8"


def test_the_decomp_command_knows_every_backbone():
    """``python -m decomp --arch`` lists the archs without importing torch: the list must stay complete."""
    from rcm_nddr.commands.arguments import DECOMP_ARCHS
    from rcm_nddr.nn.backbone import ARCHS

    assert set(DECOMP_ARCHS) == set(ARCHS)
