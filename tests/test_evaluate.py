"""Saved predictions: the file layout, `rcm-nddr evaluate`, `test.py --save-predictions` (both agree on
the same predictions, padding cropped), Delta_MTL against recorded baselines, dataset options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_run
from PIL import Image

from rcm_nddr.commands import cli
from rcm_nddr.commands.evaluate import EvaluateError, evaluate_folder
from rcm_nddr.config import ConfigError, load_config, save_config
from rcm_nddr.data import MultiTaskFolder
from rcm_nddr.data.synthetic import generate
from rcm_nddr.engine.builders import build_dataset
from rcm_nddr.engine.provenance import config_sha256
from rcm_nddr.engine.saved import PredictionError, load_prediction, prediction_path, save_prediction
from rcm_nddr.engine.tester import run_test
from rcm_nddr.engine.trainer import Trainer
from rcm_nddr.registry import TASKS, discover

TASK_NAMES = ("semseg", "parts", "depth", "normals", "edge", "sal")


def make_task(name: str, dataset: MultiTaskFolder):
    discover()
    return TASKS.get(name)(name, dataset.info)


@pytest.fixture
def layout(tiny_layout: Path) -> Path:
    """The tiny layout with one-pixel-wide edges (as real datasets store them), so a perfect edge map
    survives the metric's thinning unchanged."""
    for path in (tiny_layout / "edge").glob("*.png"):
        h, w = np.array(Image.open(path)).shape
        edge = np.zeros((h, w), np.uint8)
        edge[h // 2, 2:-2] = 255
        edge[2:-2, w // 3] = 255
        Image.fromarray(edge, "L").save(path)
    return tiny_layout


def perfect(task_name: str, target: torch.Tensor) -> torch.Tensor:
    """A prediction equal to the ground truth where it is valid (anything plausible elsewhere)."""
    if task_name in ("semseg", "parts"):
        return torch.where(target == 255, 0, target)
    if task_name in ("edge", "sal"):
        return torch.where(target == 255, 0.0, target)
    if task_name == "normals":
        invalid = target.abs().sum(0, keepdim=True) == 0
        return torch.where(invalid, torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1), target)
    return target.clone()


def write_predictions(root: Path, out: Path, task_name: str, change=None) -> MultiTaskFolder:
    dataset = MultiTaskFolder(root, "val", [task_name])
    task = make_task(task_name, dataset)
    for i in range(len(dataset)):
        sample = dataset.load(i)
        value = perfect(task_name, sample[task_name])
        save_prediction(task, change(value) if change else value, prediction_path(out, sample["meta"]["id"], task))
    return dataset


# ----------------------------------------------------------------------------- file layout


def test_saved_prediction_files_have_the_ground_truths_layout(tmp_path, layout):
    dataset = MultiTaskFolder(layout, "val", list(TASK_NAMES))
    sample = dataset.load(0)
    h, w = sample["meta"]["size"]
    expected = {
        "semseg": ((h, w), np.uint8),
        "parts": ((h, w), np.uint8),
        "depth": ((h, w), np.float32),
        "normals": ((h, w, 3), np.float32),
        "edge": ((h, w), np.float32),
        "sal": ((h, w), np.float32),
    }
    for name in TASK_NAMES:
        task = make_task(name, dataset)
        value = perfect(name, sample[name])
        path = prediction_path(tmp_path, "a/b", task)  # ids may hold folders (Cityscapes)
        save_prediction(task, value, path)
        assert path.name == "b" + (".png" if name in ("semseg", "parts") else ".npy")
        array = np.array(Image.open(path)) if path.suffix == ".png" else np.load(path)
        assert (array.shape, array.dtype) == expected[name], name
        back = load_prediction(task, path)
        assert torch.equal(back, value.to(back.dtype)), name


def test_bad_prediction_files_are_named(tmp_path, layout):
    dataset = MultiTaskFolder(layout, "val", ["depth"])
    task = make_task("depth", dataset)
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.int32))
    with pytest.raises(PredictionError, match=r"x\.npy.*dtype int32"):
        load_prediction(task, tmp_path / "x.npy")
    (tmp_path / "y.npy").write_bytes(b"not numpy")
    with pytest.raises(PredictionError, match=r"bad prediction .*y\.npy"):
        load_prediction(task, tmp_path / "y.npy")
    with pytest.raises(PredictionError, match=r"missing prediction .*z\.npy"):
        load_prediction(task, tmp_path / "z.npy")


# ----------------------------------------------------------------------------- rcm-nddr evaluate


