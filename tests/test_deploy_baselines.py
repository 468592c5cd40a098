"""The deploy form of the baseline modules: residual adapters (series: adapter and its BatchNorm folded into
the bank, parallel: adapter into the kernel's centre tap, then the task's BatchNorm), RC VGG-16 (modulators
into the bank and its biases) and plain VGG-16, NDDR without BatchNorm, cross-stitch fusion and the
DeepLabv3 head. Each deploy form, per task and batched, gives the training form's outputs in eval mode and
holds no BatchNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, random_orthogonal
from torch import nn

from rcm_nddr.nn.adapters import AdapterConv2d, ParallelAdapterConv2d, RAResNet, SeriesAdapterConv2d
from rcm_nddr.nn.backbone import SharedBackbone, TaskBackbones, plain_backbone, resnet_backbone
from rcm_nddr.nn.batched import StackedFusion, stack_fusion
from rcm_nddr.nn.cross_stitch import CrossStitchFusion
from rcm_nddr.nn.deploy import (
    BatchedBackbone,
    BatchedMultiTaskNet,
    BatchedNDDR,
    BatchedVGG,
    CentredResponse,
    DeployBackbone,
    FoldedVGG,
    deploy,
)
from rcm_nddr.nn.folding import VGG_CONVS, fold_conv, shared_response, stem_weights
from rcm_nddr.nn.heads import DeepLabV3Head, DeepLabV3PlusHead
from rcm_nddr.nn.multitask import MultiTaskNet
from rcm_nddr.nn.nddr import NDDRFusion
from rcm_nddr.nn.rc import RCConv2d, RCResNet
from rcm_nddr.nn.rc_vgg import RCVGG
from rcm_nddr.registry import TASKS
from rcm_nddr.task import DatasetInfo

TASK_NAMES = ("depth", "normals")


def make_tasks(names=TASK_NAMES) -> dict:
    return {name: TASKS.get(name)(name, DatasetInfo("synthetic")) for name in names}


def v3plus_heads(backbone: nn.Module, tasks: dict) -> dict[str, nn.Module]:
    channels, stride = backbone.stage_channels, backbone.output_stride
    return {
        name: DeepLabV3PlusHead(channels["layer4"], channels["layer1"], task.out_channels, 8, stride)
        for name, task in tasks.items()
    }


@torch.no_grad()
def randomize_batchnorm(module: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine parameters of every BatchNorm drawn at random (each task's copies
    differently), so no fold is close to the identity."""
    g = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            c = bn.num_features
            bn.running_mean.copy_(0.2 * torch.randn(c, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
            bn.weight.copy_(0.5 + torch.rand(c, generator=g))
            bn.bias.copy_(0.2 * torch.randn(c, generator=g))


def images(size=(2, 3, 32, 32)) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(11))


def assert_deploys(model: MultiTaskNet, x: torch.Tensor, **options) -> MultiTaskNet:
    """``deploy(model, **options)`` gives the training form's outputs (eval mode), holds no BatchNorm and
    nothing that requires a gradient; returns it."""
    model.eval()
    folded = deploy(model, **options)
    with torch.no_grad():
        assert_close(model(x, raw=True), folded(x, raw=True))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters())
    return folded


# ----------------------------------------------------------------------------- residual adapters


#: (kernel, stride, padding, dilation): block convs, strided and dilated ones, the 7x7 stem, and convs
#: whose window centres lie in the padding (a 1x1 or 3x3 conv padded beyond 'same')
GEOMETRIES = [(3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (7, 2, 3, 1), (1, 2, 0, 1), (1, 1, 1, 1), (3, 1, 2, 1)]


@pytest.mark.parametrize("conv_type", [SeriesAdapterConv2d, ParallelAdapterConv2d])
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), GEOMETRIES)
def test_an_adapter_conv_folds_into_one_conv_and_into_a_shared_response(conv_type, kernel, stride, padding, dilation):
    torch.manual_seed(0)
    pretrained = nn.Conv2d(8, 12, kernel, stride, padding, dilation, bias=False)
    conv: AdapterConv2d = conv_type.from_conv(pretrained, ["a", "b"], adapter_init="default")
    randomize_batchnorm(conv)
    conv.eval()
    x = torch.randn(2, 8, 13, 15)  # odd sizes: the strided centres must line up with the windows
    with torch.no_grad():
        expected = {t: conv(x, t) for t in ("a", "b")}
        folded = {t: fold_conv(conv, t, None)(x) for t in ("a", "b")}
        response = shared_response(conv)(x)
        on_response = {t: F.conv2d(response, *stem_weights(conv, t)) for t in ("a", "b")}
    assert_close(expected, folded)
    assert_close(expected, on_response)
    assert not torch.allclose(expected["a"], F.conv2d(x, conv.filter_bank, None, stride, padding, dilation))
    assert isinstance(shared_response(conv), CentredResponse) == (conv_type is ParallelAdapterConv2d)


