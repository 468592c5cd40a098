"""``rcm-nddr bench scaling`` on a tiny setting: one row per task count, parameter counts that follow from
the networks' construction (checked against independently built networks and the NDDR formula), the
store's one-way sources, FLOP counts, the fits, the plot and the command line. No wall-clock assertions."""

from __future__ import annotations

import json

import pytest
import torch

from rcm_nddr.commands import cli
from rcm_nddr.commands.bench_scaling import (
    REFERENCE,
    VARIANTS,
    bench_scaling,
    build_variant,
    check_arguments,
    linear_fit,
    one_way_sources,
    plot_report,
)
from rcm_nddr.commands.bench_speed import _tasks, random_start
from rcm_nddr.config import ConfigError, load_config
from rcm_nddr.nn.backbone import STAGES, resnet_backbone
from rcm_nddr.nn.filter_bank import reparameterized_convs

TINY = {"size": (32, 32), "batch": 2, "tasks_max": 3, "repeats": 1, "warmup": 1, "arch": "resnet18"}


@pytest.fixture(scope="module")
def report() -> dict:
    return bench_scaling(**TINY)


@pytest.fixture(scope="module")
def start():
    with torch.random.fork_rng(devices=[]):
        return random_start("resnet18")


def _stored_parameters(model: torch.nn.Module) -> int:
    """Every parameter plus the filter bank (a buffer), counted straight from the module."""
    bank = sum(b.numel() for n, b in model.named_buffers() if n.endswith("filter_bank"))
    return bank + sum(p.numel() for p in model.parameters())


@pytest.mark.slow  # builds and deploys the networks (tens of seconds, once per module)
def test_one_row_per_task_count_for_each_variant(report):
    rows = report["rows"]
    assert [r["tasks"] for r in rows] == [1, 2, 3]
    assert [r["task_added"] for r in rows] == report["setup"]["tasks"] == ["semseg", "depth", "normals"]
    for row in rows:
        for v in VARIANTS:
            assert len(row[v]["seconds_all"]) == TINY["repeats"] and row[v]["seconds"] > 0
            assert row[v]["images_per_s"] == pytest.approx(TINY["batch"] / row[v]["seconds"])
        t = row["tasks"]
        assert row[REFERENCE]["seconds"] == pytest.approx(t * rows[0][REFERENCE]["seconds"])
        assert row[REFERENCE]["flops_per_image"] == pytest.approx(t * rows[0][REFERENCE]["flops_per_image"])
    json.dumps(report)  # plain data throughout


@pytest.mark.slow  # builds and deploys the networks (tens of seconds, once per module)
def test_parameters_match_independently_built_networks(report, start):
    net, decomposition = start
    tasks = _tasks(TINY["tasks_max"])
    names = list(tasks)
    for row in report["rows"]:
        t = row["tasks"]
        first = {n: tasks[n] for n in names[:t]}
        for v in VARIANTS:
            model = build_variant(v, net, decomposition, first)
            assert row[v]["parameters"] == _stored_parameters(model), (v, t)
    # rcm: the total is the bank plus each task's own tensors, each task adding its own count
    per_task = report["parameters"]["rcm"]["per_task"]
    bank = report["parameters"]["rcm"]["filter_bank"]
    modules = dict(net.named_modules())
    assert bank == sum(modules[n].weight.numel() for n in reparameterized_convs(net))  # the bank, once
    for row in report["rows"]:
        assert row["rcm"]["parameters"] == bank + sum(per_task[n] for n in names[: row["tasks"]])
        assert row["rcm"]["parameters_added"] == per_task[row["task_added"]]
    # the tasks differ only in their heads' output channels: the same increments up to those
    heads = {n: (tasks[n].out_channels) * (256 + 1) for n in names}  # the 1x1 prediction conv with bias
    increments = {per_task[n] - heads[n] for n in names}
    assert len(increments) == 1


@pytest.mark.slow  # builds and deploys the networks (tens of seconds, once per module)
def test_nddr_adds_exactly_its_layers(report, start):
    net, decomposition = start
    channels = net.stage_channels
    names = report["setup"]["tasks"]
    for row in report["rows"]:
        # task k (0-based) reads k + 1 maps: a (k+1)C x C 1x1 conv and a BatchNorm (2C) per stage
        expected = sum((k + 1) * channels[s] ** 2 + 2 * channels[s] for k in range(1, row["tasks"]) for s in STAGES)
        assert row["rcm_nddr"]["parameters"] - row["rcm"]["parameters"] == expected
        assert row["rcm_nddr"]["fusion_parameters"] == expected
    model = build_variant("rcm_nddr", net, decomposition, _tasks(3))
    assert names[0] not in model.fusion.sources  # the first task has nothing to read: no layers
    for k, name in enumerate(names[1:], start=1):
        assert model.fusion.sources[name] == [name, *names[:k]]
        for s in STAGES:
            layer = model.fusion[name][s]
            assert layer.conv.weight.shape == (channels[s], (k + 1) * channels[s], 1, 1)
            assert sum(p.numel() for p in layer.parameters()) == (k + 1) * channels[s] ** 2 + 2 * channels[s]


def test_sources_mirror_the_store_adding_one_group_at_a_time():
    from rcm_nddr.engine.plan import plan_group
    from rcm_nddr.store import TaskRecord

    names = ["semseg", "depth", "normals", "edge"]
    sources = one_way_sources(names)
    records = []
    for k, name in enumerate(names):
        plan = plan_group(load_config(None, [f"tasks=[{name}]", "fusion.type=nddr"]), records)
        assert plan.sources.get(name, []) == sources[name]
        records.append(TaskRecord(name, name, group=k + 1, sources=sources[name]))


