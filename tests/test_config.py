"""Config schema: canonical keys, validation errors naming the key and the file, --set overrides."""

import re
from pathlib import Path

import pytest
import yaml

from rcm_nddr.config import ConfigError, check_paths, load_config, save_config

REPO = Path(__file__).resolve().parents[1]
REPO_CONFIG = REPO / "configs" / "synthetic" / "semseg_RC_RI_NFF.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def runnable_configs() -> list[Path]:
    """Every shipped config except the ``_base_`` folders' fragments."""
    return sorted(p for p in (REPO / "configs").rglob("*.yaml") if "_base_" not in p.relative_to(REPO).parts)


def test_every_shipped_config_loads():
    files = runnable_configs()
    assert len(files) >= 80  # 75 <dataset>/<task>_<variant>.yaml, the incremental sequence, pretrain.yaml
    for path in files:
        cfg = load_config(path)
        assert cfg.tasks and cfg.source == str(path)
        assert "_base_" not in cfg.to_dict()
        # the dataset configs are small files on shared bases, and every base they name is shipped
        assert cfg.bases and all(Path(b).is_file() and "_base_" in Path(b).parts for b in cfg.bases)


def test_base_fragments_are_not_runnable_configs():
    bases = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "_base_" in p.relative_to(REPO).parts)
    assert {p.name for p in bases} >= {"single_task.yaml", "RC.yaml", "RC_RI_NFF_NDDR.yaml", "nyud.yaml"}
    for path in bases:
        with pytest.raises(ConfigError, match="key 'tasks': at least one task is required"):
            load_config(path)


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
    with pytest.raises(ConfigError, match=r"key 'backbone.weights': file w.pth does not exist") as info:
        check_paths(cfg)
    assert "`rcm-nddr pretrain --config CONFIG --out w.pth`" in str(info.value)  # how to make one


@pytest.mark.parametrize(
    ("dataset", "fix"),
    [("synthetic", "render SYNTH_MT there with `rcm-nddr data synth --out {root}`"), ("nyud", "docs/datasets.md")],
)
def test_a_missing_dataset_root_says_how_to_get_the_data(tmp_path, dataset, fix):
    root = tmp_path / "absent"
    cfg = load_config(write(tmp_path, f"tasks: [semseg]\ndataset: {{name: {dataset}, root: {root}}}\n"))
    with pytest.raises(ConfigError, match=r"key 'dataset.root': directory .*absent does not exist") as info:
        check_paths(cfg)
    assert fix.format(root=root) in str(info.value)


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
        ("Cityscapes", "cityscapes", (512, 512), {"semseg", "depth"}),
    ],
)
def test_real_dataset_configs_follow_the_rcm_protocol(folder, dataset, crop, tasks):
    variants = {
        "single_task": ("none", None, None, "none"),
        "decoder_only": ("none", None, None, "none"),
        "RA_series": ("ra_series", None, None, "none"),
        "RA_parallel": ("ra_parallel", None, None, "none"),
        "RC": ("rc", False, False, "none"),
        "RC_random": ("rc", False, False, "none"),
        "RC_RI": ("rc", True, False, "none"),
        "RC_RI_NFF": ("rc", True, True, "none"),
        "RC_RI_NFF_NDDR": ("rc", True, True, "nddr"),
    }
    weights = {"semseg": 1, "human_parts": 2, "depth": 1, "normals": 10, "edge": 50, "sal": 5}
    files = {p.stem for p in (REPO / "configs" / folder).glob("*.yaml") if "+" not in p.stem}
    assert files == {f"{t}_{v}" for t in tasks for v in variants}
    for task in tasks:
        for variant, (reparam, ri, nff, fusion) in variants.items():
            cfg = load_config(REPO / "configs" / folder / f"{task}_{variant}.yaml")
            assert cfg.backbone.train_encoder == ("none" if variant == "decoder_only" else "all")
            assert cfg.tasks == [task] and cfg.dataset.name == dataset and cfg.dataset.crop == crop
            assert cfg.dataset.scales == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0] and cfg.dataset.flip
            assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum) == ("sgd", 0.005, 0.9)
            assert cfg.optimizer.weight_decay == 1e-4 and (cfg.scheduler.name, cfg.scheduler.power) == ("poly", 0.9)
            assert cfg.train.batch_size == 8 and cfg.head.channels == 256 and cfg.backbone.arch == "resnet18"
            # the official code's head and precision: no ASPP dropout, N(0, 0.01) convs, fp32
            assert (cfg.head.dropout, cfg.head.init, cfg.train.amp) == (0.0, "normal", False)
            assert cfg.backbone.reparam == reparam and cfg.fusion.type == fusion
            if reparam == "rc":
                assert (cfg.backbone.ri, cfg.backbone.nff) == (ri, nff)
            # the paper's RC starts from the official ImageNet network pretrained in RC form
            rc_form = "models/resnet18_RC.pth"
            assert (cfg.backbone.weights == rc_form) == (variant == "RC"), (task, variant, cfg.backbone.weights)
            assert cfg.loss[task]["weight"] == weights[task]
            expected_iters = {"NYUD": 19875, "Cityscapes": 22320}.get(folder, 13020 if task == "human_parts" else 37500)
            assert cfg.train.max_iters == expected_iters
            if fusion == "nddr":
                assert (cfg.fusion.lr_mult, cfg.fusion.alpha, cfg.fusion.sources) == (100, 0.9, "all")


