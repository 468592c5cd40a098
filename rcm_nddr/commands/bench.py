"""``rcm-nddr bench``: benchmarks. ``bench decomp`` measures the speed and the peak resident memory of
the streaming response decomposition beside a naive reference that keeps every response and runs a
PCA on their concatenation, each measurement in a fresh process. ``bench scaling`` (``bench_scaling``)
measures inference time, FLOPs and parameters against the number of tasks."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA

from rcm_nddr.data.folder import IMAGENET_MEAN, IMAGENET_STD
from rcm_nddr.decomp import ResponseStatistics
from rcm_nddr.files import atomic_write_text
from rcm_nddr.nn.backbone import resnet_backbone
from rcm_nddr.nn.filter_bank import reparameterized_convs

log = logging.getLogger(__name__)

METHODS = ("streaming", "reference")
ARCH = "resnet18"
OUTPUT_STRIDE = 16
#: share of the machine's RAM the reference may plan to use before it subsamples spatial positions
RAM_SHARE = 0.7


# ----------------------------------------------------------------------------- memory probes


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _meminfo_bytes(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/meminfo has no {field}")


# ----------------------------------------------------------------------------- workload


def _backbone():

    torch.manual_seed(0)
    return resnet_backbone(ARCH, "none", output_stride=OUTPUT_STRIDE).eval()


def _image_batches(n_images: int, size: tuple[int, int], batch: int, seed: int):
    """Smooth random images (noise at 1/8 resolution, upsampled), ImageNet-normalized; batch i is drawn
    from seed + i, so every method sees the same images without any of them holding all of them."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    h, w = size
    for i, start in enumerate(range(0, n_images, batch)):
        b = min(batch, n_images - start)
        coarse = torch.rand(b, 3, max(1, h // 8), max(1, w // 8), generator=torch.Generator().manual_seed(seed + i))
        yield (F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) - mean) / std


def response_shapes(size: tuple[int, int]) -> dict[str, tuple[int, int, int]]:
    """(Co, H, W) of every reparameterized conv's response for one image of ``size``."""
    backbone = _backbone()
    modules = dict(backbone.named_modules())
    shapes: dict[str, tuple[int, int, int]] = {}

    def record(name: str, out: torch.Tensor) -> None:
        shapes[name] = (out.shape[1], out.shape[2], out.shape[3])

    handles = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: record(name, out))
        for name in reparameterized_convs(backbone)
    ]
    with torch.no_grad():
        backbone(torch.zeros(1, 3, *size))
    for handle in handles:
        handle.remove()
    return shapes


def reference_plan(n_images: int, size: tuple[int, int], ram_bytes: int) -> dict[str, Any]:
    """Bytes the reference keeps (float32 responses of every layer) and the spatial subsampling factor
    that keeps its estimated peak (responses + concatenation and PCA of the largest layer) within
    ``RAM_SHARE`` of ``ram_bytes`` (1 = exact)."""
    per_layer = {name: 4 * c * h * w for name, (c, h, w) in response_shapes(size).items()}
    responses = n_images * sum(per_layer.values())
    peak = responses + 2 * n_images * max(per_layer.values())
    budget = RAM_SHARE * ram_bytes
    return {
        "response_bytes_per_image": sum(per_layer.values()),
        "response_bytes": responses,
        "estimated_peak_bytes": peak,
        "budget_bytes": int(budget),
        "subsample": max(1, math.ceil(peak / budget)),
    }


