"""``rcm-nddr bench``: inference and training speed of the reparameterized network against plain networks
of the same architecture, measured in one process, one run, so the ratios compare like with like.

- ``deploy_vs_plain_infer``: T tasks computed by the deploy form (``rcm_nddr.nn.deploy``: modulators
  folded into the bank, BatchNorm into the convs, one shared stem bank response) in one call, over the
  time of T plain single-task networks of the same architecture (BatchNorm folded too) run one after
  the other on the same batch. ``batched_vs_plain_infer``: the same for the batched deploy form (the
  tasks' backbone convs as grouped convs over one stacked tensor, ``deploy(model, batched=True)``).
- ``bf16_vs_fp32_infer`` and ``int8_vs_fp32_infer``: the T-task deploy form in bf16 and in int8
  (``rcm_nddr.nn.precision``; int8 on the CPU only) over the same deploy form in fp32.
  ``int8_vs_fp32_classifier``: beside int8, torchvision's classifier of the same architecture (random
  weights) quantized whole, as one FX graph, over itself in fp32: what this CPU's int8 kernels give a
  plain network without the deploy form's fp32 stems, upsampling and dilated convs, the yardstick for
  ``int8_vs_fp32_infer``.
- ``rc_vs_plain_train_step``: one training step (forward, loss, backward, SGD step) of an RC + RI +
  NFF task over that of a fully trained plain single-task network; ``rc_vs_plain_train_flops`` is the
  same ratio in counted FLOPs, the floor the time ratio reaches when every FLOP costs the same.

Timings are medians over repeats after warm-up, the two sides of each ratio measured alternately
(A B A B ...) so that a drift of the machine affects both. Each ratio is the quotient of the two
medians; ``ratio_quartiles`` gives the quartiles of the per-round quotients (A_i / B_i), the spread a
noisy machine puts on it. FLOPs are counted by
``torch.utils.flop_counter`` (2 per multiply-add) on one pass."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rcm_nddr.config import ConfigError
from rcm_nddr.engine.evaluate import autocast
from rcm_nddr.engine.fast import compile_mode, maybe_compile
from rcm_nddr.engine.provenance import devices
from rcm_nddr.files import atomic_write_text
from rcm_nddr.nn.assembly import build_head
from rcm_nddr.nn.backbone import ResNetBackbone, TaskBackbones, resnet_backbone
from rcm_nddr.nn.deploy import deploy
from rcm_nddr.nn.multitask import MultiTaskNet
from rcm_nddr.nn.precision import int8_classifier, int8_unsupported, quantize_int8, to_bf16
from rcm_nddr.nn.rc import RCResNet
from rcm_nddr.registry import TASKS, discover
from rcm_nddr.task import DatasetInfo

log = logging.getLogger(__name__)

#: task types the benchmark's networks cycle through (their heads differ only in output channels)
TASK_TYPES = ("semseg", "depth", "normals", "edge", "sal")
#: classes of the benchmark's semseg task (NYUD's 40)
SEMSEG_CLASSES = 40


def _tasks(count: int) -> dict[str, Any]:

    discover()
    info = DatasetInfo("bench", classes={"semseg": [f"class{i}" for i in range(SEMSEG_CLASSES)]}, extra={})
    out = {}
    for i in range(count):
        kind = TASK_TYPES[i % len(TASK_TYPES)]
        name = kind if i < len(TASK_TYPES) else f"{kind}{i // len(TASK_TYPES) + 1}"
        out[name] = TASKS.get(kind)(name, info)
    return out


def _random_targets(tasks: Mapping[str, Any], batch: int, size: tuple[int, int], device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    h, w = size
    out = {}
    for name, task in tasks.items():
        key = task.target_key
        if key == "semseg":
            target = torch.randint(0, SEMSEG_CLASSES, (batch, h, w), generator=gen)
        elif key == "depth":
            target = torch.rand((batch, 1, h, w), generator=gen) * 5 + 0.5
        elif key == "normals":
            target = nn.functional.normalize(torch.randn((batch, 3, h, w), generator=gen), dim=1)
        else:
            target = (torch.rand((batch, 1, h, w), generator=gen) < 0.2).float()
        out[name] = target.to(device)
    return out


def random_start(arch: str, output_stride: int = 16) -> tuple[ResNetBackbone, dict[str, torch.Tensor]]:
    """``(net, decomposition)``: a randomly initialized plain backbone (``weights="none"``) and a random
    orthogonal "RI decomposition" (one Co x Co matrix per reparameterized conv), drawn from the global
    RNG after seeding it with 0 (callers fork the RNG around it: the benchmarks' networks are the same
    on every run without changing the caller's random state)."""
    torch.manual_seed(0)
    net = resnet_backbone(arch, weights="none", output_stride=output_stride)
    banks = RCResNet(net, [], None).filter_bank()
    decomposition = {n: torch.linalg.qr(torch.randn(b.shape[0], b.shape[0]))[0] for n, b in banks.items()}
    return net, decomposition


def build_networks(arch: str, tasks: Mapping[str, Any], output_stride: int = 16, head_channels: int = 256):
    """``(rc, plain)``: an RC + RI + NFF MultiTaskNet of ``tasks`` (random weights, a random orthogonal
    decomposition) and one plain single-task MultiTaskNet per task, all of the same architecture."""
    with torch.random.fork_rng(devices=[]):
        net, decomposition = random_start(arch, output_stride)
        backbone = RCResNet(net, list(tasks), decomposition, nff=True)
        heads = {n: build_head(backbone, t, head_channels) for n, t in tasks.items()}
        rc = MultiTaskNet(dict(tasks), backbone, heads)
        plain = {}
        for name, task in tasks.items():
            paths = TaskBackbones({name: copy.deepcopy(net)})
            plain[name] = MultiTaskNet({name: task}, paths, {name: build_head(paths, task, head_channels)})
    return rc, plain


#: dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of the CUDA device name, most specific
#: first, from the vendors' data sheets: the denominator of the model FLOP utilization (MFU)
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.0),
)


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak from ``PEAK_BF16_TFLOPS``; None for the CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def inference_call(
    model: nn.Module,
    images: torch.Tensor,
    amp: bool,
    tasks: list[str] | None = None,
    mode: Callable[[], Any] = torch.inference_mode,
) -> Callable[[], Any]:
    """A call of ``model`` on ``images`` computing ``tasks`` (default: all) under ``mode`` and, with ``amp``,
    bf16 autocast on the images' device: what the benchmarks time."""

    def call() -> Any:
        with mode(), autocast(images.device, amp):
            return model(images, tasks=tasks, raw=True)

    return call


