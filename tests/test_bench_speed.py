"""``rcm-nddr bench`` (the model benchmark) on a tiny setting: the report's structure, its ratios, FLOP
counts that follow from the deploy form's construction, and the command line."""

from __future__ import annotations

import json

import pytest

from rcm_nddr import cli
from rcm_nddr.bench_speed import bench_model

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


def test_bench_command_prints_the_tables_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    args = ["bench", "--size", "32", "32", "--batch", "2", "--tasks", "2", "--warmup", "1", "--repeats", "1"]
    assert cli.main([*args, "--json", str(path), "--peak-tflops", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "| deploy_vs_plain_infer |" in out and "| rc_vs_plain_train_step |" in out
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
    }
