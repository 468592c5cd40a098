"""Config schema: canonical keys, validation errors naming the key and the file, --set overrides."""

from pathlib import Path

import pytest
import yaml

from rcm_nddr.config import ConfigError, check_paths, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_every_shipped_config_loads():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files
    for path in files:
        cfg = load_config(path)
        assert cfg.tasks and cfg.source == str(path)


def test_defaults_and_overrides(tmp_path):
    path = write(tmp_path, "tasks: [semseg]\ntrain: {batch_size: 4}\n")
    cfg = load_config(path, ["train.max_iters=7", "dataset.crop=[64, 96]", "optimizer.name=adamw"])
    assert cfg.train.max_iters == 7 and cfg.train.batch_size == 4
    assert cfg.dataset.crop == (64, 96)
    assert cfg.optimizer.name == "adamw"
    assert cfg.backbone.arch == "resnet18" and cfg.fusion.alpha == 0.9  # documented defaults
    assert isinstance(cfg.optimizer.lr, float)


def test_training_length_defaults_to_2000_iterations_and_epochs_excludes_it(tmp_path):
    assert load_config(write(tmp_path, "tasks: [depth]\n")).train.max_iters == 2000
    cfg = load_config(write(tmp_path, "tasks: [depth]\ntrain: {epochs: 3}\n"))
    assert cfg.train.epochs == 3 and cfg.train.max_iters is None
    with pytest.raises(ConfigError, match="train.max_iters' and 'train.epochs'"):
        load_config(write(tmp_path, "tasks: [depth]\ntrain: {epochs: 3, max_iters: 5}\n"))


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("tasks: [semseg]\ntrain: {max_iter: 5}\n", [], r"unknown key 'train.max_iter'"),
        ("tasks: [semseg]\nbogus: 1\n", [], r"unknown key 'bogus'"),
        ("tasks: [semseg]\ntrain: {max_iters: ten}\n", [], r"key 'train.max_iters': expected int"),
        ("tasks: [semseg]\nbackbone: {output_stride: 32}\n", [], r"key 'backbone.output_stride': expected 8 \| 16"),
        ("tasks: [semseg]\nbackbone: {ri: 1}\n", [], r"key 'backbone.ri': expected bool"),
        ("tasks: [semseg]\ndataset: {crop: [64]}\n", [], r"key 'dataset.crop'"),
        ("tasks: [semseg]\ndataset: {crop: [0, 64]}\n", [], r"key 'dataset.crop\[0\]'"),
        ("tasks: [semseg]\nloss: {depth: {weight: 1}}\n", [], r"key 'loss.depth': not a task of this run"),
        ("tasks: [semseg]\nloss: {semseg: {weight: -1}}\n", [], r"key 'loss.semseg.weight'"),
        ("tasks: []\n", [], r"key 'tasks'"),
        ("tasks: [semseg, semseg]\n", [], r"duplicate task names"),
        ("tasks: [semseg]\ntrain: {device: tpu}\n", [], r"key 'train.device'"),
        ("tasks: [semseg]\n", ["train.nope=1"], r"unknown key 'train.nope'"),
        ("tasks: [semseg]\n", ["train.batch_size"], r"expected key=value"),
        ("tasks: [semseg]\n", ["optimizer.lr=fast"], r"key 'optimizer.lr': expected float"),
        ("- just\n- a list\n", [], r"expected a mapping at the top level"),
        ("tasks: [semseg\n", [], r"not valid YAML"),
    ],
)
def test_bad_configs_name_the_key_and_the_file(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, overrides)
    assert str(path) in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_missing_files_name_the_key(tmp_path):
    cfg = load_config(write(tmp_path, f"tasks: [semseg]\ndataset: {{root: {tmp_path / 'absent'}}}\n"))
    with pytest.raises(ConfigError, match=r"key 'dataset.root': directory .*absent does not exist"):
        check_paths(cfg)
    (tmp_path / "data").mkdir()
    cfg = load_config(
        write(tmp_path, f"tasks: [semseg]\ndataset: {{root: {tmp_path / 'data'}}}\nbackbone: {{weights: w.pth}}\n")
    )
    with pytest.raises(ConfigError, match=r"key 'backbone.weights': file w.pth does not exist"):
        check_paths(cfg)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "tasks: [edge]\nloss: {edge: {weight: 50, pos_weight: 0.9}}\n"), ["train.seed=3"])
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    data = yaml.safe_load(out.read_text())
    assert data["train"]["seed"] == 3 and data["train"]["max_iters"] == 2000
    assert data["loss"]["edge"] == {"weight": 50, "pos_weight": 0.9}
    again = load_config(out)
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    ("folder", "dataset", "crop", "tasks"),
    [
        ("NYUD", "nyud", (425, 560), {"semseg", "depth", "normals", "edge"}),
        ("PascalContext", "pascal", (512, 512), {"semseg", "human_parts", "normals", "sal", "edge"}),
    ],
)
def test_real_dataset_configs_follow_the_rcm_protocol(folder, dataset, crop, tasks):
    variants = {
        "single_task": ("none", None, None, "none"),
        "RC": ("rc", False, False, "none"),
        "RC_RI": ("rc", True, False, "none"),
        "RC_RI_NFF": ("rc", True, True, "none"),
        "RC_RI_NFF_NDDR": ("rc", True, True, "nddr"),
    }
    weights = {"semseg": 1, "human_parts": 2, "depth": 1, "normals": 10, "edge": 50, "sal": 5}
    files = {p.stem for p in (REPO / "configs" / folder).glob("*.yaml")}
    assert files == {f"{t}_{v}" for t in tasks for v in variants}
    for task in tasks:
        for variant, (reparam, ri, nff, fusion) in variants.items():
            cfg = load_config(REPO / "configs" / folder / f"{task}_{variant}.yaml")
            assert cfg.tasks == [task] and cfg.dataset.name == dataset and cfg.dataset.crop == crop
            assert cfg.dataset.scales == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0] and cfg.dataset.flip
            assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum) == ("sgd", 0.005, 0.9)
            assert cfg.optimizer.weight_decay == 1e-4 and (cfg.scheduler.name, cfg.scheduler.power) == ("poly", 0.9)
            assert cfg.train.batch_size == 8 and cfg.head.channels == 256 and cfg.backbone.arch == "resnet18"
            assert cfg.backbone.reparam == reparam and cfg.fusion.type == fusion
            if reparam == "rc":
                assert (cfg.backbone.ri, cfg.backbone.nff) == (ri, nff)
            assert cfg.loss[task]["weight"] == weights[task]
            expected_iters = 19875 if folder == "NYUD" else (13020 if task == "human_parts" else 37500)
            assert cfg.train.max_iters == expected_iters
            if fusion == "nddr":
                assert (cfg.fusion.lr_mult, cfg.fusion.alpha, cfg.fusion.sources) == (100, 0.9, "all")