def _measure(method: str, n_images: int, size: tuple[int, int], batch: int, seed: int, subsample: int) -> dict:
    """One measurement, meant to run in a fresh process: peak RSS above the baseline after imports and
    model construction, and the wall time of collecting and decomposing the responses."""
    backbone = _backbone()
    reset = _reset_peak_rss()
    baseline = _proc_status_kib("VmRSS")
    start = time.perf_counter()
    if method == "streaming":
        eigenvalues, collect_s, extra = _run_streaming(backbone, n_images, size, batch, seed)
    elif method == "reference":
        eigenvalues, collect_s, extra = _run_reference(backbone, n_images, size, batch, seed, subsample)
    else:
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    seconds = time.perf_counter() - start
    peak = _proc_status_kib("VmHWM")
    return {
        "method": method,
        "images": n_images,
        "seconds": seconds,
        "collect_seconds": collect_s,
        "decompose_seconds": seconds - collect_s,
        "images_per_s": n_images / seconds,
        "baseline_rss_mib": baseline / 1024,
        "peak_rss_mib": peak / 1024,
        "delta_rss_mib": (peak - baseline) / 1024,
        "peak_reset": reset,
        "torch_threads": torch.get_num_threads(),
        "top_eigenvalues": eigenvalues,
        **extra,
    }


def _run_streaming(backbone, n_images, size, batch, seed) -> tuple[dict[str, list[float]], float, dict]:

    stats = ResponseStatistics(backbone)
    start = time.perf_counter()
    for images in _image_batches(n_images, size, batch, seed):
        stats.update(images)
    collect_s = time.perf_counter() - start
    decomposition = stats.decompose()
    top = {name: d.eigenvalues[:10].tolist() for name, d in decomposition.items()}
    return top, collect_s, {"subsample": 1}


def _run_reference(backbone, n_images, size, batch, seed, subsample) -> tuple[dict[str, list[float]], float, dict]:
    """What the official RCM code does: keep every response vector (float32), then per layer
    concatenate them and fit sklearn's PCA."""
    layers = reparameterized_convs(backbone)
    kept: dict[str, list[np.ndarray]] = {name: [] for name in layers}

    def keep(name: str, out: torch.Tensor) -> None:
        vectors = out.detach().permute(0, 2, 3, 1).reshape(-1, out.shape[1])
        if subsample > 1:
            vectors = vectors[::subsample].clone()
        kept[name].append(vectors.numpy())

    modules = dict(backbone.named_modules())
    handles = [modules[n].register_forward_hook(lambda _m, _i, out, n=n: keep(n, out)) for n in layers]
    start = time.perf_counter()
    with torch.no_grad():
        for images in _image_batches(n_images, size, batch, seed):
            backbone(images)
    for handle in handles:
        handle.remove()
    collect_s = time.perf_counter() - start
    top, solvers = {}, set()
    for name in layers:
        samples = np.concatenate(kept[name])
        kept[name] = []
        pca = PCA().fit(samples)
        solvers.add(pca._fit_svd_solver)
        n = samples.shape[0]
        # sklearn divides by n - 1; the streaming statistics by n
        top[name] = (pca.explained_variance_[:10].astype(np.float64) * (n - 1) / n).tolist()
        del samples, pca
    return top, collect_s, {"subsample": subsample, "pca_solver": ",".join(sorted(solvers))}


# ----------------------------------------------------------------------------- driver


def _in_fresh_process(*args: Any) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_measure, *args).result()


