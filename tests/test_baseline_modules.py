"""The baseline modules: residual adapters (series and parallel), cross-stitch fusion, the NDDR ablation
options (xavier init, no BatchNorm) and the head options (ASPP dropout, normal init, DeepLabv3)."""

import pytest
import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from rcm_nddr.nn.accounting import owned_by, parameter_breakdown, task_state
from rcm_nddr.nn.adapters import ParallelAdapterConv2d, RAResNet, SeriesAdapterConv2d
from rcm_nddr.nn.backbone import STAGES, resnet_backbone
from rcm_nddr.nn.cross_stitch import CrossStitchFusion, CrossStitchUnit
from rcm_nddr.nn.filter_bank import bank_weights, filter_bank_sha256, reparameterized_convs
from rcm_nddr.nn.heads import DeepLabV3Head, DeepLabV3PlusHead
from rcm_nddr.nn.nddr import NDDRFusion, NDDRLayer


def plain_network(arch: str = "resnet18", output_stride: int = 16, seed: int = 0):
    """A randomly initialized plain backbone with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    net = resnet_backbone(arch, weights="none", output_stride=output_stride).train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(2, 3, 32, 32))
    return net.eval()


def stage_outputs(backbone, x, task=None):
    """Every stage's output: of a plain backbone, or of ``task`` on a per-task backbone."""
    out, features = {}, {task: x}
    for stage in STAGES:
        if task is None:
            x = out[stage] = backbone.forward_stage(x, stage)
        else:
            features = backbone.forward_stage(features, stage)
            out[stage] = features[task]
    return out


# --- residual adapters -------------------------------------------------------------------------------

MODES = ["series", "parallel"]


@pytest.mark.parametrize(
    ("arch", "output_stride", "mode"),
    [
        ("resnet18", 16, "series"),
        ("resnet18", 16, "parallel"),
        ("resnet18", 8, "parallel"),
        ("resnet50", 16, "parallel"),
    ],
)
def test_zero_adapters_start_exactly_at_the_plain_network(arch, output_stride, mode):
    # Bitwise, not merely close: the shared conv is the same F.conv2d call on the same weight as the plain
    # conv, and a zero adapter adds exactly 0 (series: y + 0 * BN(y); parallel: y + 0 * x).
    plain = plain_network(arch, output_stride)
    ra = RAResNet(plain, ["a", "b"], mode).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = stage_outputs(plain, x)
        for task in ("a", "b"):
            got = stage_outputs(ra, x, task)
            for stage in STAGES:
                assert torch.equal(got[stage], expected[stage]), (task, stage)


@pytest.mark.parametrize("mode", MODES)
def test_default_initialized_adapters_change_the_network(mode):
    plain = plain_network()
    ra = RAResNet(plain, ["a"], mode, adapter_init="default").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected, got = stage_outputs(plain, x), stage_outputs(ra, x, "a")
    for stage in STAGES:
        assert not torch.allclose(got[stage], expected[stage], atol=1e-3), stage


@pytest.mark.parametrize("mode", MODES)
def test_the_shared_convs_are_the_frozen_pretrained_bank(mode):
    plain = plain_network()
    ra = RAResNet(plain, ["a", "b"], mode).train()
    bank = ra.filter_bank()
    assert list(bank) == reparameterized_convs(plain)
    assert filter_bank_sha256(bank) == filter_bank_sha256(bank_weights(plain))
    assert not any(name.endswith("filter_bank") for name, _ in ra.named_parameters())
    assert {n for n, _ in ra.named_buffers() if n.endswith("filter_bank")} == {f"{n}.filter_bank" for n in bank}
    before = {name: w.clone() for name, w in bank.items()}
    features = {"a": torch.randn(2, 3, 32, 32)}
    for stage in STAGES:
        features = ra.forward_stage(features, stage)
    features["a"].square().mean().backward()
    for name, w in ra.filter_bank().items():
        assert not w.requires_grad and w.grad is None and torch.equal(w, before[name]), name
    # a store's bank loads bit for bit; one that does not fit is refused
    ra.load_filter_bank({k: v + 1 for k, v in before.items()})
    assert all(torch.equal(ra.filter_bank()[k], v + 1) for k, v in before.items())
    with pytest.raises(ValueError, match="missing"):
        ra.load_filter_bank({k: v for k, v in before.items() if k != "conv1"})


