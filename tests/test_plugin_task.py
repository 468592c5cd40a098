"""A task type with a new target key, defined in one plug-in file named by a config's ``plugins:``: the
generic folder dataset reads its target without a dataset subclass, it trains with ``train.py`` and
predicts with ``rcm-nddr predict``; a plug-in's mistakes are one clear error before a store is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rcm_nddr import ModelStore
from rcm_nddr.commands import cli
from rcm_nddr.data import NYUDMT, MultiTaskFolder, build_transforms, check_target_keys, check_targets
from rcm_nddr.data.folder import DatasetError
from rcm_nddr.data.synthetic import generate
from rcm_nddr.data.targets import TARGET_KEYS
from rcm_nddr.registry import TASKS, RegistryError, discover, import_plugin

# The complete plug-in of the README's "Adding a task type": per-pixel brightness in [0, 1], a target
# key of its own read from <root>/brightness/<id>.npy, bilinear resampling and -1 as the pad value.
BRIGHTNESS_PLUGIN = '''
"""Per-pixel brightness regression: a task type and its target key in one file."""

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rcm_nddr.data.targets import register_target
from rcm_nddr.registry import TASKS
from rcm_nddr.task import Metric, Task, TrivialPredictor

PAD = -1.0  # padded pixels carry no target


@register_target(
    "brightness",
    extensions=(".npy",),
    interpolation="bilinear",
    pad_value=PAD,
    layout="float32 H x W brightness in [0, 1]",
)
def read_brightness(path: Path) -> Tensor:
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2 or array.dtype != np.float32:
        raise ValueError(f"array of shape {array.shape} and dtype {array.dtype}, expected float32 H x W")
    return torch.from_numpy(array).unsqueeze(0)  # 1 x H x W


class MeanAbsoluteError(Metric):
    primary = "mae"
    higher_is_better = False
    state = ("total", "count")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, prediction: Tensor, target: Tensor) -> None:
        valid = target >= 0
        self.total += float((prediction - target).abs()[valid].sum())
        self.count += int(valid.sum())

    def compute(self) -> dict[str, float]:
        return {"mae": self.total / max(self.count, 1)}


class MeanBrightness(TrivialPredictor):
    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def fit(self, target: Tensor) -> None:
        self.total += float(target[target >= 0].sum())
        self.count += int((target >= 0).sum())

    def predict(self, target: Tensor) -> Tensor:
        return torch.full_like(target, self.total / max(self.count, 1))


@TASKS.register("brightness")
class BrightnessTask(Task):
    """Brightness in [0, 1] per pixel; target float 1 x H x W, -1 = no target."""

    target_key = "brightness"

    @property
    def out_channels(self) -> int:
        return 1

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        valid = target >= 0
        error = torch.where(valid, (torch.sigmoid(output.float()) - target).abs(), 0)
        return error.sum() / valid.sum().clamp_min(1)

    def postprocess(self, output: Tensor) -> Tensor:
        return torch.sigmoid(output.float())

    def metric(self) -> MeanAbsoluteError:
        return MeanAbsoluteError()

    def visualize(self, value: Tensor) -> Tensor:
        grey = (value.clamp(0, 1) * 255).round().to(torch.uint8)
        return grey.expand(3, -1, -1).clone()

    def trivial(self) -> MeanBrightness:
        return MeanBrightness()
'''

# Mistake 1: the task type's target key is never registered.
UNREGISTERED_PLUGIN = """
from rcm_nddr.registry import TASKS

from {module} import BrightnessTask


@TASKS.register("sharpness")
class SharpnessTask(BrightnessTask):
    target_key = "sharpness"
"""

# Mistakes 2 and 3: registered keys whose reader returns a map of the wrong size, or whose flip rule fails.
BAD_READER_PLUGIN = """
import numpy as np
import torch

from rcm_nddr.data.targets import register_target
from rcm_nddr.registry import TASKS

from {module} import BrightnessTask


@register_target("contrast", folder="brightness", pad_value=-1.0)
def read_contrast(path):
    return torch.from_numpy(np.load(path)[::2, ::2]).unsqueeze(0)  # half the image's size: a bug


@TASKS.register("contrast")
class ContrastTask(BrightnessTask):
    target_key = "contrast"


def broken_flip(value):
    raise RuntimeError("flip rule bug")


@register_target("glare", folder="brightness", pad_value=-1.0, on_flip=broken_flip)
def read_glare(path):
    return torch.from_numpy(np.load(path)).unsqueeze(0)


@TASKS.register("glare")
class GlareTask(BrightnessTask):
    target_key = "glare"
