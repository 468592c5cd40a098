"""``rcm-nddr bench scaling``: how inference time, FLOPs and parameters grow with the number of tasks.

For every task count T = 1 .. N (default 10) and two variants of the incremental model:

- ``rcm``: RC + RI + NFF tasks, each trained as its own group, no fusion (what RCM stores);
- ``rcm_nddr``: the same tasks with one-way NDDR fusion as a model store builds it when the tasks are
  added one group at a time with ``fusion: {type: nddr, sources: all}`` and the default stages: task k
  (0-based) reads itself and every earlier task, ``[task_k, task_0 .. task_{k-1}]``, after each of
  ``stem, layer1 .. layer4``. The first task has nothing to read, so (like ``plan_group``) it gets no
  NDDR layers: at T = 1 both variants are the same network.

The networks are built in memory with random weights the way ``bench_speed.build_networks`` builds
them (``weights="none"``, a random orthogonal decomposition for RI), through the same assembly code a
model store uses (``assembly.build_network``). What is timed is the **deploy form**
(``rcm_nddr.nn.deploy.deploy``: what a user serves) computing all T tasks in one call, under
``torch.inference_mode``, channels_last, bf16 autocast on CUDA only; the median over the repeats after
warm-up (each deploy form computing all its tasks, which runs every layer any T runs), every (variant,
T) and the plain reference measured once per round, so a drift of the machine spreads over all of them.
FLOPs (``torch.utils.flop_counter``, 2 per multiply-add) are counted on the meta device. T >= 2 runs
the first T tasks of one N-task deploy form (the same convs as a T-task deploy form: later tasks are
never read by earlier ones); T = 1 is a deploy form of its own, since a single task's stem is folded
into one 7x7 conv instead of sharing a bank response.

The reference ``plain_x_T`` is T fully separate plain single-task networks of the same architecture
(BatchNorm folded by ``deploy``): **one** plain network (the first task's) is measured and its time and
FLOPs multiplied by T; its parameters are the exact sum of T plain networks (backbone + each task's
head, whose output channels differ by task type).

Parameters are those of the training form as a store keeps them: the filter bank counted once plus
every task's own tensors (modulators, BatchNorm, downsample, NDDR, head); BatchNorm running statistics
are buffers, not parameters, and are not counted.

A least-squares line ``y = a + b T`` is fitted to the time (the medians, and the fastest repeats, which
other processes on a shared machine disturb least), the FLOPs and the parameters of each variant, with
its R^2 and the largest relative deviation of a measurement from the line, so "cost grows linearly in
the number of tasks" can be checked. It does not hold exactly for ``rcm_nddr``: task k's NDDR layer
reads k + 1 feature maps, so its 1x1 fusion convs cost (k + 1) C_s^2 per position at stage s (and as
many weights), and the fusion's FLOPs and parameters over T tasks grow as
``sum_{k=1}^{T-1} (k + 1) ~ T^2 / 2``: a quadratic term, reported per T as ``fusion_flops_per_image``
(rcm_nddr minus rcm) and ``fusion_parameters``. It is small in FLOPs (a few percent of the total at 10
tasks) but not in parameters (about a fifth at 10 tasks for ResNet-18: layer4's 512 x 512 blocks)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcm_nddr.commands.bench_speed import (
    TASK_TYPES,
    _alternate,
    _flops,
    _machine,
    _summary,
    _tasks,
    build_networks,
    inference_call,
    publish,
    random_start,
    run_options,
)
from rcm_nddr.config import ConfigError, FusionConfig
from rcm_nddr.files import atomic_write
from rcm_nddr.nn.accounting import parameter_breakdown
from rcm_nddr.nn.assembly import TaskSpec, build_network
from rcm_nddr.nn.deploy import deploy

log = logging.getLogger(__name__)

VARIANTS = ("rcm", "rcm_nddr")
REFERENCE = "plain_x_T"
ARCHS = ("resnet18", "resnet34", "resnet50")
#: smallest input side: the last stage is 1/16 of the input
MIN_SIZE = 32


def one_way_sources(names: Sequence[str]) -> dict[str, list[str]]:
    """The tasks each of ``names`` reads through NDDR besides itself when every task is added to a model
    store as its own group with ``fusion.sources: all``: every earlier task, in store order (the first
    task: none, and so no NDDR layers; see ``engine.plan.plan_group``)."""
    return {name: list(names[:k]) for k, name in enumerate(names)}


def build_variant(
    variant: str,
    net: nn.Module,
    decomposition: Mapping[str, torch.Tensor],
    tasks: Mapping[str, Any],
    head_channels: int = 256,
) -> nn.Module:
    """The training form of ``tasks`` (in store order) for ``variant`` (``rcm`` or ``rcm_nddr``), RC + RI +
    NFF over ``net``'s convs rotated by ``decomposition``, assembled like a model store's tasks."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants: {VARIANTS}")
    f = FusionConfig()  # the config's default stages, alpha, beta and shortcut
    fusion = {"stages": list(f.stages), "alpha": f.alpha, "beta": f.beta, "shortcut": f.shortcut}
    sources = one_way_sources(list(tasks)) if variant == "rcm_nddr" else {}
    specs = []
    for i, name in enumerate(tasks):
        read = sources.get(name, [])
        kind = TASK_TYPES[i % len(TASK_TYPES)]  # the type ``_tasks`` gave the i-th task
        spec = TaskSpec(name, kind, nff=True, head_channels=head_channels, sources=read, fusion=fusion if read else {})
        specs.append(spec)
    return build_network("rc", net, specs, dict(tasks), decomposition=decomposition)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def training_parameters(model: nn.Module, names: Sequence[str]) -> dict[str, Any]:
    """The stored parameters of an RC training form: ``filter_bank`` (once), ``per_task[name]`` (every
    tensor the task owns, ``accounting.parameter_breakdown``) and its ``fusion`` part."""
    breakdowns = {name: parameter_breakdown(model, name) for name in names}
    per_task = {name: b["total"] for name, b in breakdowns.items()}
    owned, total = sum(per_task.values()), _numel(model)
    if owned != total:  # every parameter of the training form belongs to exactly one task
        raise RuntimeError(f"the tasks own {owned} parameters, the network has {total}")
    bank = next(iter(breakdowns.values()))["filter_bank"]
    return {"filter_bank": bank, "per_task": per_task, "fusion": {n: b["fusion"] for n, b in breakdowns.items()}}


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least-squares ``y = intercept + slope x``, its R^2 (1 where the ys do not vary) and the largest
    relative deviation ``|y - fit| / |y|`` of a point from the line (points with y = 0 left out)."""
    n = len(xs)
    if n < 2 or len(ys) != n:
        raise ValueError(f"a line needs at least two points with one y each, got {n} xs and {len(ys)} ys")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    fitted = [intercept + slope * x for x in xs]
    ss_res = sum((y - f) ** 2 for y, f in zip(ys, fitted, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0  # constant ys: the fitted line is exact
    worst = max((abs(y - f) / abs(y) for y, f in zip(ys, fitted, strict=True) if y), default=0.0)
    return {"intercept": intercept, "slope": slope, "r2": min(1.0, max(0.0, r2)), "max_rel_deviation": worst}


def check_arguments(
    device: str, tasks_max: int, size: Sequence[int], batch: int, arch: str, warmup: int, repeats: int
) -> None:
    """Refuse bad settings before anything is built, with a ``ConfigError`` naming the option."""
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device: expected cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if tasks_max < 2:
        raise ConfigError(f"--tasks-max: at least 2 (a line needs two task counts), got {tasks_max}")
    if len(size) != 2 or min(size) < MIN_SIZE:
        raise ConfigError(f"--size: two sides of at least {MIN_SIZE} pixels, got {list(size)}")
    if batch < 1:
        raise ConfigError(f"--batch: at least 1 image, got {batch}")
    if arch not in ARCHS:
        raise ConfigError(f"--arch: one of {', '.join(ARCHS)}, got {arch!r}")
    if warmup < 0:
        raise ConfigError(f"--warmup: at least 0 rounds, got {warmup}")
    if repeats < 1:
        raise ConfigError(f"--repeats: at least 1 round, got {repeats}")


def bench_scaling(
    device: str = "cpu",
    tasks_max: int = 10,
    size: tuple[int, int] = (128, 128),
    batch: int = 2,
    arch: str = "resnet18",
    warmup: int = 1,
    repeats: int = 3,
    amp: bool = True,
    head_channels: int = 256,
    output_stride: int = 16,
) -> dict[str, Any]:
    """Measure time, FLOPs and parameters for 1 .. ``tasks_max`` tasks (see the module docstring);
    returns the report (``setup``, ``machine``, ``rows`` (one per T), ``fits``)."""
    check_arguments(device, tasks_max, size, batch, arch, warmup, repeats)
    dev = torch.device(device)
    task_objects = _tasks(tasks_max)
    names = list(task_objects)
    first = {names[0]: task_objects[names[0]]}
    log.info("building %s networks of 1 and %d tasks (rcm, rcm_nddr) and a plain one", arch, tasks_max)
    with torch.random.fork_rng(devices=[]):
        net, decomposition = random_start(arch, output_stride)
        training = {v: build_variant(v, net, decomposition, task_objects, head_channels) for v in VARIANTS}
        single = {v: build_variant(v, net, decomposition, first, head_channels) for v in VARIANTS}
    _, plain = build_networks(arch, first, output_stride, head_channels)
    plain_net = plain[names[0]]

    params = {v: training_parameters(model, names) for v, model in training.items()}
    plain_backbone = _numel(plain_net.backbone)
    plain_params = {name: plain_backbone + _numel(training["rcm"].heads[name]) for name in names}
    if plain_params[names[0]] != _numel(plain_net):
        raise RuntimeError("the plain network's parameters are not its backbone's and its head's")

    served = {v: deploy(model) for v, model in training.items()}
    served_single = {v: deploy(model) for v, model in single.items()}
    plain_served = deploy(plain_net)
    del training, single, plain, plain_net, net
    for module in (*served.values(), *served_single.values(), plain_served):
        module.to(dev, memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, *size, generator=gen).to(dev, memory_format=torch.channels_last)
    use_amp = amp and dev.type == "cuda"

    def infer(model: nn.Module, run: list[str]) -> Callable[[], Any]:
        return inference_call(model, images, use_amp, run)

    def model_for(variant: str, t: int) -> nn.Module:
        return served_single[variant] if t == 1 else served[variant]

    counts = range(1, tasks_max + 1)
    keys = {(v, t): f"{v}/{t}" for t in counts for v in VARIANTS}
    runs = {keys[v, t]: infer(model_for(v, t), names[:t]) for t in counts for v in VARIANTS}
    runs[REFERENCE] = infer(plain_served, names[:1])
    # Warm-up: each deploy form computing all its tasks runs every layer any T runs, at a fraction of
    # the cost of a warm-up round over every (variant, T).
    log.info("warm-up: %d round(s) of every network with all its tasks", warmup)
    whole = [infer(served[v], names) for v in VARIANTS] + [infer(m, names[:1]) for m in served_single.values()]
    for _ in range(warmup):
        for fn in (*whole, runs[REFERENCE]):
            fn()
    log.info("timing %d calls per round, %d rounds, batch %d, %dx%d on %s", len(runs), repeats, batch, *size, dev)
    times = _alternate(runs, dev, 0, repeats)
    # FLOPs depend on shapes only: counted on the meta device (no arithmetic), the weights no longer needed
    log.info("counting FLOPs")
    for module in (*served.values(), *served_single.values(), plain_served):
        module.to("meta")
    shapes = torch.empty(batch, 3, *size, device="meta")

    def count(model: nn.Module, run: list[str]) -> int:
        with torch.no_grad():
            return _flops(lambda: model(shapes, tasks=run, raw=True))

    flops = {keys[v, t]: count(model_for(v, t), names[:t]) for t in counts for v in VARIANTS}
    flops[REFERENCE] = count(plain_served, names[:1])

    plain_summary = _summary(times[REFERENCE], flops[REFERENCE], batch)
    rows = []
    for t in counts:
        row: dict[str, Any] = {"tasks": t, "task_added": names[t - 1]}
        for v in VARIANTS:
            p = params[v]
            entry = _summary(times[keys[v, t]], flops[keys[v, t]], batch)
            entry["seconds_min"] = min(entry["seconds_all"])
            entry["parameters"] = p["filter_bank"] + sum(p["per_task"][n] for n in names[:t])
            entry["parameters_added"] = p["per_task"][names[t - 1]]
            entry["fusion_parameters"] = sum(p["fusion"][n] for n in names[:t])
            row[v] = entry
        row[REFERENCE] = {
            "seconds": t * plain_summary["seconds"],
            "seconds_min": t * min(plain_summary["seconds_all"]),
            "flops_per_image": t * plain_summary["flops_per_image"],
            "parameters": sum(plain_params[n] for n in names[:t]),
            "parameters_added": plain_params[names[t - 1]],
        }
        fusion_flops = row["rcm_nddr"]["flops_per_image"] - row["rcm"]["flops_per_image"]
        row["fusion_flops_per_image"] = fusion_flops
        row["fusion_flops_share"] = fusion_flops / row["rcm_nddr"]["flops_per_image"]
        rows.append(row)

    xs = [float(t) for t in counts]
    fits = {
        quantity: {v: linear_fit(xs, [float(r[v][quantity]) for r in rows]) for v in (*VARIANTS, REFERENCE)}
        for quantity in ("seconds", "seconds_min", "flops_per_image", "parameters")
    }
    return {
        "benchmark": "scaling",
        "machine": _machine(dev),
        "setup": {
            "arch": arch,
            "output_stride": output_stride,
            "head_channels": head_channels,
            "tasks": names,
            "nddr_sources": one_way_sources(names),
            "size": list(size),
            "batch": batch,
            "device": str(dev),
            "precision": "bf16 autocast" if use_amp else "fp32",
            "memory_format": "channels_last",
            "warmup": warmup,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "weights": "random (weights=none), random orthogonal RI decomposition",
            "variants": {
                "rcm": "RC + RI + NFF, every task its own group, no fusion",
                "rcm_nddr": "rcm plus one-way NDDR: task k reads [task_k, task_0 .. task_{k-1}] after every "
                "default stage; the first task has no NDDR layers",
                REFERENCE: f"T x the time and FLOPs of one plain single-task network ({names[0]}, BatchNorm "
                "folded), measured once per round; parameters: the exact sum of T plain networks",
            },
            "timing": "deploy form, all T tasks in one call, torch.inference_mode; warm-up: every deploy form "
            "with all its tasks; median of the repeats; every (variant, T) and the plain network measured once "
            "per round",
            "parameters": "training form as stored: filter bank once + every task's own tensors "
            "(modulators, BatchNorm, downsample, NDDR, head); BatchNorm statistics not counted",
            "fit": "least squares y = intercept + slope * T over T = 1..N; seconds: the medians, seconds_min: the "
            "fastest repeat of each (the least disturbed by other processes on a shared machine)",
        },
        "parameters": {v: {"filter_bank": p["filter_bank"], "per_task": p["per_task"]} for v, p in params.items()}
        | {REFERENCE: {"per_task": plain_params}},
        "rows": rows,
        "fits": fits,
    }


def format_report(report: dict[str, Any]) -> str:
    """The per-T table and the fitted lines as Markdown."""
    setup = report["setup"]
    n = len(report["rows"])
    lines = [
        f"{setup['arch']} (output stride {setup['output_stride']}) DeepLabv3+ ({setup['head_channels']} channels), "
        f"1..{n} tasks, batch {setup['batch']}, {setup['size'][0]}x{setup['size'][1]}, "
        f"{setup['device']} ({report['machine']['device']}), {setup['precision']}, deploy form, "
        f"median of {setup['repeats']} after {setup['warmup']} warm-up",
        "",
        "| T | rcm s | rcm_nddr s | plain x T s | rcm params | rcm_nddr params | plain x T params "
        "| rcm GFLOP/img | rcm_nddr GFLOP/img | plain x T GFLOP/img | NDDR GFLOP/img |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        cells = [str(r["tasks"])]
        cells += [f"{r[v]['seconds']:.4f}" for v in (*VARIANTS, REFERENCE)]
        cells += [f"{r[v]['parameters'] / 1e6:.2f}M" for v in (*VARIANTS, REFERENCE)]
        cells += [f"{r[v]['flops_per_image'] / 1e9:.2f}" for v in (*VARIANTS, REFERENCE)]
        cells.append(f"{r['fusion_flops_per_image'] / 1e9:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    units = {"seconds": ("s / batch", 1.0, ".4f"), "flops_per_image": ("GFLOP / image", 1e9, ".3f")}
    units["seconds_min"] = ("fastest s / batch", 1.0, ".4f")
    units["parameters"] = ("M parameters", 1e6, ".3f")
    lines += [
        "",
        "| fit: y = a + b T | variant | a (intercept) | b (slope: per task) | R^2 | max rel. deviation |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for quantity, per_variant in report["fits"].items():
        label, scale, fmt = units[quantity]
        for v, fit in per_variant.items():
            lines.append(
                f"| {label} | {v} | {fit['intercept'] / scale:{fmt}} | {fit['slope'] / scale:{fmt}} | "
                f"{fit['r2']:.5f} | {100 * fit['max_rel_deviation']:.2f}% |"
            )
    last = report["rows"][-1]
    lines += [
        "",
        f"plain x T: one plain network ({setup['tasks'][0]}) timed, its time and FLOPs multiplied by T "
        "(exactly linear by construction); its parameters are the sum of T plain networks.",
        f"NDDR: task k reads k + 1 feature maps, so the fusion's FLOPs and parameters grow quadratically in T "
        f"(at T = {last['tasks']}: {last['fusion_flops_per_image'] / 1e9:.3f} GFLOP/img, "
        f"{100 * last['fusion_flops_share']:.1f}% of rcm_nddr's; {last['rcm_nddr']['fusion_parameters'] / 1e6:.2f}M "
        f"parameters, {100 * last['rcm_nddr']['fusion_parameters'] / last['rcm_nddr']['parameters']:.1f}%).",
    ]
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """Two panels as a PNG at ``path`` (written atomically): inference ms per batch against T (measured
    points, fitted lines dashed) and parameters (millions) against T."""
    # matplotlib takes a second to import and only --plot needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    setup, rows, fits = report["setup"], report["rows"], report["fits"]
    ts = [r["tasks"] for r in rows]
    styles = {"rcm": ("tab:blue", "o"), "rcm_nddr": ("tab:orange", "s"), REFERENCE: ("tab:gray", "^")}
    labels = {"rcm": "rcm (RC+RI+NFF)", "rcm_nddr": "rcm_nddr (+ one-way NDDR)", REFERENCE: "plain x T"}
    fig = Figure(figsize=(12, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    time_ax, param_ax = fig.subplots(1, 2)
    for v, (color, marker) in styles.items():
        ms = [1e3 * r[v]["seconds"] for r in rows]
        time_ax.plot(ts, ms, marker=marker, color=color, linestyle="none", label=labels[v])
        fit = fits["seconds"][v]
        line = [1e3 * (fit["intercept"] + fit["slope"] * t) for t in ts]
        time_ax.plot(ts, line, color=color, linestyle="--", linewidth=1, label=f"fit: {1e3 * fit['slope']:.1f} ms/task")
        param_ax.plot(ts, [r[v]["parameters"] / 1e6 for r in rows], marker=marker, color=color, label=labels[v])
    time_ax.set(xlabel="tasks T", ylabel="inference time per batch (ms)", title="deploy form, all T tasks in one call")
    param_ax.set(xlabel="tasks T", ylabel="parameters (millions)", title="stored parameters (training form)")
    for ax in (time_ax, param_ax):
        ax.set_xticks(ts)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(
        f"Scaling in tasks: {setup['arch']}, {setup['size'][0]}x{setup['size'][1]}, batch {setup['batch']}, "
        f"{setup['device']} ({setup['precision']})"
    )
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def main(args: argparse.Namespace) -> int:
    """``rcm-nddr bench scaling``: measure, print the table, write the JSON and the plot if asked."""
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise ConfigError(f"--plot: a .png file, got {args.plot}")
    report = bench_scaling(**run_options(args), tasks_max=args.tasks_max)
    publish(format_report(report), report, args.json)
    if args.plot:
        plot_report(report, args.plot)
        log.info("plot written to %s", args.plot)
    return 0
