"""The plain backbones, cut into stages (stem, layer1..layer4) so fusion modules can sit between them:
ResNets on torchvision's definitions, with dilation for output stride 8 or 16, and VGG-16
DeepLab-LargeFOV (``rcm_nddr.nn.vgg``); ``plain_backbone(arch, weights, output_stride)`` builds any of them.

ResNet module names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1`` ...), so a torchvision state
dict (without ``fc``) loads as is and a trained backbone saves as one."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum
from torchvision.models import resnet as tv_resnet
from torchvision.models import vgg as tv_vgg

from rcm_nddr.nn.vgg import NEW_LAYERS, VGGBackbone, from_torchvision_names
from rcm_nddr.nn.weights import RCForm, WeightsError, load_state_dict_file, read_rc_form

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4")

_ARCHS: dict[str, tuple[Callable[..., tv_resnet.ResNet], WeightsEnum]] = {
    "resnet18": (tv_resnet.resnet18, tv_resnet.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tv_resnet.resnet34, tv_resnet.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tv_resnet.resnet50, tv_resnet.ResNet50_Weights.IMAGENET1K_V2),
    "resnet101": (tv_resnet.resnet101, tv_resnet.ResNet101_Weights.IMAGENET1K_V2),
    "resnet152": (tv_resnet.resnet152, tv_resnet.ResNet152_Weights.IMAGENET1K_V2),
}
#: the VGG backbones: the ImageNet weights their conv1_1 ... conv5_3 start from
_VGGS: dict[str, WeightsEnum] = {"vgg16": tv_vgg.VGG16_Weights.IMAGENET1K_V1}


class ResNetBackbone(nn.Module):
    """A ResNet without its classifier, exposing ``forward_stage(x, stage)``.

    ``stage_channels[s]`` is the channel count after stage ``s``; ``stage_strides[s]`` its stride.
    """

    def __init__(self, net: tv_resnet.ResNet, output_stride: int = 16) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        # Dilate instead of striding in the last stage(s): layer4 for OS 16, layer3 and layer4 for OS 8.
        if output_stride <= 16:
            _dilate(self.layer4, 2 if output_stride == 16 else 4)
        if output_stride == 8:
            _dilate(self.layer3, 2)
        self.output_stride = output_stride
        expansion = net.layer1[0].expansion
        widths = {"stem": 64, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
        self.stage_channels = {s: w * (expansion if s != "stem" else 1) for s, w in widths.items()}
        self.stage_strides = {
            "stem": 4,
            "layer1": 4,
            "layer2": 8,
            "layer3": min(16, output_stride),
            "layer4": output_stride,
        }

    def stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_stage(self, x: Tensor, stage: str) -> Tensor:
        if stage == "stem":
            return self.stem(x)
        if stage not in STAGES:
            raise KeyError(f"unknown stage {stage!r}; stages: {STAGES}")
        return getattr(self, stage)(x)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = {}
        for stage in STAGES:
            x = self.forward_stage(x, stage)
            features[stage] = x
        return features


def once_per_input(
    features: Mapping[str, Tensor],
    shared: Callable[[Tensor], Tensor],
    per_task: Callable[[Tensor, str], Tensor] | None = None,
) -> dict[str, Tensor]:
    """``{task: per_task(shared(x), task)}`` for ``features = {task: x}``, with ``shared(x)`` computed once
    per distinct input tensor (tasks reading the same image share it); without ``per_task`` every task
    gets the shared result itself. The one place where tasks share a computation on their input."""
    done: dict[int, Tensor] = {}
    out = {}
    for task, x in features.items():
        if id(x) not in done:
            done[id(x)] = shared(x)
        out[task] = done[id(x)] if per_task is None else per_task(done[id(x)], task)
    return out


class PerTaskBackbone(nn.Module):
    """Base of the multi-task backbones with one path per task: ``forward_stage({task: x}, stage)`` runs
    each task's ``forward_task_stage(x, stage, task)``.

    A subclass whose stem starts with a task-independent conv (the RC filter bank) sets ``shares_stem``
    and splits its stem into ``stem_response(x)``, computed once per distinct input, and
    ``finish_stem(response, task)``; ``forward_task_stage(x, "stem", task)`` must compute the same as
    ``finish_stem(stem_response(x), task)``.

    ``routes`` maps a task to the task whose path it runs on (hard parameter sharing: the tasks of a group
    share the path of its first task, and have none of their own); tasks on one path reading one input
    are computed once."""

    stage_channels: dict[str, int]
    stage_strides: dict[str, int]
    output_stride: int
    shares_stem: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, str] = {}

    def path_of(self, task: str) -> str:
        """The task whose modules ``task`` runs on: itself, unless it shares another task's path."""
        return self.routes.get(task, task)

    def forward_task_stage(self, x: Tensor, stage: str, task: str) -> Tensor:
        raise NotImplementedError

    def stem_response(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not share its stem")

    def finish_stem(self, response: Tensor, task: str) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not share its stem")

    def forward_stage(self, features: Mapping[str, Tensor], stage: str) -> dict[str, Tensor]:
        shared_stem = stage == "stem" and self.shares_stem
        responses = once_per_input(features, self.stem_response) if shared_stem else {}
        done: dict[tuple[str, int], Tensor] = {}
        out = {}
        for task, x in features.items():
            path = self.path_of(task)
            key = (path, id(x))
            if key not in done:
                if shared_stem:
                    done[key] = self.finish_stem(responses[task], path)
                else:
                    done[key] = self.forward_task_stage(x, stage, path)
            out[task] = done[key]
        return out


class TaskBackbones(PerTaskBackbone):
    """An independent, fully trained ResNet per task (``reparam: none``, the single-task baselines)."""

    def __init__(self, paths: Mapping[str, ResNetBackbone]) -> None:
        super().__init__()
        self.paths = nn.ModuleDict(paths)
        first = next(iter(paths.values()))
        self.stage_channels, self.stage_strides = first.stage_channels, first.stage_strides
        self.output_stride = first.output_stride

    def forward_task_stage(self, x: Tensor, stage: str, task: str) -> Tensor:
        return self.paths[task].forward_stage(x, stage)


class SharedBackbone(nn.Module):
    """One ResNet shared by every task (hard parameter sharing), computed once per input."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.stage_channels, self.stage_strides = net.stage_channels, net.stage_strides
        self.output_stride = net.output_stride

    def forward_stage(self, features: Mapping[str, Tensor], stage: str) -> dict[str, Tensor]:
        return once_per_input(features, lambda x: self.net.forward_stage(x, stage))


def _dilate(layer: nn.Sequential, dilation: int) -> None:
    """Turn a strided stage into a dilated one of the same receptive field growth."""
    for module in layer.modules():
        if isinstance(module, nn.Conv2d):
            if module.stride == (2, 2):
                module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = (dilation, dilation)
                module.padding = (dilation, dilation)


def resnet_backbone(arch: str, weights: str = "none", output_stride: int = 16) -> ResNetBackbone:
    """Build a ResNet backbone. ``weights``: ``none`` (random init), ``torchvision`` (ImageNet weights, which
    must already be in the torch hub cache: nothing is downloaded), or a path to a state dict
    (``.pth``/``.pt`` loaded with ``weights_only=True``, or ``.safetensors``) with torchvision's names."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; known: {', '.join(_ARCHS)}")
    factory, _ = _ARCHS[arch]
    net = factory(weights=None)
    state = _pretrained_state(arch, weights)
    if state is not None:
        given = {k: v for k, v in state.items() if not k.startswith("fc.")}
        expected = {k for k in net.state_dict() if not k.startswith("fc.")}
        _load_into(net, given, expected, _origin(arch, weights), "ResNet")
    return ResNetBackbone(net, output_stride)


def vgg_backbone(arch: str = "vgg16", weights: str = "none", output_stride: int = 8) -> VGGBackbone:
    """Build VGG-16 DeepLab-LargeFOV (output stride 8 only). ``weights`` as for ``resnet_backbone``; a state
    dict may use torchvision's names (``features.N.weight``, its ``classifier.*`` ignored) or this module's
    (``conv1_1.weight`` ... ``fc7.bias``). ``fc6`` and ``fc7`` load when the state dict holds them and keep
    their random initialization otherwise (torchvision's ImageNet weights never hold them)."""
    if arch not in _VGGS:
        raise ValueError(f"unknown VGG arch {arch!r}; known: {', '.join(_VGGS)}")
    net = VGGBackbone(output_stride)
    state = _pretrained_state(arch, weights)
    if state is not None:
        given = from_torchvision_names(state)
        expected = set(net.state_dict())
        for layer in NEW_LAYERS:
            keys = {k for k in expected if k.startswith(f"{layer}.")}
            if not keys & set(given):
                expected -= keys
        _load_into(net, given, expected, _origin(arch, weights), "VGG")
    return net


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    **dict.fromkeys(_ARCHS, resnet_backbone),
    **dict.fromkeys(_VGGS, vgg_backbone),
}
#: every backbone ``plain_backbone`` builds
ARCHS: tuple[str, ...] = tuple(_BUILDERS)
#: the torchvision ImageNet weights of each arch (only the convs of VGG's)
_IMAGENET: dict[str, WeightsEnum] = {**{arch: imagenet for arch, (_, imagenet) in _ARCHS.items()}, **_VGGS}