@pytest.mark.parametrize(
    ("task_name", "key", "value"),
    [
        ("semseg", "mIoU", 100.0),
        ("semseg", "pixel_acc", 100.0),
        ("parts", "mIoU", 100.0),
        ("depth", "rmse", 0.0),
        ("normals", "mean", 0.0),
        ("normals", "median", 0.005),  # the histogram's first bin centre
        ("edge", "odsF", 100.0),
        ("edge", "oisF", 100.0),
        ("sal", "maxF", 100.0),
        ("sal", "mIoU", 100.0),
    ],
)
def test_perfect_saved_predictions_score_perfectly(tmp_path, layout, task_name, key, value):
    write_predictions(layout, tmp_path / "pred", task_name)
    result = evaluate_folder("synthetic", str(layout), "val", task_name, str(tmp_path / "pred"), progress=False)
    assert result["samples"] == 2
    assert result["metrics"][key] == pytest.approx(value, abs=1e-4)


def test_known_errors_give_hand_computed_scores(tmp_path, layout):
    # depth off by exactly 1 m on every valid pixel: RMSE 1
    write_predictions(layout, tmp_path / "depth", "depth", change=lambda d: d + 1.0)
    depth = evaluate_folder("synthetic", str(layout), "val", "depth", str(tmp_path / "depth"), progress=False)
    assert depth["metrics"]["rmse"] == pytest.approx(1.0, rel=1e-6)
    # normals rotated by 90 degrees about an axis perpendicular to each of them: every angle is 90
    write_predictions(
        layout, tmp_path / "normals", "normals", change=lambda n: torch.cross(n, _perpendicular(n), dim=0)
    )
    normals = evaluate_folder("synthetic", str(layout), "val", "normals", str(tmp_path / "normals"), progress=False)
    assert normals["metrics"]["mean"] == pytest.approx(90.0, abs=1e-3)
    assert normals["metrics"]["22.5"] == 0.0


def _perpendicular(n: torch.Tensor) -> torch.Tensor:
    """A unit vector field perpendicular to ``n`` (3 x H x W); zero where ``n`` is zero."""
    helper = torch.zeros_like(n)
    helper[0] = 1.0
    p = torch.cross(n, helper, dim=0)
    return p / p.norm(dim=0, keepdim=True).clamp_min(1e-12) * (n.abs().sum(0, keepdim=True) > 0)


