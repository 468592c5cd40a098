"""ResNet stages, weight sources, DeepLabv3+ head and MultiTaskNet."""

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import resnet18, resnet50

from rcm_nddr.nn.backbone import STAGES, WeightsError, once_per_input, resnet_backbone, torchvision_weights_path
from rcm_nddr.nn.heads import DeepLabV3PlusHead


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_stage_shapes(arch, output_stride):
    backbone = resnet_backbone(arch, output_stride=output_stride).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 96))
    assert list(features) == list(STAGES)
    for stage, x in features.items():
        assert x.shape[1] == backbone.stage_channels[stage]
        stride = backbone.stage_strides[stage]
        assert x.shape[-2:] == (64 // stride, 96 // stride), stage
    expansion = 4 if arch == "resnet50" else 1
    assert backbone.stage_channels["layer4"] == 512 * expansion


def test_state_dict_file_matches_torchvision(tmp_path):
    torch.manual_seed(0)
    reference = resnet18().eval()
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    backbone = resnet_backbone("resnet18", weights=str(path), output_stride=32).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.layer4(
            reference.layer3(
                reference.layer2(reference.layer1(reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))
            )
        )
        assert torch.equal(backbone(x)["layer4"], expected)
    # the same weights as safetensors, and keys identical to torchvision's (minus fc)
    st = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(st))
    again = resnet_backbone("resnet18", weights=str(st))
    assert set(again.state_dict()) == {k for k in reference.state_dict() if not k.startswith("fc.")}


def test_wrong_or_missing_weights_are_clear_errors(tmp_path, monkeypatch):
    path = tmp_path / "r50.pth"
    torch.save(resnet50().state_dict(), path)
    with pytest.raises(WeightsError, match=r"do not fit this ResNet"):
        resnet_backbone("resnet18", weights=str(path))
    with pytest.raises(WeightsError, match=r"does not exist"):
        resnet_backbone("resnet18", weights=str(tmp_path / "absent.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"could not be read"):
        resnet_backbone("resnet18", weights=str(junk))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = torchvision_weights_path("resnet18")
    assert str(expected).startswith(str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match=r"nothing is downloaded") as info:
        resnet_backbone("resnet18", weights="torchvision")
    assert str(expected) in str(info.value) and "https://download.pytorch.org" in str(info.value)


def test_torchvision_weights_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = torchvision_weights_path("resnet18")
    cached.parent.mkdir(parents=True)
    torch.manual_seed(1)
    reference = resnet18()
    torch.save(reference.state_dict(), cached)
    backbone = resnet_backbone("resnet18", weights="torchvision")
    assert torch.equal(backbone.conv1.weight, reference.conv1.weight)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_deeplab_head_output_size(output_stride):
    head = DeepLabV3PlusHead(
        high_channels=512, low_channels=64, out_channels=5, channels=32, output_stride=output_stride
    )
    high = torch.randn(2, 512, 64 // output_stride, 80 // output_stride)
    out = head(high, torch.randn(2, 64, 16, 20), (64, 80))
    assert out.shape == (2, 5, 64, 80)
    rates = [m.dilation[0] for m in head.aspp.modules() if isinstance(m, torch.nn.Conv2d) and m.dilation[0] > 1]
    assert rates == ([6, 12, 18] if output_stride == 16 else [12, 24, 36])


def test_once_per_input_shares_a_computation_between_the_tasks_reading_one_tensor():
    x, y = torch.randn(1, 2), torch.randn(1, 2)
    calls = []

    def shared(t):
        calls.append(t)
        return t * 2

    out = once_per_input({"a": x, "b": x, "c": y}, shared)
    assert len(calls) == 2 and out["a"] is out["b"] and torch.equal(out["c"], y * 2)
    finished = once_per_input({"a": x, "b": x}, shared, lambda r, task: r + (task == "b"))
    assert torch.equal(finished["a"], x * 2) and torch.equal(finished["b"], x * 2 + 1) and len(calls) == 3