@pytest.mark.parametrize("mode", ["series", "parallel"])
def test_residual_adapter_networks_deploy_with_and_without_the_shared_stem_and_batched(mode):
    torch.manual_seed(0)
    plain = resnet_backbone("resnet18", weights="none")
    backbone = RAResNet(plain, list(TASK_NAMES), mode, adapter_init="default")
    tasks = make_tasks()
    model = MultiTaskNet(tasks, backbone, v3plus_heads(backbone, tasks))
    randomize_batchnorm(model)
    x = images()

    shared = assert_deploys(model, x)  # two tasks: the stem's shared response by default
    assert isinstance(shared.backbone, DeployBackbone) and shared.backbone.shares_stem
    stem = shared.backbone.paths["depth"].stem
    assert stem.kernel_size == (1, 1) and stem.in_channels == 64 + (3 if mode == "parallel" else 0)
    assert isinstance(shared.backbone.stem_bank, CentredResponse if mode == "parallel" else nn.Conv2d)

    separate = assert_deploys(model, x, shared_stem=False)
    assert separate.backbone.stem_bank is None
    assert separate.backbone.paths["depth"].stem.kernel_size == (7, 7)

    for shared_stem in (True, False):
        batched = assert_deploys(model, x, batched=True, shared_stem=shared_stem)
        assert isinstance(batched, BatchedMultiTaskNet) and isinstance(batched.backbone, BatchedBackbone)
        convs = [m for m in batched.backbone.stages.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(m.groups == 2 for m in convs)
        with torch.no_grad():
            assert_close({"normals": model(x, raw=True)["normals"]}, batched(x, tasks=["normals"], raw=True))


# ----------------------------------------------------------------------------- VGG-16


def vgg_with_biases(seed: int = 0):
    """A plain VGG-16 DeepLab-LargeFOV with random non-zero biases (its initialization zeroes them)."""
    torch.manual_seed(seed)
    net = plain_backbone("vgg16")
    with torch.no_grad():
        for name in VGG_CONVS:
            getattr(net, name).bias.normal_(0.0, 0.1)
    return net


def test_rc_vgg_deploys_with_its_modulators_folded_into_the_bank_and_its_biases():
    # VGG is big: one task, batch 1, 32x32
    backbone = RCVGG(vgg_with_biases(), ["depth"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in VGG_CONVS:
            conv: RCConv2d = getattr(backbone, name)
            assert conv.filter_bank_bias is not None and conv.filter_bank_bias.abs().max() > 0
            conv.modulators["depth"].weight.copy_(random_orthogonal(conv.out_channels, g)[:, :, None, None])
    tasks = make_tasks(["depth"])
    model = MultiTaskNet(tasks, backbone, v3plus_heads(backbone, tasks))
    randomize_batchnorm(model)
    x = images((1, 3, 32, 32))

    folded = assert_deploys(model, x)  # one task: its whole conv1_1 folded, no shared response
    path = folded.backbone.paths["depth"]
    assert isinstance(path, FoldedVGG) and folded.backbone.stem_bank is None
    assert path.conv1_1.kernel_size == (3, 3) and all(getattr(path, n).bias is not None for n in VGG_CONVS)

    batched = assert_deploys(model, x, shared_stem=True, batched=True)
    assert isinstance(batched.backbone, BatchedVGG) and batched.backbone.stem_bank is not None
    assert batched.backbone.conv1_1.kernel_size == (1, 1)  # the modulator on the bank response (with b_s)


def test_plain_vgg_deploys_per_task_and_shared():
    net = vgg_with_biases(seed=2)
    tasks = make_tasks(["normals"])
    x = images((1, 3, 32, 32))
    for backbone in (TaskBackbones({"normals": net}), SharedBackbone(net)):
        model = MultiTaskNet(tasks, backbone, v3plus_heads(backbone, tasks))
        randomize_batchnorm(model, seed=3)
        folded = assert_deploys(model, x, batched=True)
        if isinstance(backbone, TaskBackbones):
            assert isinstance(folded.backbone, BatchedVGG)
        else:  # one network: nothing to batch
            assert isinstance(folded.backbone, SharedBackbone) and isinstance(folded.backbone.net, FoldedVGG)


# ----------------------------------------------------------------------------- fusion and heads


def rc_model(fusion_for, head_for=None) -> MultiTaskNet:
    """Two RC tasks (PyTorch's default modulators), ``normals`` reading ``depth`` through ``fusion_for``."""
    torch.manual_seed(0)
    backbone = RCResNet(resnet_backbone("resnet18", weights="none"), list(TASK_NAMES))
    tasks = make_tasks()
    heads = v3plus_heads(backbone, tasks) if head_for is None else head_for(backbone, tasks)
    model = MultiTaskNet(tasks, backbone, heads, fusion_for(backbone.stage_channels))
    randomize_batchnorm(model)
    return model


def test_nddr_layers_without_batchnorm_deploy_and_batch():
    sources = {"depth": ["depth"], "normals": ["normals", "depth"]}
    model = rc_model(
        lambda channels: NDDRFusion(sources, channels, ["stem", "layer2", "layer4"], init="xavier", bn=False)
    )
    x = images()
    folded = assert_deploys(model, x)
    assert all(isinstance(layer.bn, nn.Identity) for layer in folded.fusion["normals"].values())
    batched = assert_deploys(model, x, batched=True)
    assert isinstance(batched.fusion, BatchedNDDR) and set(batched.fusion.convs) == {"stem", "layer2", "layer4"}


def test_cross_stitch_fusion_deploys_as_it_is_and_runs_on_the_stack():
    sources = {"depth": ["depth", "normals"], "normals": ["normals", "depth"]}
    model = rc_model(lambda channels: CrossStitchFusion(sources, channels, ["layer1", "layer3"]))
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.uniform_(-1.0, 1.0)
    x = images()
    folded = assert_deploys(model, x)
    assert isinstance(folded.fusion, CrossStitchFusion)
    batched = assert_deploys(model, x, batched=True)
    assert isinstance(batched.fusion, StackedFusion)
    with torch.no_grad():
        assert_close({"depth": model(x, raw=True)["depth"]}, batched(x, tasks=["depth"], raw=True))


def test_the_deeplabv3_head_deploys_with_its_conv_batchnorm_pairs_folded():
    def heads(backbone, tasks):
        channels, stride = backbone.stage_channels["layer4"], backbone.output_stride
        return {
            "depth": DeepLabV3Head(channels, tasks["depth"].out_channels, 8, stride, dropout=0.0),
            "normals": DeepLabV3Head(channels, tasks["normals"].out_channels, 8, stride, init="normal"),
        }

    model = rc_model(lambda channels: None, heads)
    x = images()
    assert_deploys(model, x)
    assert_deploys(model, x, batched=True)
    torch.manual_seed(0)
    plain = TaskBackbones({t: resnet_backbone("resnet18", weights="none") for t in TASK_NAMES})
    model = MultiTaskNet(make_tasks(), plain, heads(plain, make_tasks()))
    randomize_batchnorm(model)
    assert_deploys(model, x, batched=True)


def test_the_batched_form_refuses_a_fusion_it_cannot_run_on_a_stack():
    with pytest.raises(TypeError, match="batched deploy form runs stage fusions .* not Identity"):
        stack_fusion(nn.Identity(), ["depth"])