def precision_forms(model: MultiTaskNet, device: torch.device, calibration: list[torch.Tensor]) -> dict[str, nn.Module]:
    """``{"deploy_bf16": ..., "deploy_int8": ...}``: a deploy-form ``model`` (on the CPU, left as it is) in
    bf16 and, on a CPU that runs it, in int8 calibrated on ``calibration`` (``rcm_nddr.nn.precision``); int8
    is left out on a GPU and where it cannot run (logged)."""
    forms: dict[str, nn.Module] = {"deploy_bf16": to_bf16(copy.deepcopy(model))}
    reason = "it runs on the CPU only" if device.type != "cpu" else int8_unsupported()
    if reason is None:
        forms["deploy_int8"], report = quantize_int8(model, calibration)
        log.info("int8: %d units quantized, %d kept in fp32", len(report.int8_units), len(report.fp32_units))
    else:
        log.warning("int8 is not measured: %s", reason)
    return forms


def _images_call(
    model: nn.Module, images: torch.Tensor, mode: Callable[[], Any] = torch.inference_mode
) -> Callable[[], Any]:
    """A call of a network that takes only images (the int8 yardstick's classifier), under ``mode``."""

    def call() -> Any:
        with mode():
            return model(images)

    return call


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _alternate(
    runs: Mapping[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in rounds (one call of each per round)."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _flops(fn: Callable[[], Any]) -> int:

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _quartiles(numerators: list[float], denominators: list[float]) -> list[float]:
    """``[q1, median, q3]`` of the per-round quotients ``numerators[i] / denominators[i]``."""
    quotients = [a / b for a, b in zip(numerators, denominators, strict=True)]
    if len(quotients) < 2:
        return quotients * 3
    q1, q2, q3 = statistics.quantiles(quotients, n=4, method="inclusive")
    return [q1, q2, q3]


def _summary(seconds: list[float], flops: int, images: int, peak: float | None = None) -> dict[str, Any]:
    median = statistics.median(seconds)
    achieved = flops / median / 1e12
    return {
        "seconds": median,
        "seconds_all": seconds,
        "images_per_s": images / median,
        "flops_per_image": flops / images,
        "tflops_per_s": achieved,
        "mfu": None if peak is None else achieved / peak,
    }


def bench_model(
    device: str = "cpu",
    size: tuple[int, int] = (256, 256),
    batch: int = 4,
    tasks: int = 4,
    arch: str = "resnet18",
    warmup: int = 2,
    repeats: int = 10,
    amp: bool = True,
    peak: float | None = None,
    output_stride: int = 16,
    head_channels: int = 256,
    compile: bool | str = False,
) -> dict[str, Any]:
    """Measure the inference and training-step ratios (see the module docstring); returns the report.
    ``peak`` (TFLOP/s; default: the device's bf16 peak where known, ``peak_tflops``) turns achieved
    TFLOP/s into model FLOP utilization (``mfu``). ``compile`` (true or a ``torch.compile`` mode, as
    ``train.compile``) times every network compiled, on both sides of each ratio; the warm-up calls
    compile (FLOPs are counted on the eager networks)."""
    mode = compile_mode(compile)  # (a bad mode fails here, before anything is built)
    dev = torch.device(device)
    peak = peak if peak is not None else peak_tflops(dev)
    task_objects = _tasks(tasks)
    rc, plain = build_networks(arch, task_objects, output_stride, head_channels)
    rc_deploy = deploy(rc.eval())
    rc_batched = deploy(rc, batched=True)
    plain_deploy = {name: deploy(net.eval()) for name, net in plain.items()}
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, *size, generator=gen)
    # the deploy form in bf16 and int8 (calibrated on the benchmark's own random images: random weights)
    calibration = [images, torch.randn(batch, 3, *size, generator=gen)]
    reduced = precision_forms(rc_deploy, dev, calibration)
    classifier = int8_classifier(arch, calibration) if "deploy_int8" in reduced else {}
    moved = [rc, rc_deploy, rc_batched, *plain.values(), *plain_deploy.values(), reduced["deploy_bf16"]]
    moved += [classifier["classifier_fp32"]] if classifier else []  # (the int8 networks stay as they are)
    for module in moved:
        module.to(dev, memory_format=torch.channels_last)
    images = images.to(dev, memory_format=torch.channels_last)
    use_amp = amp and dev.type == "cuda"

    def timed(module: nn.Module) -> nn.Module:
        return maybe_compile(module, compile)

    def infer(model: nn.Module, mode: Callable[[], Any] = torch.inference_mode) -> Callable[[], Any]:
        return inference_call(model, images, use_amp, mode=mode)

    def infer_plain(nets: list[nn.Module], mode: Callable[[], Any] = torch.inference_mode) -> Callable[[], None]:
        calls = [infer(net, mode) for net in nets]

        def run_all() -> None:
            for call in calls:
                call()

        return run_all

    rc.eval()
    log.info("inference: %d tasks, batch %d, %dx%d on %s", tasks, batch, *size, dev)
    infer_runs = {
        "deploy": infer(timed(rc_deploy)),
        "plain": infer_plain([timed(net) for net in plain_deploy.values()]),
        "deploy_batched": infer(timed(rc_batched)),
        "training_form": infer(timed(rc)),
        # the precisions without autocast, against the fp32 deploy form without it (on CUDA with amp: its own run)
        **{  # (int8 runs eager: its quantized modules are not compiled)
            name: inference_call(model if name == "deploy_int8" else timed(model), images, False)
            for name, model in reduced.items()
        },
        **{name: _images_call(model, images) for name, model in classifier.items()},
    }
    fp32 = "deploy"
    if use_amp:
        fp32 = "deploy_fp32"
        infer_runs[fp32] = inference_call(timed(rc_deploy), images, False)
    infer_times = _alternate(infer_runs, dev, warmup, repeats)
    # (counted under no_grad: the FLOP counter does not see through weight_norm under inference_mode)
    counted = {"deploy": infer(rc_deploy, torch.no_grad)}
    counted["plain"] = infer_plain(list(plain_deploy.values()), torch.no_grad)
    counted["deploy_batched"] = infer(rc_batched, torch.no_grad)
    counted["training_form"] = infer(rc, torch.no_grad)
    infer_flops = {name: _flops(fn) for name, fn in counted.items()}
    if classifier:
        infer_flops["classifier_fp32"] = _flops(_images_call(classifier["classifier_fp32"], images, torch.no_grad))
    for name in infer_runs:  # the same arithmetic in another precision (quantized ops are not counted)
        infer_flops.setdefault(name, infer_flops["classifier_fp32" if name.startswith("classifier") else "deploy"])

    # training steps of one task: RC + RI + NFF against a fully trained plain network
    first = next(iter(task_objects))
    task = task_objects[first]
    rc_single, plain_single = build_networks(arch, {first: task}, output_stride, head_channels)
    target = _random_targets({first: task}, batch, size, dev)[first]

    def make_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            with autocast(dev, use_amp):
                out = model(images, raw=True)[first]
            loss = task.loss(out.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    steps, counted_steps = {}, {}
    for name, model in (("rc_ri_nff", rc_single), ("plain", plain_single[first])):
        model.to(dev, memory_format=torch.channels_last).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
        steps[name] = make_step(timed(model), optimizer)
        counted_steps[name] = make_step(model, optimizer)
    train_times = _alternate(steps, dev, warmup, repeats)
    train_flops = {name: _flops(fn) for name, fn in counted_steps.items()}
    trainable = {
        "rc_ri_nff": sum(p.numel() for p in rc_single.parameters() if p.requires_grad),
        "plain": sum(p.numel() for p in plain_single[first].parameters() if p.requires_grad),
    }

    inference = {name: _summary(infer_times[name], infer_flops[name], batch, peak) for name in infer_runs}
    train = {name: _summary(train_times[name], train_flops[name], batch, peak) for name in steps}
    for name, count in trainable.items():
        train[name]["trainable_parameters"] = count
    pairs = {
        "deploy_vs_plain_infer": (infer_times["deploy"], infer_times["plain"]),
        "batched_vs_plain_infer": (infer_times["deploy_batched"], infer_times["plain"]),
        "training_form_vs_plain_infer": (infer_times["training_form"], infer_times["plain"]),
        "rc_vs_plain_train_step": (train_times["rc_ri_nff"], train_times["plain"]),
        **{f"{name.removeprefix('deploy_')}_vs_fp32_infer": (infer_times[name], infer_times[fp32]) for name in reduced},
    }
    if classifier:
        pairs["int8_vs_fp32_classifier"] = (infer_times["classifier_int8"], infer_times["classifier_fp32"])
    ratios = {name: statistics.median(a) / statistics.median(b) for name, (a, b) in pairs.items()}
    ratios["rc_vs_plain_train_flops"] = train["rc_ri_nff"]["flops_per_image"] / train["plain"]["flops_per_image"]
    return {
        "benchmark": "model",
        "machine": _machine(dev),
        "setup": {
            "arch": arch,
            "output_stride": output_stride,
            "head_channels": head_channels,
            "tasks": list(task_objects),
            "train_task": first,
            "size": list(size),
            "batch": batch,
            "device": str(dev),
            "precision": "bf16 autocast" if use_amp else "fp32",
            "compile": mode,
            "memory_format": "channels_last",
            "warmup": warmup,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "peak_tflops": peak,
            "inference": "torch.inference_mode; deploy = all tasks in one call; plain = one folded "
            "single-task network per task, one after the other; deploy_batched = the deploy form with the tasks' "
            "backbone convs run as grouped convs over one stacked tensor; training_form = the RC network unfolded",
            "train_step": "forward, loss, backward, SGD step of one task; plain = every weight trained",
            "precisions": "deploy_bf16 = the deploy form with bf16 weights and activations; deploy_int8 = the "
            "deploy form quantized to int8 (FX graph mode, x86 engine, CPU only, eager), calibrated on random "
            "images; both run without autocast, as does their fp32 reference (deploy, or deploy_fp32 with amp); "
            "classifier_fp32 / classifier_int8 = torchvision's classifier of the architecture (random weights), whole, "
            "in fp32 and quantized as one FX graph (beside int8 only)",
        },
        "inference": inference,
        "train_step": train,
        "ratios": ratios,
        "ratio_quartiles": {name: _quartiles(a, b) for name, (a, b) in pairs.items()},
    }


def _machine(device: torch.device) -> dict[str, Any]:

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": str(torch.__version__),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else devices()["cpu"],
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    setup = report["setup"]
    lines = [
        f"{setup['arch']} (output stride {setup['output_stride']}) DeepLabv3+ ({setup['head_channels']} channels), "
        f"{len(setup['tasks'])} tasks, batch {setup['batch']}, "
        f"{setup['size'][0]}x{setup['size'][1]}, {setup['device']} ({report['machine']['device']}), "
        f"{setup['precision']}{'' if setup['compile'] is None else ', torch.compile mode ' + setup['compile']}, "
        f"median of {setup['repeats']} after {setup['warmup']} warm-up",
        "",
        "| inference | s / batch | images/s | GFLOP / image | TFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def mfu(r: dict[str, Any]) -> str:
        return "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"

    for name, r in report["inference"].items():
        lines.append(
            f"| {name} | {r['seconds']:.4f} | {r['images_per_s']:.2f} | {r['flops_per_image'] / 1e9:.2f} "
            f"| {r['tflops_per_s']:.3f} | {mfu(r)} |"
        )
    lines += [
        "",
        "| train step | s / step | images/s | GFLOP / image | TFLOP/s | MFU | trainable |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["train_step"].items():
        lines.append(
            f"| {name} | {r['seconds']:.4f} | {r['images_per_s']:.2f} | {r['flops_per_image'] / 1e9:.2f} "
            f"| {r['tflops_per_s']:.3f} | {mfu(r)} | {r['trainable_parameters']:,} |"
        )
    lines += ["", "| ratio | value | per-round quartiles |", "|---|---:|---:|"]
    for name, value in report["ratios"].items():
        spread = report["ratio_quartiles"].get(name)
        quartiles = "-" if spread is None else f"{spread[0]:.3f} / {spread[1]:.3f} / {spread[2]:.3f}"
        lines.append(f"| {name} | {value:.3f} | {quartiles} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if args.batch < 2:
        raise ConfigError("--batch: at least 2 (a training step's BatchNorm needs more than one value per channel)")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ConfigError(f"--peak-tflops: expected a positive number, got {args.peak_tflops}")
    report = bench_model(**run_options(args), tasks=args.tasks, peak=args.peak_tflops, compile=args.compile or False)
    publish(format_report(report), report, args.json)
    return 0


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments both benchmark commands take from their shared options."""
    return {
        "device": args.device,
        "size": tuple(args.size),
        "batch": args.batch,
        "arch": args.arch,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "output_stride": args.output_stride,
        "head_channels": args.head_channels,
    }


def publish(table: str, report: dict[str, Any], json_path: str | None) -> None:
    """A benchmark's result: ``table`` on stdout, and ``report`` written atomically to ``json_path``."""
    print(table)  # noqa: T201 - the benchmark's result is this table on stdout
    if json_path:
        atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
        log.info("report written to %s", json_path)