def plain_backbone(arch: str, weights: str = "none", output_stride: int | None = None) -> ResNetBackbone | VGGBackbone:
    """Build any backbone of ``ARCHS`` (``weights`` as for ``resnet_backbone``); ``output_stride`` None is the
    arch's default: 16 for the ResNets, 8 (its only one) for VGG-16 DeepLab-LargeFOV."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown backbone arch {arch!r}; known: {', '.join(_BUILDERS)}")
    stride = {} if output_stride is None else {"output_stride": output_stride}
    return _BUILDERS[arch](arch, weights, **stride)


def torchvision_weights_path(arch: str) -> Path:
    """Where torchvision keeps the ImageNet checkpoint of ``arch`` (torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(_IMAGENET[arch].url).name


def _pretrained_state(arch: str, weights: str) -> Mapping[str, Tensor] | None:
    """The state dict ``weights`` names for ``arch`` (None for ``none``); for a network pretrained in RC
    form, the plain network it computes."""
    if weights == "none":
        return None
    if weights == "torchvision":
        return _torchvision_state_dict(arch, _IMAGENET[arch])
    state = load_state_dict_file(weights)
    form = read_rc_form(state, weights)
    return state if form is None else form.plain


def rc_form_of(weights: str) -> RCForm | None:
    """The RC-form network ``weights`` holds (``rcm_nddr.nn.weights.read_rc_form``), None for a plain one."""
    if weights in ("none", "torchvision"):
        return None
    return read_rc_form(load_state_dict_file(weights), weights)


def _origin(arch: str, weights: str) -> str:
    return f"torchvision {_IMAGENET[arch]}" if weights == "torchvision" else weights


def _torchvision_state_dict(arch: str, imagenet: WeightsEnum) -> Mapping[str, Tensor]:
    path = torchvision_weights_path(arch)
    if not path.is_file():
        raise WeightsError(
            f"backbone.weights=torchvision: the ImageNet weights of {arch} are not in the local cache "
            f"and nothing is downloaded at run time. Fetch {imagenet.url} to {path} "
            f"(e.g. `curl -L --create-dirs -o {path} {imagenet.url}`), or set backbone.weights to "
            "'none' or to a local state dict."
        )
    return load_state_dict_file(path)


def _load_into(net: nn.Module, state: Mapping[str, Tensor], expected: set[str], origin: str, family: str) -> None:
    """Load ``state`` into ``net``; its keys must be exactly ``expected`` (the keys of ``net`` it sets)."""
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightsError(
            f"weights {origin} do not fit this {family}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise WeightsError(f"weights {origin} do not fit this {family}: {exc}") from exc
    log.info("loaded backbone weights from %s", origin)