@pytest.mark.slow  # builds and deploys the networks (tens of seconds, once per module)
def test_flops_grow_with_the_tasks_and_the_fusion_flops_follow_the_formula(report):
    rows = report["rows"]
    for v in (*VARIANTS, REFERENCE):
        flops = [r[v]["flops_per_image"] for r in rows]
        assert all(a < b for a, b in zip(flops, flops[1:], strict=False)), v
    # one task: both variants are the same network, and it runs the convs of a plain one (own stem conv)
    assert rows[0]["rcm"]["flops_per_image"] == rows[0]["rcm_nddr"]["flops_per_image"]
    assert rows[0]["rcm"]["flops_per_image"] == rows[0][REFERENCE]["flops_per_image"]
    # fusion: task k's 1x1 conv over k + 1 maps at every stage, 2 FLOPs per multiply-add
    plain = resnet_backbone("resnet18", weights="none", output_stride=16).eval()
    with torch.no_grad():
        features = plain(torch.zeros(1, 3, *TINY["size"]))
    per_source = sum(2 * f.shape[1] ** 2 * f.shape[2] * f.shape[3] for f in features.values())
    for row in rows:
        expected = per_source * sum(k + 1 for k in range(1, row["tasks"]))
        assert row["fusion_flops_per_image"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow  # builds and deploys the networks (tens of seconds, once per module)
def test_fits_exist_and_are_sane(report):
    fits = report["fits"]
    assert set(fits) == {"seconds", "seconds_min", "flops_per_image", "parameters"}
    for per_variant in fits.values():
        assert set(per_variant) == {*VARIANTS, REFERENCE}
        for fit in per_variant.values():
            assert set(fit) == {"intercept", "slope", "r2", "max_rel_deviation"}
            assert 0.0 <= fit["r2"] <= 1.0 and fit["max_rel_deviation"] >= 0.0
    assert fits["flops_per_image"]["rcm"]["slope"] > 0 and fits["parameters"]["rcm"]["slope"] > 0
    assert fits["parameters"][REFERENCE]["slope"] > fits["parameters"]["rcm"]["slope"]


def test_linear_fit():
    exact = linear_fit([1, 2, 3, 4], [3.0, 5.0, 7.0, 9.0])
    assert exact["slope"] == pytest.approx(2.0) and exact["intercept"] == pytest.approx(1.0)
    assert exact["r2"] == pytest.approx(1.0) and exact["max_rel_deviation"] == pytest.approx(0.0, abs=1e-12)
    noisy = linear_fit([1, 2, 3], [1.0, 3.0, 2.0])
    assert 0.0 <= noisy["r2"] < 1.0 and noisy["max_rel_deviation"] > 0
    assert linear_fit([1, 2], [5.0, 5.0])["r2"] == 1.0
    with pytest.raises(ValueError):
        linear_fit([1], [1.0])


@pytest.mark.slow  # builds and deploys the networks (tens of seconds, once per module)
def test_plot_is_a_png(report, tmp_path):
    path = tmp_path / "plots" / "scaling.png"
    plot_report(report, path)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.slow  # builds and deploys the networks (tens of seconds, once per module)
def test_command_prints_the_table_and_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    args = ["bench", "scaling", "--size", "32", "32", "--batch", "1", "--tasks-max", "2", "--repeats", "1"]
    architecture = ["--head-channels", "16", "--output-stride", "8"]
    assert cli.main([*args, *architecture, "--warmup", "0", "--json", str(out_json), "--plot", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert "| T | rcm s | rcm_nddr s | plain x T s |" in out and "| s / batch | rcm_nddr |" in out
    assert "resnet18 (output stride 8) DeepLabv3+ (16 channels)" in out
    saved = json.loads(out_json.read_text())
    assert saved["benchmark"] == "scaling" and [r["tasks"] for r in saved["rows"]] == [1, 2]
    assert saved["setup"]["head_channels"] == 16 and saved["setup"]["output_stride"] == 8
    assert set(saved) >= {"setup", "machine", "rows", "fits"} and saved["setup"]["batch"] == 1
    assert out_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch": 0}, "--batch"),
        ({"tasks_max": 1}, "--tasks-max"),
        ({"size": (16, 32)}, "--size"),
        ({"repeats": 0}, "--repeats"),
        ({"warmup": -1}, "--warmup"),
        ({"arch": "resnet101"}, "--arch"),
    ],
)
def test_bad_arguments_are_config_errors(changes, message):
    settings = {"device": "cpu", **TINY, **changes}
    with pytest.raises(ConfigError, match=message):
        check_arguments(**settings)
    with pytest.raises(ConfigError, match=message):
        bench_scaling(**settings)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_a_device_is_refused(capsys):
    with pytest.raises(ConfigError, match="no CUDA device"):
        bench_scaling(device="cuda", **TINY)
    assert cli.main(["bench", "scaling", "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device" in capsys.readouterr().err


def test_bad_command_line_values_exit_2_naming_the_option(capsys):
    assert cli.main(["bench", "scaling", "--batch", "0"]) == 2
    assert "--batch: at least 1" in capsys.readouterr().err
    assert cli.main(["bench", "scaling", "--plot", "out.jpg"]) == 2
    assert "--plot" in capsys.readouterr().err