@pytest.mark.parametrize("mode", MODES)
def test_a_training_step_reaches_the_trained_task_only(mode):
    plain = plain_network()
    ra = RAResNet(plain, ["a", "b"], mode).train()
    features = {"a": torch.randn(2, 3, 32, 32)}
    for stage in STAGES:
        features = ra.forward_stage(features, stage)
    features["a"].square().mean().backward()
    names = [name for name, _ in ra.named_parameters()]
    assert all(owned_by(n, "a") != owned_by(n, "b") for n in names)  # every parameter is one task's
    for name, p in ra.named_parameters():
        if owned_by(name, "b"):
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
    adapters = [n for n in names if ".adapters.a." in f".{n}."]
    per_task = [n for n in names if ".per_task.a." in f".{n}."]
    assert adapters and any(".downsample." in n for n in per_task) and any(".bn1." in n for n in per_task)
    # the zero adapter convs get a gradient that moves them (their BatchNorm's is 0 while they are 0)
    convs = dict(ra.named_parameters())
    adapter_convs = [n for n in adapters if n.endswith("weight") and convs[n].dim() == 4]
    assert adapter_convs and all(convs[n].grad.abs().sum() > 0 for n in adapter_convs)


def test_per_task_parameter_counts_follow_the_formula():
    # Per shared conv (Ci -> Co): series adapter Co*Co (1x1 conv) + 2*Co (its BatchNorm); parallel
    # adapter Ci*Co (1x1 conv). Both: the task's BatchNorm after the conv, 2*Co, and the task's copy of
    # every downsample (1x1 conv + BatchNorm).
    plain = plain_network()
    modules = dict(plain.named_modules())
    shapes = [modules[name].weight.shape[:2] for name in reparameterized_convs(plain)]
    downsample = sum(p.numel() for n, p in plain.named_parameters() if ".downsample." in n)
    series = sum(co * co + 2 * co for co, _ in shapes)
    parallel = sum(ci * co for co, ci in shapes)
    batchnorm = sum(2 * co for co, _ in shapes)
    assert (series, parallel, batchnorm, downsample) == (1_404_544, 1_220_800, 7_808, 173_824)  # resnet18
    for mode, adapters in (("series", series), ("parallel", parallel)):
        model = nn.ModuleDict({"backbone": RAResNet(plain, ["a", "b"], mode)})
        for task in ("a", "b"):
            counts = parameter_breakdown(model, task)
            assert counts["adapters"] == adapters and counts["modulators"] == 0
            assert counts["batchnorm"] == batchnorm and counts["downsample"] == downsample
            assert counts["total"] == adapters + batchnorm + downsample
            assert counts["filter_bank"] == sum(w.numel() for w in bank_weights(plain).values())
    # the adapter's BatchNorm statistics are stored with the task
    state = task_state(nn.ModuleDict({"backbone": RAResNet(plain, ["a"], "series")}), "a")
    assert "backbone.conv1.adapters.a.bn.running_var" in state and "backbone.conv1.filter_bank" not in state


@pytest.mark.parametrize("mode", MODES)
def test_an_added_task_starts_where_the_first_task_started(mode):
    plain = plain_network()
    ra = RAResNet(plain, ["a"], mode).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        first = stage_outputs(ra, x, "a")
        ra.add_task("b")
        added = stage_outputs(ra, x, "b")
        for stage in STAGES:
            assert torch.equal(added[stage], first[stage]), stage
        # a later task starts from the pretrained modules, not from an earlier task's trained ones
        for name, p in ra.named_parameters():
            if owned_by(name, "a"):
                p.add_(0.01)
        ra.add_task("c")
        assert torch.equal(stage_outputs(ra, x, "c")["layer4"], first["layer4"])
        assert not torch.equal(stage_outputs(ra, x, "a")["layer4"], first["layer4"])
    assert ra.tasks == ["a", "b", "c"]
    with pytest.raises(ValueError, match="already"):
        ra.add_task("b")


@pytest.mark.parametrize("mode", MODES)
def test_the_shared_stem_computes_what_each_task_computes_alone(mode):
    ra = RAResNet(plain_network(), ["a", "b"], mode, adapter_init="default").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        shared = ra.forward_stage({"a": x, "b": x}, "stem")  # one bank response for both tasks
        for task in ("a", "b"):
            assert torch.equal(shared[task], ra.forward_task_stage(x, "stem", task))
            conv = ra.conv1
            assert torch.equal(conv(x, task), conv.finish(conv.shared(x), task))