"""

SIZE = (48, 48)


@pytest.fixture(scope="module")
def plugins(tmp_path_factory) -> dict[str, Path]:
    """The plug-in files. A file is imported once per process; the brightness plug-in here, as the
    mistaken ones build on its task type; the others by the first config or test that names them."""
    folder = tmp_path_factory.mktemp("plugins")
    brightness = folder / "brightness_task.py"
    brightness.write_text(BRIGHTNESS_PLUGIN)
    import_plugin(str(brightness))
    # the mistaken plug-ins build on the brightness task type, imported under its generated module name
    module = TASKS.get("brightness").__module__
    files = {"brightness": brightness}
    for name, source in (("unregistered", UNREGISTERED_PLUGIN), ("bad_reader", BAD_READER_PLUGIN)):
        files[name] = folder / f"{name}_task.py"
        files[name].write_text(source.format(module=module))
    return files


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A SYNTH_MT dataset with a brightness target beside the built-in ones: the mean of the RGB image."""
    root = generate(tmp_path_factory.mktemp("data") / "SYNTH_MT", 4, 2, size=SIZE, seed=1, progress=False)
    (root / "brightness").mkdir()
    for image in sorted((root / "images").glob("*.png")):
        with Image.open(image) as im:
            rgb = np.asarray(im, dtype=np.float32)
        np.save(root / "brightness" / f"{image.stem}.npy", (rgb.mean(axis=-1) / 255).astype(np.float32))
    return root


def write_config(tmp_path: Path, data: Path, task: str, plugin: Path) -> Path:
    config = tmp_path / f"{task}.yaml"
    config.write_text(
        f"store: {tmp_path / 'store'}\n"
        f"tasks: [{task}]\n"
        f"plugins: [{plugin}]\n"
        f"dataset: {{name: synthetic, root: {data}, crop: [{SIZE[0]}, {SIZE[1]}]}}\n"
    )
    return config


def train(config: Path) -> int:
    overrides = [
        "backbone.weights=none",
        "head.channels=8",
        "train.batch_size=2",
        "train.num_workers=0",
        "train.device=cpu",
        "train.max_iters=2",
        "train.val_every=2",
        "test.batch_size=2",
    ]
    return cli.train_main(["--config", str(config), "--quiet", *(a for o in overrides for a in ("--set", o))])


def test_the_folder_dataset_reads_a_registered_key_with_its_transform_rule(plugins, synth):
    entry = TARGET_KEYS.get("brightness")
    assert entry.reader.folder == "brightness" and str(plugins["brightness"]) in entry.origin
    raw = MultiTaskFolder(synth, "val", ["brightness", "depth"])[0]
    expected = np.load(synth / "brightness" / "000004.npy")
    assert torch.equal(raw["brightness"], torch.from_numpy(expected)[None])
    # validation padding fills the key's pad value; training crops keep it beside the image
    padded = MultiTaskFolder(synth, "val", ["brightness"], transform=build_transforms(False, (52, 50)))[0]
    assert padded["brightness"].shape == (1, 52, 50)
    assert (padded["brightness"][:, 48:] == -1).all() and (padded["brightness"][:, :, 48:] == -1).all()
    train_set = MultiTaskFolder(synth, "train", ["brightness"], transform=build_transforms(True, (32, 32)))
    assert train_set[(0, 5)]["brightness"].shape == (1, 32, 32)
    # bilinear: a zoom blends neighbouring values instead of copying them
    zoomed = build_transforms(True, SIZE, scales=(2.0,), flip=False)
    zoomed_value = zoomed({"brightness": raw["brightness"]}, torch.Generator().manual_seed(0))["brightness"]
    assert not set(zoomed_value.unique().tolist()) <= set(raw["brightness"].unique().tolist())
    # a dataset with a layout of its own reads a registered key where the key's folder exists
    assert torch.equal(NYUDMT(synth, "val", ["brightness", "depth"])[0]["brightness"], raw["brightness"])
    task = TASKS.get("brightness")("brightness", train_set.info)
    torch.manual_seed(0)
    expected_draw = torch.rand(1)
    torch.manual_seed(0)
    check_targets({"brightness": task}, train_set)
    assert torch.equal(torch.rand(1), expected_draw)  # the check leaves the run's random stream alone


def test_every_built_in_task_type_reads_a_registered_key():
    discover([])
    builtin = ("semseg", "parts", "human_parts", "depth", "normals", "edge", "sal")
    check_target_keys({name: TASKS.get(name) for name in builtin})


