"""Reduced precision for the deploy form (``rcm_nddr.nn.deploy``): ``bf16`` (every weight and activation in
bfloat16) and ``int8`` (PyTorch's post-training static quantization, FX graph mode, x86 engine).

int8 quantizes the network unit by unit, where a unit is a piece of it with one tensor in and one out:
each stage of a task's folded ResNet path (its residual blocks), each child module of a head that holds
weights (ASPP, the low-level reduction, the fusion convs, the prediction conv) and the conv of each NDDR
layer and shortcut. The tasks' control flow (which tasks run, fusion, upsampling, post-processing) stays
in fp32 between units, and so do the stem (the conv that reads the image, and the shared stem response)
and VGG paths. Every unit is calibrated on the calibration images (min/max observers of the x86 default
qconfig: per-channel weights, per-tensor activations), then measured: its output on the fp32 inputs it
receives on the first calibration batch, against its fp32 output. The fallback rules: a unit whose relative
L2 error exceeds ``INT8_UNIT_RTOL`` stays fp32; then, task by task, while the task's output on that batch
differs from fp32 by more than ``INT8_TASK_RTOL``, the int8 unit with the largest error among those the
task runs (its own and its sources') goes back to fp32."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torchvision
from torch import Tensor, nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from rcm_nddr.errors import UserError
from rcm_nddr.nn.folding import DeployBackbone, FoldedPath
from rcm_nddr.nn.multitask import MultiTaskNet
from rcm_nddr.nn.nddr import NDDRLayer, NDDRShortcut

log = logging.getLogger(__name__)

# The quantized kernels int8 runs warn, once per call site, that quantized tensors are deprecated in favour
# of the newer flows; every unit of every int8 network is a call site of its own.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
# ASPP concatenates branches quantized with different parameters; the unit's measured error covers it
warnings.filterwarnings("ignore", message=r"All inputs of this cat operator must share the same quantization")

#: the precisions of the deploy form
PRECISIONS = ("fp32", "bf16", "int8")
#: the quantized engine int8 runs on (x86 CPUs; FBGEMM and oneDNN kernels, AVX2 at least)
INT8_ENGINE = "x86"
#: the fallback rules: a quantized unit whose output differs from fp32 by more than ``INT8_UNIT_RTOL``
#: (relative L2) stays fp32; then, while a task's output differs by more than ``INT8_TASK_RTOL``, the int8
#: unit with the largest error among those the task runs goes back to fp32
INT8_UNIT_RTOL = 0.1
INT8_TASK_RTOL = 0.05
#: CPU flags of the instructions that make bf16 matrix products faster than fp32 (AMX, AVX-512 BF16)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


class PrecisionError(UserError, ValueError):
    """A precision the deploy form cannot be given (unknown, or int8 on a device other than the CPU)."""


@dataclass
class Int8Report:
    """What ``quantize_int8`` did: the relative L2 error of every unit (name -> error), the units kept in
    fp32 by the fallback rules, and each task's output error once they applied."""

    errors: dict[str, float] = field(default_factory=dict)
    fp32_units: list[str] = field(default_factory=list)
    task_errors: dict[str, float] = field(default_factory=dict)

    @property
    def int8_units(self) -> list[str]:
        return [name for name in self.errors if name not in self.fp32_units]