def test_a_parallel_adapter_is_a_strided_1x1_conv_on_the_window_centres():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 9, 11)
    for conv in (
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
        nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.Conv2d(4, 6, 3, stride=2, padding=3, bias=False),  # padding beyond the centre: 1x1 padding 2
        nn.Conv2d(4, 6, 7, stride=2, padding=3, bias=False),  # the stem's geometry
    ):
        ra = ParallelAdapterConv2d.from_conv(conv, ["a"], adapter_init="default")
        adapter = ra.adapters["a"].weight
        centre = conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) // 2
        expected = conv(x) + nn.functional.conv2d(x, adapter, stride=2, padding=centre)
        torch.testing.assert_close(ra(x, "a"), expected, rtol=1e-5, atol=1e-6)  # other summation order
    with pytest.raises(ValueError, match="centre"):
        ParallelAdapterConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=0, bias=False), ["a"])
    with pytest.raises(ValueError, match="adapter init"):
        SeriesAdapterConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1, bias=False), ["a"], adapter_init="ones")


def test_series_adapter_is_y_plus_a_of_bn_of_y():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    ra = SeriesAdapterConv2d.from_conv(conv, ["a"], adapter_init="default").eval()
    adapter = ra.adapters["a"]
    x = torch.randn(2, 4, 5, 5)
    y = conv(x)
    torch.testing.assert_close(ra(x, "a"), y + adapter.conv(adapter.bn(y)))
    assert adapter.conv.weight.shape == (6, 6, 1, 1) and adapter.conv.bias is None


# --- cross-stitch ------------------------------------------------------------------------------------


def test_cross_stitch_starts_as_alpha_own_plus_beta_others_per_channel():
    torch.manual_seed(0)
    a, b, c = (torch.randn(2, 4, 3, 5) for _ in range(3))
    torch.testing.assert_close(CrossStitchUnit(4, 2)([b, a]), 0.9 * b + 0.1 * a)
    torch.testing.assert_close(CrossStitchUnit(4, 3)([c, a, b]), 0.9 * c + 0.05 * a + 0.05 * b)
    torch.testing.assert_close(CrossStitchUnit(4, 3, alpha=0.6, beta=0.3)([c, a, b]), 0.6 * c + 0.3 * a + 0.3 * b)
    assert torch.equal(CrossStitchUnit(4, 1)([a]), 0.9 * a)
    unit = CrossStitchUnit(4, 2)
    with torch.no_grad():
        unit.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]]))
    out = unit([b, a])
    for ch in range(4):
        w_own, w_other = unit.weight[:, ch].tolist()
        torch.testing.assert_close(out[:, ch], w_own * b[:, ch] + w_other * a[:, ch])
    with pytest.raises(ValueError, match="expects 2 source"):
        unit([a])


def test_cross_stitch_fusion_is_one_way_and_learns():
    torch.manual_seed(0)
    fusion = CrossStitchFusion({"b": ["b", "a"]}, {"stem": 4, "layer1": 4}, ["layer1"])
    a, b = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 4, 3, 3)
    assert set(fusion) == {"b"} and set(fusion["b"]) == {"layer1"}
    assert list(fusion.state_dict()) == ["b.layer1.weight"] and not fusion.has_shortcut("b")
    out = fusion("layer1", {"a": a, "b": b})
    assert out["a"] is a  # a source-only task passes through unchanged
    torch.testing.assert_close(out["b"], 0.9 * b + 0.1 * a)
    assert fusion("stem", {"a": a, "b": b})["b"] is b  # not a fusion stage
    assert fusion.required(["b"]) == ["b", "a"] and fusion.required(["a"]) == ["a"]
    with pytest.raises(KeyError, match=r"cross-stitch fusion of task 'b'.*\['a'\]"):
        fusion("layer1", {"b": b})
    out["b"].sum().backward()
    weight = fusion["b"]["layer1"].weight
    torch.testing.assert_close(weight.grad, torch.stack([b.sum((0, 2, 3)), a.detach().sum((0, 2, 3))]))
    torch.testing.assert_close(a.grad, torch.full_like(a, 0.1))  # and the source's features get one too
    assert owned_by("fusion.b.layer1.weight", "b")
    model = nn.ModuleDict({"fusion": fusion})
    assert parameter_breakdown(model, "b")["fusion"] == 8 and parameter_breakdown(model, "a")["total"] == 0
    for task, sources, stages, message in (
        ("b", ["b", "a"], ["layer1"], "already has cross-stitch"),
        ("c", ["a"], ["stem"], "start with the task itself"),
        ("c", ["c"], ["layer9"], "not stages"),
        ("c", ["c"], [], "at least one stage"),
    ):
        with pytest.raises(ValueError, match=message):
            fusion.add_task(task, sources, stages)


# --- NDDR ablation options ---------------------------------------------------------------------------