def test_a_single_file_plugin_task_trains_and_predicts(tmp_path, plugins, synth):
    assert train(write_config(tmp_path, synth, "brightness", plugins["brightness"])) == 0
    store = ModelStore(tmp_path / "store")
    assert [record.name for record in store.tasks] == ["brightness"]
    metrics = json.loads((tmp_path / "store" / "runs" / "brightness" / "metrics.json").read_text())
    assert "mae" in json.dumps(metrics)

    images = tmp_path / "images"
    images.mkdir()
    with Image.open(synth / "images" / "000005.png") as im:
        im.save(images / "room.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(images / "noise.png")
    out = tmp_path / "predictions"
    argv = ["predict", "--store", str(tmp_path / "store"), "--images", str(images), "--out", str(out)]
    assert cli.main([*argv, "--device", "cpu", "--quiet"]) == 0
    for stem, size in (("room", SIZE), ("noise", (40, 56))):
        prediction = np.load(out / "brightness" / f"{stem}.npy")
        assert prediction.shape == (1, *size) and prediction.dtype == np.float32
        assert ((prediction >= 0) & (prediction <= 1)).all()
        with Image.open(out / "brightness" / f"{stem}.png") as im:
            assert im.mode == "RGB" and im.size == (size[1], size[0])
    # In a fresh process the store's plug-in is imported only when the user allows it.
    fresh = [sys.executable, "-m", "rcm_nddr", *argv[:-2], "--out", str(tmp_path / "fresh"), "--device", "cpu"]
    refused = subprocess.run(fresh, capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("error:") == 1, refused.stderr
    assert f"registered by plug-in(s) ['{plugins['brightness']}']" in refused.stderr
    assert f"--allow-plugins {plugins['brightness']}" in refused.stderr and not (tmp_path / "fresh").exists()
    allowed = subprocess.run([*fresh, "--allow-plugins", str(plugins["brightness"])], capture_output=True, cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr.decode()
    room = "brightness/room.npy"
    assert np.array_equal(np.load(tmp_path / "fresh" / room), np.load(out / room))


def test_an_unregistered_target_key_is_one_error_before_anything_is_written(tmp_path, plugins, synth, capsys):
    assert train(write_config(tmp_path, synth, "sharpness", plugins["unregistered"])) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and "Traceback" not in error
    for part in ("'sharpness' is not a registered target key", "SharpnessTask", str(plugins["unregistered"])):
        assert part in error
    assert "register_target('sharpness'" in error
    assert not (tmp_path / "store").exists()
    # the same mistake found from the task types alone
    with pytest.raises(RegistryError, match="sample key 'sharpness', which is not a registered target key") as err:
        check_target_keys({"sharpness": TASKS.get("sharpness")})
    assert str(plugins["unregistered"]) in str(err.value) and "@register_target('sharpness'" in str(err.value)


def test_check_targets_catches_a_reader_of_the_wrong_size(plugins, synth):
    import_plugin(str(plugins["bad_reader"]))
    dataset = MultiTaskFolder(synth, "train", ["contrast"], transform=build_transforms(True, (32, 32)))
    with pytest.raises(DatasetError, match=r"contrast.*differs from the image's"):
        check_targets({"contrast": TASKS.get("contrast")}, dataset)


def test_a_reader_of_the_wrong_size_fails_before_the_store_is_created(tmp_path, plugins, synth, capsys):
    assert train(write_config(tmp_path, synth, "contrast", plugins["bad_reader"])) == 2
    assert "differs from the image's" in capsys.readouterr().err
    assert not (tmp_path / "store" / "store.yaml").exists()


def test_check_targets_names_a_broken_transform_rule_and_a_target_the_dataset_lacks(plugins, synth):
    import_plugin(str(plugins["bad_reader"]))
    task = {"glare": TASKS.get("glare")}
    with pytest.raises(DatasetError, match=r"fails the joint transforms \(RuntimeError: flip rule bug\)") as err:
        check_targets(task, MultiTaskFolder(synth, "val", ["glare"]))
    assert str(plugins["bad_reader"]) in str(err.value)
    with pytest.raises(DatasetError, match="'glare', which the dataset .* was not built to read"):
        check_targets(task, MultiTaskFolder(synth, "val", ["depth"]))


def test_the_documented_plugin_is_the_one_the_tests_train():
    """docs/adding-a-task.md shows this file in full; the README's walk-through points there."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "adding-a-task.md").read_text()
    assert "# brightness_task.py\n" + BRIGHTNESS_PLUGIN.strip("\n") + "\n```" in docs