def _max_rel_diff(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    worst = 0.0
    for name, values in a.items():
        for x, y in zip(values, b[name], strict=True):
            worst = max(worst, abs(x - y) / max(abs(x), 1e-30))
    return worst


def bench_decomp(
    image_counts: list[int], size: tuple[int, int] = (128, 128), batch: int = 16, seed: int = 0
) -> dict[str, Any]:
    """Run both methods for every image count, each in a fresh process; return the report."""

    ram = _meminfo_bytes("MemTotal")
    report: dict[str, Any] = {
        "benchmark": "decomp",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "ram_gib": round(ram / 2**30, 1),
            "device": "cpu",
            "torch": torch.__version__,
            "sklearn": sklearn.__version__,
        },
        "setup": {
            "arch": ARCH,
            "weights": "none (random initialization: the timing and memory do not depend on the weights)",
            "output_stride": OUTPUT_STRIDE,
            "size": list(size),
            "batch": batch,
            "images": f"smooth random noise images, seed {seed}",
            "reference": "keeps every response vector of every layer (float32), then sklearn PCA per layer",
            "streaming": "float64 n, sum r, sum r r^T per layer, then eigh",
            "memory": "peak RSS (VmHWM) minus the RSS after imports and model construction, fresh process each",
        },
        "runs": [],
    }
    for n_images in image_counts:
        plan = reference_plan(n_images, size, ram)
        log.info(
            "%d images: the reference keeps %.2f GiB of responses (estimated peak %.2f GiB, budget %.2f GiB)%s",
            n_images,
            plan["response_bytes"] / 2**30,
            plan["estimated_peak_bytes"] / 2**30,
            plan["budget_bytes"] / 2**30,
            f": subsampling 1 in {plan['subsample']} positions" if plan["subsample"] > 1 else "",
        )
        runs = {}
        for method in METHODS:
            log.info("measuring %s on %d images in a fresh process", method, n_images)
            try:
                runs[method] = _in_fresh_process(method, n_images, tuple(size), batch, seed, plan["subsample"])
            except BrokenProcessPool:
                runs[method] = {"method": method, "images": n_images, "error": "the process died (out of memory?)"}
            runs[method]["reference_plan"] = plan if method == "reference" else None
            log.info("%s", _describe(runs[method]))
        stream, ref = runs["streaming"], runs["reference"]
        if "error" not in stream and "error" not in ref:
            ratio = ref["delta_rss_mib"] / stream["delta_rss_mib"]
            agreement = _max_rel_diff(stream["top_eigenvalues"], ref["top_eigenvalues"])
            stream["memory_ratio_reference_over_streaming"] = ratio
            stream["top10_eigenvalue_max_rel_diff_vs_reference"] = agreement if ref["subsample"] == 1 else None
        report["runs"].extend(runs.values())
    for run in report["runs"]:
        run.pop("top_eigenvalues", None)
    streams = [r for r in report["runs"] if r["method"] == "streaming" and "error" not in r]
    if len(streams) > 1:
        report["streaming_peak_growth"] = streams[-1]["delta_rss_mib"] / streams[0]["delta_rss_mib"]
    return report


def _describe(run: dict) -> str:
    if "error" in run:
        return f"{run['method']} {run['images']} images: {run['error']}"
    return (
        f"{run['method']} {run['images']} images: {run['seconds']:.1f} s ({run['images_per_s']:.1f} img/s), "
        f"peak RSS {run['peak_rss_mib']:.0f} MiB, {run['delta_rss_mib']:.0f} MiB above the baseline"
    )


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    lines = [
        "| method | images | time (s) | images/s | peak RSS (MiB) | above baseline (MiB) | reference / streaming |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in report["runs"]:
        if "error" in run:
            lines.append(f"| {run['method']} | {run['images']} | {run['error']} | | | | |")
            continue
        method = run["method"]
        if run.get("subsample", 1) > 1:
            method += f" (1 in {run['subsample']} positions kept)"
        ratio = run.get("memory_ratio_reference_over_streaming")
        lines.append(
            f"| {method} | {run['images']} | {run['seconds']:.1f} | {run['images_per_s']:.1f} | "
            f"{run['peak_rss_mib']:.0f} | {run['delta_rss_mib']:.0f} | {f'{ratio:.1f}x' if ratio else ''} |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``rcm-nddr bench decomp``: measure, print the table, write the JSON if asked."""
    report = bench_decomp(sorted(set(args.images)), size=tuple(args.size), batch=args.batch, seed=args.seed)
    print(format_table(report))  # noqa: T201 - the benchmark's result is this table on stdout
    setup = report["setup"]
    print(  # noqa: T201
        f"\n{setup['arch']} ({setup['weights']}), output stride {setup['output_stride']}, "
        f"{setup['size'][0]}x{setup['size'][1]} images, batch {setup['batch']}; "
        f"{report['machine']['cpus']} CPUs, {report['machine']['ram_gib']} GiB RAM; {setup['memory']}."
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        log.info("report written to %s", args.json)
    return 0