# ----------------------------------------------------------------------------- _base_ inheritance


def put(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_bases_merge_in_list_order_then_the_file_on_top(tmp_path):
    put(
        tmp_path / "a.yaml",
        "tasks: [semseg]\n"
        "train: {batch_size: 2, max_iters: 10, seed: 1}\n"
        "fusion: {stages: [stem, layer1, layer2]}\n"
        "dataset: {scales: [0.5, 1.0], crop: [64, 64]}\n"
        "optimizer: {name: adam, lr: 0.1}\n",
    )
    put(tmp_path / "b.yaml", "train: {batch_size: 4}\nfusion: {stages: [layer4]}\noptimizer: {lr: 0.2}\n")
    top = put(tmp_path / "run.yaml", "_base_: [a.yaml, b.yaml]\ntrain: {seed: 3}\ndataset: {scales: [1.0]}\n")
    cfg = load_config(top)
    assert cfg.tasks == ["semseg"]  # only in a base
    assert (cfg.train.batch_size, cfg.train.max_iters, cfg.train.seed) == (4, 10, 3)  # mappings merge key by key
    assert (cfg.optimizer.name, cfg.optimizer.lr) == ("adam", 0.2)  # the later base wins
    assert cfg.fusion.stages == ["layer4"]  # lists replace, never concatenate
    assert cfg.dataset.scales == [1.0] and cfg.dataset.crop == (64, 64)
    assert cfg.source == str(top) and cfg.bases == [str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]
    # the other order: the other base wins
    top.write_text("_base_: [b.yaml, a.yaml]\n")
    cfg = load_config(top)
    assert (cfg.train.batch_size, cfg.optimizer.lr, cfg.fusion.stages) == (2, 0.1, ["stem", "layer1", "layer2"])


def test_a_mapping_in_the_file_replaces_a_scalar_of_the_base_and_back(tmp_path):
    put(tmp_path / "base.yaml", "tasks: [edge]\nloss: {edge: {weight: 50, pos_weight: 0.9}}\n")
    top = put(tmp_path / "run.yaml", "_base_: base.yaml\nloss: {edge: {weight: 20}}\n")
    assert load_config(top).loss == {"edge": {"weight": 20, "pos_weight": 0.9}}
    top.write_text("_base_: base.yaml\ntasks: [depth]\nloss: {edge: null}\n")
    with pytest.raises(ConfigError, match=r"key 'loss.edge': expected"):  # replaced by null, not merged
        load_config(top)


def test_base_paths_are_relative_to_the_file_that_names_them(tmp_path, monkeypatch):
    put(tmp_path / "shared" / "dataset.yaml", "_base_: optim/sgd.yaml\ndataset: {crop: [32, 48]}\n")
    put(tmp_path / "shared" / "optim" / "sgd.yaml", "optimizer: {name: sgd, lr: 0.5}\n")
    top = put(tmp_path / "exp" / "deep" / "run.yaml", "_base_: ../../shared/dataset.yaml\ntasks: [depth]\n")
    monkeypatch.chdir(tmp_path / "exp")  # the working directory plays no part
    cfg = load_config(top)
    assert cfg.dataset.crop == (32, 48) and (cfg.optimizer.name, cfg.optimizer.lr) == ("sgd", 0.5)
    assert cfg.bases == [str(tmp_path / "shared" / "optim" / "sgd.yaml"), str(tmp_path / "shared" / "dataset.yaml")]
    # absolute paths work too
    top.write_text(f"_base_: [{tmp_path / 'shared' / 'optim' / 'sgd.yaml'}]\ntasks: [depth]\n")
    assert load_config(top).optimizer.lr == 0.5


def test_nested_bases_each_level_overrides_the_one_below(tmp_path):
    put(tmp_path / "l0.yaml", "tasks: [semseg]\ntrain: {max_iters: 1, batch_size: 1, seed: 1}\nhead: {channels: 8}\n")
    put(tmp_path / "l1.yaml", "_base_: l0.yaml\ntrain: {max_iters: 2, batch_size: 2}\n")
    put(tmp_path / "l2.yaml", "_base_: [l1.yaml]\ntrain: {max_iters: 3}\n")
    top = put(tmp_path / "run.yaml", "_base_: l2.yaml\nhead: {channels: 16}\n")
    cfg = load_config(top)
    assert (cfg.train.max_iters, cfg.train.batch_size, cfg.train.seed, cfg.head.channels) == (3, 2, 1, 16)
    assert [Path(b).name for b in cfg.bases] == ["l0.yaml", "l1.yaml", "l2.yaml"]


def test_a_base_named_twice_is_merged_twice_not_a_cycle(tmp_path):
    put(tmp_path / "common.yaml", "tasks: [semseg]\ntrain: {seed: 5}\n")
    put(tmp_path / "a.yaml", "_base_: common.yaml\ntrain: {seed: 6}\n")
    top = put(tmp_path / "run.yaml", "_base_: [a.yaml, common.yaml]\n")
    assert load_config(top).train.seed == 5  # common.yaml, merged again after a.yaml, wins


def test_set_overrides_apply_on_top_of_bases_and_file(tmp_path):
    put(tmp_path / "base.yaml", "tasks: [semseg]\ntrain: {max_iters: 10, batch_size: 2}\noptimizer: {lr: 0.1}\n")
    top = put(tmp_path / "run.yaml", "_base_: base.yaml\ntrain: {max_iters: 20}\n")
    cfg = load_config(top, ["train.max_iters=30", "optimizer.lr=0.3"])
    assert (cfg.train.max_iters, cfg.train.batch_size, cfg.optimizer.lr) == (30, 2, 0.3)
    assert cfg.source.startswith(str(top)) and "--set" in cfg.source
    with pytest.raises(ConfigError, match=r"with --set.*key 'train.batch_size': expected a positive integer"):
        load_config(top, ["train.batch_size=0"])  # an override's error names the command line, not the base


@pytest.mark.parametrize(
    ("files", "chain"),
    [
        ({"run.yaml": "_base_: run.yaml\n"}, ["run.yaml", "run.yaml"]),
        (
            {"run.yaml": "_base_: a.yaml\n", "a.yaml": "_base_: b.yaml\n", "b.yaml": "_base_: a.yaml\n"},
            ["a.yaml", "b.yaml", "a.yaml"],
        ),
        (
            {
                "run.yaml": "_base_: [ok.yaml, sub/a.yaml]\n",
                "ok.yaml": "tasks: [semseg]\n",
                "sub/a.yaml": "_base_: ../run.yaml\n",
            },
            ["run.yaml", "sub/a.yaml", "run.yaml"],
        ),
    ],
)
def test_a_cycle_of_bases_is_an_error_naming_the_chain(tmp_path, files, chain):
    for name, text in files.items():
        put(tmp_path / name, text)
    with pytest.raises(ConfigError, match="cycle") as info:
        load_config(tmp_path / "run.yaml")
    message = str(info.value)
    expected = " -> ".join(str((tmp_path / name).resolve()) for name in chain)
    assert expected in message and "key '_base_'" in message


def test_a_missing_base_names_the_file_that_references_it_and_the_missing_path(tmp_path):
    put(tmp_path / "run.yaml", "_base_: [shared/a.yaml]\ntasks: [semseg]\n")
    put(tmp_path / "shared" / "a.yaml", "_base_: ../nowhere/b.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "run.yaml")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'shared' / 'a.yaml'} (a base of {tmp_path / 'run.yaml'}): ")
    assert f"base config {tmp_path / 'nowhere' / 'b.yaml'} does not exist" in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", r"base\.yaml \(a base of .*run\.yaml\): expected a mapping at the top level, got list"),
        ("just text\n", r"base\.yaml \(a base of .*run\.yaml\): expected a mapping at the top level, got str"),
        ("tasks: [semseg\n", r"base\.yaml \(a base of .*run\.yaml\): not valid YAML"),
    ],
)
def test_a_base_that_is_not_a_mapping_names_the_base(tmp_path, text, message):
    put(tmp_path / "base.yaml", text)
    with pytest.raises(ConfigError, match=message):
        load_config(put(tmp_path / "run.yaml", "_base_: base.yaml\ntasks: [semseg]\n"))