def cpu_flags() -> set[str]:
    """The flags of this machine's CPU (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def int8_unsupported() -> str | None:
    """Why int8 cannot run on this machine (None when it can): PyTorch built without the x86 quantized
    engine, or a CPU without AVX2 (its kernels' minimum)."""
    if INT8_ENGINE not in torch.backends.quantized.supported_engines:
        engines = ", ".join(torch.backends.quantized.supported_engines)
        return f"this PyTorch has no '{INT8_ENGINE}' quantized engine (it has: {engines})"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith(("AVX2", "AVX512")):
        return f"this CPU lacks the AVX2 instructions the int8 kernels need (PyTorch reports {capability})"
    return None


def bf16_is_native() -> bool:
    """Whether this CPU has bf16 matrix instructions (``BF16_CPU_FLAGS``); without them bf16 runs slower than
    fp32 on the CPU (``rcm-nddr bench`` measures it: ``ratios.bf16_vs_fp32_infer``)."""
    return bool(cpu_flags() & set(BF16_CPU_FLAGS))


def _cast_images(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    images, *rest = args
    return (images.to(torch.bfloat16), *rest), kwargs


def to_bf16(model: MultiTaskNet) -> MultiTaskNet:
    """``model`` (changed in place) with every weight in bfloat16 and its input images cast to bfloat16 on
    the way in; the outputs are bfloat16."""
    model.to(torch.bfloat16)
    model.register_forward_pre_hook(_cast_images, with_kwargs=True)
    return model


def int8_units(model: MultiTaskNet) -> list[str]:
    """The names of the modules of a deploy-form ``model`` that int8 quantizes (see the module docstring)."""
    units = []
    if isinstance(model.backbone, DeployBackbone):
        for task, path in model.backbone.paths.items():
            if isinstance(path, FoldedPath):
                units += [f"backbone.paths.{task}.stages.{stage}" for stage in path.stages]
    if model.fusion is not None:
        for name, module in model.fusion.named_modules():
            if isinstance(module, (NDDRLayer, NDDRShortcut)):
                units.append(f"fusion.{name}.conv")
    for task, head in model.heads.items():
        for name, child in head.named_children():
            if any(True for _ in child.parameters()):
                units.append(f"heads.{task}.{name}")
    return units


def _unit_inputs(model: MultiTaskNet, units: list[str], images: Tensor) -> dict[str, Tensor]:
    """The input of each unit when ``model`` runs on ``images``."""
    seen: dict[str, Tensor] = {}
    hooks = []
    for name in units:

        def keep(module: nn.Module, args: tuple, name: str = name) -> None:
            seen.setdefault(name, args[0].detach())

        hooks.append(model.get_submodule(name).register_forward_pre_hook(keep))
    try:
        with torch.no_grad():
            model(images, raw=True)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (L2 over every element; 0 when both are zero)."""
    actual, expected = actual.float(), expected.float()
    norm = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


@torch.no_grad()
def quantize_int8(
    model: MultiTaskNet,
    calibration: Iterable[Tensor],
    unit_rtol: float = INT8_UNIT_RTOL,
    task_rtol: float = INT8_TASK_RTOL,
) -> tuple[MultiTaskNet, Int8Report]:
    """The int8 form of a deploy-form ``model`` (on the CPU; ``model`` is left as it is), calibrated on the
    batches of ImageNet-normalized images ``calibration`` (at least one), and what was done (``Int8Report``).
    See the module docstring for the units and the fallback rule."""
    batches = [b.to("cpu", torch.float32) for b in calibration]
    if not batches:
        raise ValueError("int8 calibration needs at least one batch of images")
    torch.backends.quantized.engine = INT8_ENGINE
    qconfig = get_default_qconfig_mapping(INT8_ENGINE)
    original = model.eval()
    units = int8_units(original)
    inputs = _unit_inputs(original, units, batches[0])
    quantized = copy.deepcopy(original)
    with warnings.catch_warnings():  # the FX flow's deprecation notices, once per unit
        warnings.simplefilter("ignore")
        for name in units:
            unit = _traceable(quantized.get_submodule(name))
            quantized.set_submodule(name, prepare_fx(unit, qconfig, (inputs[name],)))
        for batch in batches:
            quantized(batch, raw=True)
        for name in units:
            quantized.set_submodule(name, convert_fx(quantized.get_submodule(name)))
    report = Int8Report()
    for name in units:
        expected = original.get_submodule(name)(inputs[name])
        report.errors[name] = relative_error(quantized.get_submodule(name)(inputs[name]), expected)
        if report.errors[name] > unit_rtol:  # the unit rule: this unit stays fp32
            quantized.set_submodule(name, copy.deepcopy(original.get_submodule(name)))
            report.fp32_units.append(name)
    _task_rule(original, quantized, report, batches[0], task_rtol)
    if report.fp32_units:
        log.info(
            "int8: %d of %d units stay fp32 (the unit rule at %g, the task rule at %g): %s",
            len(report.fp32_units),
            len(units),
            unit_rtol,
            task_rtol,
            ", ".join(f"{n} ({report.errors[n]:.3f})" for n in report.fp32_units),
        )
    quantized.requires_grad_(False)
    return quantized.eval(), report


def _task_rule(
    original: MultiTaskNet, quantized: MultiTaskNet, report: Int8Report, images: Tensor, task_rtol: float
) -> None:
    """The task rule: while a task's raw output on ``images`` differs from fp32 by more than ``task_rtol``
    (relative L2), the int8 unit with the largest error among those it runs goes back to fp32."""
    expected = original(images, raw=True)
    for task in original.task_names:
        runs = original.fusion.required([task]) if original.fusion is not None else [task]
        mine = [n for n in report.int8_units if any(f".{t}." in f".{n}." for t in runs)]
        report.task_errors[task] = relative_error(quantized(images, tasks=[task], raw=True)[task], expected[task])
        while report.task_errors[task] > task_rtol and mine:
            worst = max(mine, key=report.errors.__getitem__)
            quantized.set_submodule(worst, copy.deepcopy(original.get_submodule(worst)))
            report.fp32_units.append(worst)
            mine.remove(worst)
            output = quantized(images, tasks=[task], raw=True)[task]
            report.task_errors[task] = relative_error(output, expected[task])


def int8_classifier(arch: str, calibration: list[torch.Tensor]) -> dict[str, nn.Module]:
    """``{"classifier_fp32": ..., "classifier_int8": ...}``: torchvision's ``arch`` classifier (random
    weights) in fp32 and quantized whole (one FX graph, the x86 engine, its default qconfig), calibrated on
    ``calibration``: the yardstick of the deploy form's int8 (``rcm-nddr bench``: what this CPU's int8
    kernels give a whole plain network)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fp32 = getattr(torchvision.models, arch)().eval()
    torch.backends.quantized.engine = INT8_ENGINE
    with warnings.catch_warnings(), torch.no_grad():  # the FX flow's deprecation notices
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(fp32), get_default_qconfig_mapping(INT8_ENGINE), (calibration[0],))
        for batch in calibration:
            prepared(batch)
        int8 = convert_fx(prepared)
    return {"classifier_fp32": fp32, "classifier_int8": int8}


def _traceable(module: nn.Module) -> nn.Module:
    """A unit as FX traces it: a bare conv wrapped in a Sequential (its graph then has a module to swap)."""
    return nn.Sequential(module) if isinstance(module, nn.Conv2d) else module


def precision_of(name: str) -> str:
    """``name`` checked against ``PRECISIONS`` (PrecisionError naming the known ones)."""
    if name not in PRECISIONS:
        raise PrecisionError(f"precision {name!r}: expected one of {', '.join(PRECISIONS)}")
    return name