def test_nddr_defaults_keep_their_state_dict_and_values():
    layer = NDDRLayer(4, 2)
    keys = ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert list(layer.state_dict()) == keys
    assert list(NDDRLayer(4, 2, init="xavier").state_dict()) == keys
    eye = torch.eye(4)
    assert torch.equal(layer.conv.weight[:, :, 0, 0], torch.cat([0.9 * eye, 0.1 * eye], dim=1))
    fusion = NDDRFusion({"b": ["b", "a"]}, {"layer1": 4, "layer2": 8}, ["layer1", "layer2"], shortcut=True)
    assert list(fusion.state_dict()) == (
        [f"b.layer1.{k}" for k in keys]
        + [f"b.layer2.{k}" for k in keys]
        + [f"b.shortcut.{k}" for k in ("conv.weight", *keys[1:])]
    )
    assert fusion.has_shortcut("b") and not fusion.has_shortcut("a")


def test_nddr_xavier_init_and_no_batchnorm():
    torch.manual_seed(0)
    constant, xavier = NDDRLayer(16, 2), NDDRLayer(16, 2, init="xavier")
    assert not torch.equal(constant.conv.weight, xavier.conv.weight)
    bound = (6 / (32 + 16)) ** 0.5  # xavier_uniform_: fan_in 32, fan_out 16
    assert xavier.conv.weight.abs().max() <= bound and xavier.conv.weight.std() > bound / 3
    plain = NDDRLayer(4, 2, bn=False)
    assert isinstance(plain.bn, nn.Identity) and list(plain.state_dict()) == ["conv.weight"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    x, y = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(plain([x, y]), torch.relu(0.9 * x + 0.1 * y))
    with pytest.raises(ValueError, match="NDDR init"):
        NDDRLayer(4, 2, init="orthogonal")
    fusion = NDDRFusion({}, {"layer1": 4}, [])
    fusion.add_task("b", ["b", "a"], ["layer1"], init="xavier", bn=False)
    assert isinstance(fusion["b"]["layer1"].bn, nn.Identity) and list(fusion.state_dict()) == ["b.layer1.conv.weight"]


# --- heads -------------------------------------------------------------------------------------------


def dropouts(head: nn.Module) -> list[float]:
    return [m.p for m in head.modules() if isinstance(m, nn.Dropout)]


def conv_weights_look_normal_001(head: nn.Module) -> bool:
    """Every conv weight of at least 1000 entries has mean ~0 and std within 10% of 0.01."""
    weights = [m.weight for m in head.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() >= 1000]
    return bool(weights) and all(abs(w.std() - 0.01) < 1e-3 and abs(w.mean()) < 1e-3 for w in weights)


def test_deeplabv3plus_head_defaults_and_state_dict_are_unchanged():
    torch.manual_seed(0)
    head = DeepLabV3PlusHead(512, 64, 5)
    torch.manual_seed(0)
    aspp = ASPP(512, (6, 12, 18), 256)  # built first, from the same random stream: the same weights
    assert all(torch.equal(v, aspp.state_dict()[k]) for k, v in head.aspp.state_dict().items())
    assert dropouts(head) == [0.5]
    keys = list(head.state_dict())
    for options in ({"dropout": 0.0}, {"dropout": 0.1}, {"init": "normal"}):
        assert list(DeepLabV3PlusHead(512, 64, 5, **options).state_dict()) == keys, options
    assert {"aspp.convs.0.0.weight", "aspp.project.0.weight", "reduce.0.weight", "fuse.1.0.weight"} <= set(keys)


@pytest.mark.parametrize("head_type", ["v3plus", "v3"])
def test_head_dropout_and_normal_init(head_type):
    def build(**options):
        if head_type == "v3":
            return DeepLabV3Head(512, 5, **options)
        return DeepLabV3PlusHead(512, 64, 5, **options)

    assert dropouts(build(dropout=0.0)) == [] and dropouts(build(dropout=0.1)) == [0.1]
    torch.manual_seed(0)
    normal, default = build(init="normal"), build()
    assert conv_weights_look_normal_001(normal) and not conv_weights_look_normal_001(default)
    for m in normal.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    assert torch.equal(normal.predict.bias, torch.zeros(5))
    with pytest.raises(ValueError, match="dropout"):
        build(dropout=1.0)
    with pytest.raises(ValueError, match="head init"):
        build(init="kaiming")


def test_deeplabv3_head_reads_only_the_last_stage():
    torch.manual_seed(0)
    head = DeepLabV3Head(32, 3, channels=16, output_stride=8).eval()
    high = torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        out = head(high, None, (32, 32))
        assert out.shape == (1, 3, 32, 32)
        assert torch.equal(head(high, torch.randn(1, 8, 8, 8), (32, 32)), out)
    assert not any(k.startswith(("reduce.", "fuse.")) for k in head.state_dict())