def test_an_empty_base_is_an_empty_mapping(tmp_path):
    put(tmp_path / "base.yaml", "# nothing yet\n")
    assert load_config(put(tmp_path / "run.yaml", "_base_: base.yaml\ntasks: [sal]\n")).tasks == ["sal"]


@pytest.mark.parametrize("value", ["3", "{a: b.yaml}", "[a.yaml, 3]", "null", "''", "[[a.yaml]]"])
def test_base_of_the_wrong_type_is_an_error(tmp_path, value):
    put(tmp_path / "a.yaml", "tasks: [semseg]\n")
    path = put(tmp_path / "run.yaml", f"_base_: {value}\ntasks: [semseg]\n")
    with pytest.raises(ConfigError, match=r"key '_base_': expected a path or a list of paths") as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")


def test_base_is_a_top_level_key_only(tmp_path):
    put(tmp_path / "a.yaml", "train: {seed: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train._base_'"):
        load_config(put(tmp_path / "run.yaml", "tasks: [semseg]\ntrain: {_base_: a.yaml}\n"))


def test_errors_name_the_file_each_key_came_from(tmp_path):
    base = put(tmp_path / "shared" / "base.yaml", "tasks: [semseg]\ntrain: {max_iter: 5}\n")
    top = put(tmp_path / "run.yaml", "_base_: shared/base.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(top)
    assert str(info.value).startswith(f"{base} (a base of {top}): unknown key 'train.max_iter'")
    # a bad value in a base, nested two levels down
    put(tmp_path / "shared" / "deeper.yaml", "optimizer: {lr: fast}\n")
    base.write_text("_base_: deeper.yaml\ntasks: [semseg]\n")
    with pytest.raises(ConfigError) as info:
        load_config(top)
    assert str(info.value).startswith(f"{tmp_path / 'shared' / 'deeper.yaml'} (a base of {top}): key 'optimizer.lr'")
    # ... fixed in the file on top: the file on top wins, no error
    top.write_text("_base_: shared/base.yaml\noptimizer: {lr: 0.5}\n")
    assert load_config(top).optimizer.lr == 0.5
    # an error in the file on top names the file on top; cross-key rules name the key's file too
    base.write_text("tasks: [semseg]\ntrain: {seed: 1}\n")
    top.write_text("_base_: shared/base.yaml\ntrain: {bogus: 1}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(top))}: unknown key 'train.bogus'"):
        load_config(top)
    base.write_text("tasks: [semseg]\nloss: {depth: {weight: 1}}\n")
    top.write_text("_base_: shared/base.yaml\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(base))} \(a base of .*\): key 'loss.depth': not a task"):
        load_config(top)


def test_saved_config_of_a_config_with_bases_is_complete_and_has_no_base_key(tmp_path):
    put(tmp_path / "shared.yaml", "dataset: {crop: [40, 40]}\nloss: {edge: {weight: 50, pos_weight: 0.9}}\n")
    top = put(tmp_path / "run.yaml", "_base_: shared.yaml\ntasks: [edge]\ntrain: {max_iters: 7}\n")
    cfg = load_config(top, ["train.seed=4"])
    out = tmp_path / "runs" / "config.yaml"
    save_config(cfg, out)
    data = yaml.safe_load(out.read_text())
    assert "_base_" not in data and "bases" not in data and "source" not in data
    assert data == cfg.to_dict()
    # every key of the schema, defaults included, with the values from the base, the file and --set
    assert set(data) == {
        "store",
        "tasks",
        "plugins",
        "dataset",
        "backbone",
        "fusion",
        "head",
        "loss",
        "optimizer",
        "scheduler",
        "train",
        "test",
        "evaluation",
    }
    assert data["dataset"]["crop"] == [40, 40] and data["dataset"]["scales"] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    assert data["loss"] == {"edge": {"weight": 50, "pos_weight": 0.9}}
    assert (data["train"]["max_iters"], data["train"]["seed"]) == (7, 4)
    # it stands alone: moved away from its bases it loads to the same config
    alone = put(tmp_path / "elsewhere" / "config.yaml", out.read_text())
    assert load_config(alone).to_dict() == cfg.to_dict()


def test_shipped_saved_config_is_the_merged_result(tmp_path):
    path = REPO / "configs" / "synthetic" / "sal_RC_RI_NFF_NDDR.yaml"
    assert "_base_" in yaml.safe_load(path.read_text())
    cfg = load_config(path)
    save_config(cfg, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "_base_" not in data
    assert data["backbone"] == {
        "arch": "resnet18",
        "weights": "results/synthetic/resnet18_bank.pth",
        "output_stride": 16,
        "reparam": "rc",
        "ri": True,
        "nff": True,
        "decomposition": "results/synthetic/resnet18_bank_ri.safetensors",
        "train_encoder": "all",
        "sharing": "per_task",
        "shared_modulators": False,
        "init_from": None,
    }
    assert data["fusion"]["type"] == "nddr" and data["fusion"]["lr_mult"] == 1.0  # the file's own Adam setting
    assert data["optimizer"]["name"] == "adam" and data["loss"] == {"sal": {"weight": 5}}


def test_an_unknown_task_type_is_reported_first_with_the_closest_name():
    """A misspelt task is the root cause, not the loss weight that now names no task of the run."""
    with pytest.raises(ConfigError) as info:
        load_config(REPO_CONFIG, ["tasks=[segm]"])
    message = str(info.value)
    assert "key 'tasks': unknown task type 'segm' (did you mean 'semseg'?)" in message
    assert "loss.semseg" not in message and "plugins:" in message


def test_a_plugin_task_type_is_found_through_the_config_plugins(tmp_path):
    plugin = tmp_path / "shouting_semseg.py"
    plugin.write_text(
        "from rcm_nddr import TASKS\n"
        "from rcm_nddr.tasks.semseg import SemsegTask\n"
        "TASKS.register('shouting_semseg')(type('Shouting', (SemsegTask,), {}))\n"
    )
    cfg = load_config(REPO_CONFIG, ["tasks=[shouting_semseg]", "loss={}", f"plugins=[{plugin}]"])
    assert cfg.tasks == ["shouting_semseg"]
    with pytest.raises(ConfigError, match="unknown task type 'shouting_semsegg'"):
        load_config(REPO_CONFIG, ["tasks=[shouting_semsegg]", "loss={}", f"plugins=[{plugin}]"])


def test_the_fast_yaml_loader_reads_what_the_pure_python_safe_loader_reads():
    from rcm_nddr.yamlio import load_yaml

    texts = [p.read_text() for p in sorted((REPO / "configs").rglob("*.yaml"))]
    texts.append(  # the kinds of values a store.yaml and an override hold
        "schema: 2\ntasks:\n- name: semseg\n  files: {weights: tasks/semseg.safetensors}\n"
        "  metrics: {mIoU: 33.07, loss: .inf, when: 2026-01-02}\n  sources: [semseg, depth]\n"
        "  flags: [yes, no, on, null, ~, '0x1f', 0x1f, 1e-3, 1.0e-3, -0, '']\n"
    )
    for text in texts:
        assert load_yaml(text) == yaml.safe_load(text)
    with pytest.raises(yaml.YAMLError):
        load_yaml("a: [1, 2")