def test_evaluate_command_prints_text_and_json_and_finds_task_subfolders(tmp_path, layout, capsys):
    write_predictions(layout, tmp_path / "pred" / "semseg", "semseg")
    base = ["evaluate", "--dataset", "synthetic", "--root", str(layout), "--task", "semseg", "--quiet"]
    assert cli.main([*base, "--pred", str(tmp_path / "pred"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["mIoU"] == 100.0 and result["split"] == "val" and result["task"] == "semseg"
    assert cli.main([*base, "--pred", str(tmp_path / "pred" / "semseg")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("semseg on synthetic val (2 samples") and "mIoU" in out and "100.0000" in out


def test_evaluate_command_errors_name_what_is_wrong(tmp_path, layout, capsys):
    dataset = write_predictions(layout, tmp_path / "pred", "semseg")
    base = ["evaluate", "--dataset", "synthetic", "--root", str(layout), "--quiet"]

    def error(*args: str) -> str:
        assert cli.main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err

    first = dataset.ids[0]
    (tmp_path / "pred" / f"{first}.png").unlink()
    assert f"1 of 2 predictions missing in {tmp_path / 'pred'}" in error(
        "--task", "semseg", "--pred", str(tmp_path / "pred")
    )
    Image.fromarray(np.zeros((3, 3), np.uint8), "L").save(tmp_path / "pred" / f"{first}.png")
    assert "shape (3, 3) but the ground truth" in error("--task", "semseg", "--pred", str(tmp_path / "pred"))
    h, w = dataset.load(0)["meta"]["size"]
    Image.fromarray(np.full((h, w), 9, np.uint8), "L").save(tmp_path / "pred" / f"{first}.png")
    assert "predicted labels must lie in [0, 4)" in error("--task", "semseg", "--pred", str(tmp_path / "pred"))
    assert "unknown task type 'nope'" in error("--task", "nope", "--pred", str(tmp_path / "pred"))
    assert "unknown dataset 'nope'" in error("--dataset", "nope", "--task", "semseg", "--pred", str(tmp_path))
    assert "--task-option" in error("--task", "edge", "--pred", str(tmp_path), "--task-option", "colour=red")
    assert "--option" in error("--task", "semseg", "--pred", str(tmp_path), "--option", "classes=7")
    assert "does not exist" in error("--task", "semseg", "--pred", str(tmp_path / "missing"))


def test_option_parsing():
    from rcm_nddr.commands.evaluate import parse_options

    assert parse_options(["classes=7", "max_dist=0.01", "matching=distance"], "--option") == {
        "classes": 7,
        "max_dist": 0.01,
        "matching": "distance",
    }
    with pytest.raises(EvaluateError, match="expected key=value"):
        parse_options(["classes"], "--option")


# ----------------------------------------------------------------------------- test.py


@pytest.fixture(scope="module")
def trained(module_tmp):
    """A 2-iteration run of five tasks on a 40 x 44 SYNTH_MT, validated on 48 x 48 padded images, its
    checkpoints kept."""
    root = module_tmp
    data = generate(root / "SYNTH_MT", 4, 3, size=(40, 44), seed=3, progress=False)
    overrides = tiny_run(
        root / "store",
        data,
        "[semseg, depth, normals, edge, sal]",
        "optimizer.name=adam",
        "train.max_iters=2",
        "train.val_every=2",
        "test.batch_size=2",
        "train.keep_checkpoints=true",  # the tests evaluate the run's checkpoints
    )
    cfg = load_config(None, overrides)
    Trainer(cfg, progress=False).run()
    return cfg, data


def test_test_py_saved_predictions_score_the_same_with_evaluate(tmp_path, trained):
    cfg, data = trained
    metrics = run_test(cfg, checkpoint="last", progress=False, save_predictions=tmp_path / "pred")
    for name in cfg.tasks:
        files = sorted((tmp_path / "pred" / name).iterdir())
        assert len(files) == 3
        if files[0].suffix == ".npy":
            assert np.load(files[0]).shape[:2] == (40, 44)  # the original size, padding cropped
        result = evaluate_folder("synthetic", str(data), "val", name, str(tmp_path / "pred"), progress=False)
        assert result["metrics"].keys() == metrics[name].keys()
        for key, value in metrics[name].items():
            assert result["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-9, nan_ok=True), (name, key)


def test_metrics_do_not_see_the_validation_padding(layout):
    """Padded validation batches score as the samples at their own size: the edge tolerance uses the
    image's own diagonal, and nothing in the padding counts."""
    from torch.utils.data import DataLoader

    from rcm_nddr.data.transforms import build_transforms
    from rcm_nddr.engine.evaluate import update_unpadded

    names = ["semseg", "depth", "normals", "edge", "sal"]
    plain = MultiTaskFolder(layout, "val", names)
    padded = MultiTaskFolder(layout, "val", names, transform=build_transforms(False, (40, 40)))
    tasks = {name: make_task(name, plain) for name in names}
    # a tolerance of 1.2 px at 12 x 16 (diagonal 20), 3.4 px at 40 x 40
    tasks["edge"] = TASKS.get("edge")("edge", plain.info, max_dist=0.06)
    generator = torch.Generator().manual_seed(0)

    def noisy(name: str, target: torch.Tensor) -> torch.Tensor:
        value = perfect(name, target)
        if name == "edge":  # edges 2 px off: out of tolerance at the image's own size
            return torch.roll(value, 2, dims=-2)
        if value.dtype.is_floating_point:
            return (value + 0.3 * torch.rand(value.shape, generator=generator)).clamp(0, 1 if name != "depth" else 9)
        return torch.where(torch.rand(value.shape, generator=generator) < 0.3, 1, value)

    reference = {name: task.metric() for name, task in tasks.items()}
    predictions = {name: [] for name in names}
    for i in range(len(plain)):
        sample = plain.load(i)
        for name in names:
            value = noisy(name, sample[name])
            predictions[name].append(value)
            reference[name].update(value[None], sample[name][None])

    (batch,) = DataLoader(padded, batch_size=2)
    assert batch["image"].shape[-2:] == (40, 40)
    padded_predictions = {}
    for name in names:
        # garbage in the padding: 1s for the maps, class 1 for semseg
        canvas = torch.ones(2, *batch[name].shape[1:], dtype=predictions[name][0].dtype)
        for i, value in enumerate(predictions[name]):
            canvas[i, ..., : value.shape[-2], : value.shape[-1]] = value
        padded_predictions[name] = canvas
    cropped = {name: task.metric() for name, task in tasks.items()}
    update_unpadded(cropped, tasks, padded_predictions, batch)
    naive = tasks["edge"].metric()
    naive.update(padded_predictions["edge"], batch["edge"])
    for name in names:
        assert cropped[name].compute() == pytest.approx(reference[name].compute(), nan_ok=True), name
    # the crop matters: on the padded canvas the tolerance is that of the 40 x 40 diagonal
    assert naive.compute() != pytest.approx(reference["edge"].compute())


def test_delta_mtl_against_baselines_from_json_and_from_a_store(tmp_path, trained):
    cfg, _ = trained
    metrics = run_test(cfg, checkpoint="last", progress=False)
    # baselines 10% better than the run on every task: each term is -10/110 or -10/90 percent...
    base = {
        "semseg": {"mIoU": metrics["semseg"]["mIoU"] * 2},  # higher is better: (M - 2M) / 2M = -50%
        "depth": {"rmse": metrics["depth"]["rmse"] / 2},  # lower is better: -(M - M/2) / (M/2) = -100%
        "normals": {"mean": metrics["normals"]["mean"]},  # 0%
        "edge": {"odsF": metrics["edge"]["odsF"] / 2},  # +100%
        "sal": {"maxF": metrics["sal"]["maxF"] * 4},  # -75%
    }
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps(base))
    run_test(cfg, checkpoint="last", progress=False, baselines=path)
    report = json.loads((Path(cfg.store) / "runs" / cfg.group_name / "test_metrics.json").read_text())["delta_mtl"]
    expected = {"semseg": -50.0, "depth": -100.0, "normals": 0.0, "edge": 100.0, "sal": -75.0}
    assert report["per_task"] == pytest.approx(expected)
    assert report["value"] == pytest.approx(sum(expected.values()) / 5)
    assert report["source"] == str(path) and report["primary"]["depth"] == "rmse"

    # a store: the run's own store holds the group's validation metrics, so Delta_MTL against itself is 0
    # (the store's metrics are those of the best checkpoint; compare the same checkpoint, in the same form)
    own = run_test(cfg, checkpoint="best", progress=False, baselines=cfg.store, form="training")
    assert own.keys() == set(cfg.tasks)
    report = json.loads((Path(cfg.store) / "runs" / cfg.group_name / "test_metrics.json").read_text())["delta_mtl"]
    assert report["value"] == pytest.approx(0.0, abs=1e-9)

    # errors name the source and what is missing, before any evaluation
    path.write_text(json.dumps({"semseg": {"mIoU": 1.0}}))
    with pytest.raises(ConfigError, match=r"baselines\.json has no result for task\(s\) depth, normals, edge, sal"):
        run_test(cfg, checkpoint="last", progress=False, baselines=path)
    path.write_text(json.dumps({name: {"other": 1.0} for name in cfg.tasks}))
    with pytest.raises(ConfigError, match="task 'semseg' has no numeric 'mIoU'"):
        run_test(cfg, checkpoint="last", progress=False, baselines=path)
    with pytest.raises(ConfigError, match="neither a model store"):
        run_test(cfg, checkpoint="last", progress=False, baselines=tmp_path / "nothing")


def test_test_py_command_line_saves_predictions_and_reports_delta(tmp_path, trained, capsys):
    cfg, _ = trained
    metrics = run_test(cfg, checkpoint="last", progress=False)
    (tmp_path / "b.json").write_text(json.dumps(metrics))
    config = tmp_path / "run.yaml"
    save_config(cfg, config)
    args = ["--config", str(config), "--checkpoint", "last", "--quiet"]
    code = cli.test_main([*args, "--save-predictions", str(tmp_path / "p"), "--baselines", str(tmp_path / "b.json")])
    assert code == 0
    assert {p.name for p in (tmp_path / "p").iterdir()} == {*cfg.tasks, "env.json"}
    report = json.loads((Path(cfg.store) / "runs" / cfg.group_name / "test_metrics.json").read_text())
    assert report["delta_mtl"]["value"] == pytest.approx(0.0, abs=1e-9)
    # the environment that produced the predictions and the metrics, the same in both places
    environment = json.loads((tmp_path / "p" / "env.json").read_text())
    assert environment["config"]["sha256"] == report["environment"]["config"]["sha256"]
    assert environment["config"]["sha256"] == config_sha256(load_config(config, []))
    assert environment["seed"] == cfg.train.seed


# ----------------------------------------------------------------------------- dataset options


def test_dataset_options_are_checked_against_the_dataset_class(tmp_path, layout):
    cfg = load_config(None, [f"dataset.root={layout}", "tasks=[semseg]", "dataset.options={classes: 7}"])
    with pytest.raises(
        ConfigError, match=r"key 'dataset.options' of dataset 'synthetic':.*classes.*it takes: no options"
    ):
        build_dataset(cfg, "val", train=False)
