"""``rcm-nddr bench`` (the model benchmark) on a tiny setting: the report's structure, its ratios, FLOP
counts that follow from the deploy form's construction, and the command line."""

from __future__ import annotations

import json

import pytest

from rcm_nddr.commands import cli
from rcm_nddr.commands.bench_speed import _quartiles, bench_model
from rcm_nddr.nn.precision import int8_unsupported

TINY = {"size": (32, 32), "batch": 2, "tasks": 3, "warmup": 1, "repeats": 2}


@pytest.fixture(scope="module")
def report() -> dict:
    return bench_model(**TINY)


def test_ratios_are_the_quotients_of_the_measured_medians(report):
    inference, train, ratios = report["inference"], report["train_step"], report["ratios"]
    assert ratios["deploy_vs_plain_infer"] == pytest.approx(
        inference["deploy"]["seconds"] / inference["plain"]["seconds"]
    )
    assert ratios["rc_vs_plain_train_step"] == pytest.approx(train["rc_ri_nff"]["seconds"] / train["plain"]["seconds"])
    for run in (*inference.values(), *train.values()):
        assert len(run["seconds_all"]) == TINY["repeats"] and run["seconds"] > 0
        assert run["images_per_s"] == pytest.approx(TINY["batch"] / run["seconds"])
        assert run["tflops_per_s"] == pytest.approx(run["flops_per_image"] * TINY["batch"] / run["seconds"] / 1e12)


def test_the_precisions_are_timed_beside_the_fp32_deploy_form(report):
    inference, ratios = report["inference"], report["ratios"]
    names = ["bf16"] + ([] if int8_unsupported() else ["int8"])
    assert {f"{n}_vs_fp32_infer" for n in names} <= set(ratios)
    for name in names:
        run = inference[f"deploy_{name}"]
        assert ratios[f"{name}_vs_fp32_infer"] == pytest.approx(run["seconds"] / inference["deploy"]["seconds"])
        assert len(run["seconds_all"]) == TINY["repeats"]
        assert run["flops_per_image"] == inference["deploy"]["flops_per_image"]  # the same arithmetic
    if "int8" in names:  # the yardstick: a whole torchvision classifier, fp32 and int8, timed in the same rounds
        fp32, int8 = inference["classifier_fp32"], inference["classifier_int8"]
        assert ratios["int8_vs_fp32_classifier"] == pytest.approx(int8["seconds"] / fp32["seconds"])
        assert len(int8["seconds_all"]) == len(fp32["seconds_all"]) == TINY["repeats"]
        assert 0 < fp32["flops_per_image"] == int8["flops_per_image"] != inference["deploy"]["flops_per_image"]


def test_ratio_quartiles_are_those_of_the_per_round_quotients(report):
    inference, train = report["inference"], report["train_step"]
    a, b = train["rc_ri_nff"]["seconds_all"], train["plain"]["seconds_all"]
    quotients = sorted(x / y for x, y in zip(a, b, strict=True))  # two repeats: quartiles lie between them
    q1, q2, q3 = report["ratio_quartiles"]["rc_vs_plain_train_step"]
    assert quotients[0] <= q1 <= q2 <= q3 <= quotients[-1]
    assert q2 == pytest.approx(sum(quotients) / 2)
    assert set(report["ratio_quartiles"]) == set(report["ratios"]) - {"rc_vs_plain_train_flops"}
    deploy = report["ratio_quartiles"]["deploy_vs_plain_infer"]
    assert deploy[1] == pytest.approx(
        (
            inference["deploy"]["seconds_all"][0] / inference["plain"]["seconds_all"][0]
            + inference["deploy"]["seconds_all"][1] / inference["plain"]["seconds_all"][1]
        )
        / 2
    )


def test_quartiles():
    assert _quartiles([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5) == pytest.approx([2.0, 3.0, 4.0])
    assert _quartiles([2.0, 9.0, 4.0], [2.0, 3.0, 4.0]) == pytest.approx([1.0, 1.0, 2.0])
    assert _quartiles([3.0], [2.0]) == [1.5, 1.5, 1.5]


def test_no_mfu_without_a_known_peak(report):
    assert report["setup"]["peak_tflops"] is None  # a CPU has no listed peak
    assert all(run["mfu"] is None for run in report["inference"].values())


def test_flop_counts_follow_from_the_construction(report):
    flops = {name: run["flops_per_image"] for name, run in report["inference"].items()}
    # The deploy form runs the same convs as T plain networks, but the stem's 7x7 bank conv once instead
    # of T times (each task adds a 1x1 modulator instead); the unfolded training form adds a 1x1
    # modulator after every conv.
    stem_7x7 = 2 * 3 * 64 * 7 * 7 * (32 // 2) * (32 // 2)
    stem_1x1 = 2 * 64 * 64 * (32 // 2) * (32 // 2)
    t = TINY["tasks"]
    assert flops["plain"] - flops["deploy"] == pytest.approx((t - 1) * stem_7x7 - t * stem_1x1, rel=1e-6)
    assert flops["training_form"] > flops["plain"]
    assert flops["deploy_batched"] == pytest.approx(flops["deploy"], rel=1e-6)  # the same convs, grouped
    assert report["ratios"]["batched_vs_plain_infer"] == pytest.approx(
        report["inference"]["deploy_batched"]["seconds"] / report["inference"]["plain"]["seconds"]
    )
    train = report["train_step"]
    assert train["rc_ri_nff"]["trainable_parameters"] < train["plain"]["trainable_parameters"]
    # the frozen bank drops its weight gradients; the modulators add less than that back
    assert report["ratios"]["rc_vs_plain_train_flops"] == pytest.approx(
        train["rc_ri_nff"]["flops_per_image"] / train["plain"]["flops_per_image"]
    )
    assert report["ratios"]["rc_vs_plain_train_flops"] < 1


def test_bench_command_prints_the_tables_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    args = ["bench", "--size", "32", "32", "--batch", "2", "--tasks", "2", "--warmup", "1", "--repeats", "1"]
    assert cli.main([*args, "--json", str(path), "--peak-tflops", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "| deploy_vs_plain_infer |" in out and "| rc_vs_plain_train_step |" in out
    assert "per-round quartiles" in out
    saved = json.loads(path.read_text())
    for run in (*saved["inference"].values(), *saved["train_step"].values()):
        assert run["mfu"] == pytest.approx(run["tflops_per_s"] / 0.5)  # utilization of the given peak
    assert cli.main([*args, "--peak-tflops", "0"]) == 2
    assert "--peak-tflops: expected a positive number" in capsys.readouterr().err
    assert cli.main([*args[:4], "--batch", "1"]) == 2
    assert "--batch: at least 2" in capsys.readouterr().err
    assert saved["setup"]["tasks"] == ["semseg", "depth"] and set(saved["ratios"]) >= {
        "deploy_vs_plain_infer",
        "rc_vs_plain_train_step",
        "rc_vs_plain_train_flops",
    }
    assert saved["setup"]["head_channels"] == 256 and saved["setup"]["output_stride"] == 16


def test_bench_command_measures_the_given_head_width_and_output_stride(report, tmp_path, capsys):
    args = ["bench", "--size", "32", "32", "--batch", "2", "--tasks", "1", "--warmup", "1", "--repeats", "1"]
    reports = {}
    for stride in (16, 8):
        path = tmp_path / f"os{stride}.json"
        assert cli.main([*args, "--head-channels", "32", "--output-stride", str(stride), "--json", str(path)]) == 0
        assert f"(output stride {stride}) DeepLabv3+ (32 channels)" in capsys.readouterr().out
        reports[stride] = json.loads(path.read_text())
        assert reports[stride]["setup"]["head_channels"] == 32 and reports[stride]["setup"]["output_stride"] == stride
    default = report  # the same size and batch, a 256-channel head
    for form in ("rc_ri_nff", "plain"):
        flops = {stride: report["train_step"][form]["flops_per_image"] for stride, report in reports.items()}
        # A 32-channel decoder: its 3x3 convs at stride 4 cost 1/64 of the default 256 channels' (304x256
        # and 256x256 -> 80x32 and 32x32 input x output channels).
        assert flops[16] < 0.5 * default["train_step"][form]["flops_per_image"]
        # Output stride 8 runs layer3 and layer4 dilated at twice the resolution: more FLOPs.
        assert flops[8] > 1.5 * flops[16]
    with pytest.raises(SystemExit) as exc:
        cli.main([*args, "--output-stride", "32"])
    assert exc.value.code == 2 and "--output-stride: invalid choice" in capsys.readouterr().err


def test_compiled_bench_times_compiled_networks_and_counts_the_same_flops(recorded_compile, tmp_path):
    """``--compile``: every timed network goes through ``torch.compile`` with the mode asked for, and the
    compiled objects are the ones that run (recorded here without tracing: see the fixture); FLOPs are
    counted on the eager networks, so they equal the eager run's."""
    setting = {"size": (32, 32), "batch": 2, "tasks": 2, "warmup": 1, "repeats": 1, "head_channels": 32}
    eager = bench_model(**setting)
    assert recorded_compile == []
    args = ["bench", "--size", "32", "32", "--batch", "2", "--tasks", "2", "--warmup", "1", "--repeats", "1"]
    args += ["--head-channels", "32", "--compile", "reduce-overhead", "--json", str(tmp_path / "compiled.json")]
    assert cli.main(args) == 0
    # deploy, the two plain networks, deploy_batched, the training form, deploy_bf16 (int8 runs eager); then the
    # two training models
    assert [c.mode for c in recorded_compile] == ["reduce-overhead"] * 8
    assert all(c.calls >= 2 for c in recorded_compile)  # the warm-up and the timed round
    compiled = json.loads((tmp_path / "compiled.json").read_text())
    assert compiled["setup"]["compile"] == "reduce-overhead" and eager["setup"]["compile"] is None
    for section in ("inference", "train_step"):
        assert set(compiled[section]) == set(eager[section])
        for name, run in compiled[section].items():
            assert run["flops_per_image"] == eager[section][name]["flops_per_image"], name
    with pytest.raises(ValueError, match="compile: expected true, false or one of"):
        bench_model(**TINY, compile="fastest")
    assert len(recorded_compile) == 8
