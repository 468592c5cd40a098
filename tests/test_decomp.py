"""Response decomposition (decomp/): streaming statistics against an explicit eigendecomposition, the
sign convention, the file format and its checks, and the ``python -m decomp`` command."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from rcm_nddr.decomp import (
    FORMAT,
    Decomposition,
    DecompositionError,
    ResponseStatistics,
    decompose_responses,
    eigendecompose,
    fix_signs,
    load_decomposition,
    save_decomposition,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rcm_nddr.commands.cli import decomp_main as main
from rcm_nddr.config import load_config
from rcm_nddr.data.synthetic import generate
from rcm_nddr.engine.builders import make_decomposition
from rcm_nddr.nn.backbone import resnet_backbone
from rcm_nddr.nn.filter_bank import bank_weights, filter_bank_sha256, reparameterized_convs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return resnet_backbone("resnet18", "none", output_stride=16).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def explicit_covariances(backbone, images) -> dict[str, tuple[torch.Tensor, int]]:
    """Covariance and sample count per layer from the concatenation of every response vector."""
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in reparameterized_convs(backbone)}
    modules = dict(backbone.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: kept[name].append(out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]))
        )
        for name in kept
    ]
    with torch.no_grad():
        backbone(images)
    for handle in handles:
        handle.remove()
    out = {}
    for name, parts in kept.items():
        x = torch.cat(parts).double()
        centered = x - x.mean(dim=0)
        out[name] = centered.T @ centered / x.shape[0], x.shape[0]
    return out


def distinct(eigenvalues: torch.Tensor, rel_gap: float = 1e-3) -> list[int]:
    """Indices of eigenvalues clearly above zero and clearly apart from their neighbours."""
    lam = eigenvalues.tolist()
    top = lam[0]
    out = []
    for i, value in enumerate(lam):
        gaps = [abs(value - lam[j]) for j in (i - 1, i + 1) if 0 <= j < len(lam)]
        if value > 1e-6 * top and min(gaps) > rel_gap * top:
            out.append(i)
    return out


def test_streaming_matches_eigh_of_the_concatenated_responses(backbone, images):
    result = decompose_responses(backbone, [images[:4], images[4:]], progress=False)
    reference = explicit_covariances(backbone, images)
    assert list(result) == reparameterized_convs(backbone)
    checked = 0
    for name, (cov, n) in reference.items():
        lam_ref, vec_ref = torch.linalg.eigh(cov)
        lam_ref, vec_ref = lam_ref.flip(0), vec_ref.flip(1)
        d = result[name]
        assert d.U.dtype == d.eigenvalues.dtype == d.mean.dtype == torch.float64
        assert d.n == n
        torch.testing.assert_close(d.eigenvalues, lam_ref, rtol=1e-6, atol=1e-9 * float(lam_ref[0]))
        for i in distinct(lam_ref):
            torch.testing.assert_close(
                torch.outer(d.U[:, i], d.U[:, i]), torch.outer(vec_ref[:, i], vec_ref[:, i]), rtol=0, atol=1e-6
            )
            checked += 1
    assert checked > 100  # the comparison covered many eigenvectors, not just a few


def test_mean_is_the_mean_response(backbone, images):
    conv1 = dict(backbone.named_modules())["conv1"]
    with torch.no_grad():
        expected = conv1(images).double().mean(dim=(0, 2, 3))
    result = decompose_responses(backbone, [images], progress=False)
    torch.testing.assert_close(result["conv1"].mean, expected, rtol=1e-6, atol=1e-9)


def test_several_batches_equal_one_batch(backbone, images):
    one = decompose_responses(backbone, [images], progress=False)
    several = decompose_responses(backbone, [images[:1], images[1:3], images[3:]], progress=False)
    for name in one:
        assert one[name].n == several[name].n
        # float32 convolutions may round differently with the batch size: tolerances on the response scale
        scale = float(one[name].eigenvalues[0])
        torch.testing.assert_close(several[name].mean, one[name].mean, rtol=1e-5, atol=1e-6 * scale**0.5)
        torch.testing.assert_close(several[name].eigenvalues, one[name].eigenvalues, rtol=1e-5, atol=1e-9 * scale)


def test_eigenvalues_descending_U_orthogonal_and_signs_fixed(backbone, images):
    for name, d in decompose_responses(backbone, [images], progress=False).items():
        assert (d.eigenvalues[:-1] >= d.eigenvalues[1:]).all(), name
        eye = torch.eye(d.U.shape[0], dtype=torch.float64)
        torch.testing.assert_close(d.U.T @ d.U, eye, rtol=0, atol=1e-10)
        rows = d.U.abs().argmax(dim=0)
        assert (d.U[rows, torch.arange(d.U.shape[1])] > 0).all(), name


def test_sign_convention_is_deterministic():
    torch.manual_seed(0)
    a = torch.randn(200, 5, dtype=torch.float64)
    cov = a.T @ a
    lam, U = eigendecompose(cov)
    flipped = U * torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    assert torch.equal(fix_signs(flipped), U)
    # the covariance of the negated data is the same matrix: same U
    lam_neg, U_neg = eigendecompose((-a).T @ (-a))
    assert torch.equal(U_neg, U) and torch.equal(lam_neg, lam)
    # ties in magnitude: the first index of maximal magnitude decides
    tie = torch.tensor([[-0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    assert torch.equal(fix_signs(tie), torch.tensor([[0.5, 0.5], [-0.5, 0.5]], dtype=torch.float64))


def test_negated_responses_give_the_same_U(backbone, images):
    """Negating a conv's filters negates its responses (and the mean) but leaves U unchanged."""
    import copy

    negated = copy.deepcopy(backbone)
    with torch.no_grad():
        negated.conv1.weight.neg_()
        negated.bn1.weight.neg_()  # keep the rest of the network as it was
    a = decompose_responses(backbone, [images], progress=False)["conv1"]
    b = decompose_responses(negated, [images], progress=False)["conv1"]
    torch.testing.assert_close(b.U, a.U, rtol=0, atol=1e-9)
    torch.testing.assert_close(b.mean, -a.mean)


def test_accumulator_state_does_not_grow_with_the_number_of_images(backbone, images):
    stats = ResponseStatistics(backbone)

    def held_bytes() -> int:
        total, stack = 0, [v for k, v in vars(stats).items() if k != "backbone"]
        while stack:
            value = stack.pop()
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, (list, tuple)):
                stack.extend(value)
        return total

    stats.update(images[:2])
    after_one = held_bytes()
    channels = {"conv1": 64, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    expected = sum(8 * (c * c + c) for c in (channels[n.split(".")[0]] for n in stats.layers))
    assert after_one == expected == stats.state_nbytes()
    for _ in range(3):
        stats.update(images)
    assert held_bytes() == after_one
    assert stats.images == 2 + 3 * images.shape[0]


def test_decompose_needs_images(backbone):
    with pytest.raises(ValueError, match="no responses"):
        ResponseStatistics(backbone).decompose()
    with pytest.raises(ValueError, match="no images"):
        decompose_responses(backbone, [], progress=False)


# ----------------------------------------------------------------------------- file format


def _meta(backbone, images=6):
    return {"filter_bank_sha256": filter_bank_sha256(bank_weights(backbone)), "arch": "resnet18", "images": images}


def test_save_load_round_trip_is_exact(backbone, images, tmp_path):
    decomposition = decompose_responses(backbone, [images], progress=False)
    path = tmp_path / "ri.safetensors"
    save_decomposition(path, decomposition, _meta(backbone))
    sha = filter_bank_sha256(bank_weights(backbone))
    loaded, meta = load_decomposition(path, expected_bank_sha256=sha)
    assert list(loaded) == list(decomposition)
    for name, d in decomposition.items():
        assert torch.equal(loaded[name].U, d.U) and torch.equal(loaded[name].eigenvalues, d.eigenvalues)
        assert torch.equal(loaded[name].mean, d.mean) and loaded[name].n == d.n
    assert meta["format"] == FORMAT and meta["filter_bank_sha256"] == sha
    assert meta["images"] == "6" and meta["arch"] == "resnet18"
    assert meta["layers"] == ",".join(reparameterized_convs(backbone))
    raw = load_file(str(path))
    assert raw["conv1.U"].dtype == torch.float64 and raw["conv1.n"].dtype == torch.int64 and raw["conv1.n"].ndim == 0
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary file


def test_decomposition_for_another_bank_is_refused(backbone, images, tmp_path):
    path = tmp_path / "ri.safetensors"
    save_decomposition(path, decompose_responses(backbone, [images[:2]], progress=False), _meta(backbone, 2))
    torch.manual_seed(123)
    other = resnet_backbone("resnet18", "none")
    mine, theirs = filter_bank_sha256(bank_weights(backbone)), filter_bank_sha256(bank_weights(other))
    assert mine != theirs
    with pytest.raises(DecompositionError, match="another filter bank") as err:
        load_decomposition(path, expected_bank_sha256=theirs)
    assert mine in str(err.value) and theirs in str(err.value) and str(path) in str(err.value)


def test_missing_and_corrupt_files_are_clear_errors(backbone, tmp_path):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(DecompositionError, match=r"absent\.safetensors does not exist"):
        load_decomposition(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(DecompositionError, match=r"garbage\.safetensors could not be read"):
        load_decomposition(garbage)
    foreign = tmp_path / "weights.safetensors"
    save_file({"conv1.weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(DecompositionError, match=r"weights\.safetensors is not a decomposition file"):
        load_decomposition(foreign)
    f64 = {"dtype": torch.float64}
    d = Decomposition(U=torch.eye(3, **f64), eigenvalues=torch.ones(3, **f64), mean=torch.zeros(3, **f64), n=10)
    path = tmp_path / "ri.safetensors"
    save_decomposition(path, {"conv1": d, "layer1.0.conv1": d}, _meta(backbone))
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    del tensors["layer1.0.conv1.mean"]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(DecompositionError, match=r"ri\.safetensors lacks the tensors layer1\.0\.conv1\.mean"):
        load_decomposition(path)
    tensors["layer1.0.conv1.mean"] = torch.zeros(4, dtype=torch.float64)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(DecompositionError, match=r"layer layer1\.0\.conv1 has"):
        load_decomposition(path)


# ----------------------------------------------------------------------------- command line


def _png_folder(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        folder = root if i % 2 else root / "sub"  # found recursively
        Image.fromarray(rng.integers(0, 256, (36 + i, 44, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_cli_on_a_folder_of_images(tmp_path):
    folder = _png_folder(tmp_path / "images")
    torch.manual_seed(0)
    weights = tmp_path / "bank.pth"
    torch.save(resnet_backbone("resnet18").state_dict(), weights)
    out = tmp_path / "ri.safetensors"
    args = ["--images", str(folder), "--weights", str(weights), "--size", "32", "32", "--out", str(out)]
    assert main([*args, "--batch-size", "3", "--quiet"]) == 0
    expected_sha = filter_bank_sha256(bank_weights(resnet_backbone("resnet18", str(weights))))
    decomposition, meta = load_decomposition(out, expected_bank_sha256=expected_sha)
    assert meta["images"] == "4" and meta["arch"] == "resnet18" and meta["weights"] == str(weights)
    assert decomposition["conv1"].n == 4 * 16 * 16
    assert decomposition["layer4.1.conv2"].n == 4 * 2 * 2  # output stride 16: layer4 is dilated, not strided
    assert main([*args, "--max-images", "2", "--quiet"]) == 0
    assert load_decomposition(out)[1]["images"] == "2"


def test_python_dash_m_decomp(tmp_path):
    folder = _png_folder(tmp_path / "images", n=2)
    out = tmp_path / "ri.safetensors"
    argv = ["--images", str(folder), "--weights", "none", "--size", "32", "32", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "decomp", *argv], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "responses" in result.stderr  # the progress bar
    assert load_decomposition(out)[1]["images"] == "2"


def test_cli_errors(tmp_path, capsys):
    out = str(tmp_path / "ri.safetensors")
    assert main(["--images", str(tmp_path / "nowhere"), "--weights", "none", "--out", out, "--quiet"]) == 2
    assert "error: image folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--images", str(empty), "--weights", "none", "--out", out, "--quiet"]) == 2
    assert "holds no" in capsys.readouterr().err
    folder = _png_folder(tmp_path / "images", n=1)
    absent = tmp_path / "absent.pth"
    assert main(["--images", str(folder), "--weights", str(absent), "--out", out, "--quiet"]) == 2
    assert f"error: weights file {absent} does not exist" in capsys.readouterr().err
    (folder / "broken.png").write_bytes(b"no png")
    assert main(["--images", str(folder), "--weights", "none", "--out", out, "--quiet"]) == 2
    assert "broken.png" in capsys.readouterr().err
    for argv in (["--images", str(folder), "--out", out], ["--images", str(folder), "--weights", "none"], []):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    assert not Path(out).exists()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("decomp") / "SYNTH_MT"
    return generate(root, 4, 2, size=(32, 32), seed=0, progress=False)


def test_cli_with_a_config(synth, tmp_path, capsys):
    target = tmp_path / "store" / "ri.safetensors"
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "tasks": ["semseg"],
                "dataset": {"root": str(synth), "crop": [32, 32]},
                "backbone": {"arch": "resnet18", "weights": "none", "decomposition": str(target)},
                "train": {"num_workers": 0, "device": "cpu"},
            }
        )
    )
    assert main(["--config", str(config), "--batch-size", "3", "--quiet"]) == 0
    decomposition, meta = load_decomposition(target)
    assert meta["images"] == "4" and decomposition["conv1"].n == 4 * 16 * 16
    other = tmp_path / "other.safetensors"
    assert main(["--config", str(config), "--out", str(other), "--max-images", "2", "--quiet"]) == 0
    assert load_decomposition(other)[1]["images"] == "2"
    # neither --out nor backbone.decomposition: the store's ri.safetensors
    store = tmp_path / "default_store"
    args = ["--set", "backbone.decomposition=null", "--set", f"store={store}", "--max-images", "2", "--quiet"]
    assert main(["--config", str(config), *args]) == 0
    assert load_decomposition(store / "ri.safetensors")[1]["images"] == "2"
    assert main(["--config", str(config), "--set", f"dataset.root={tmp_path / 'none'}", "--quiet"]) == 2
    assert "error: dataset root" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--weights", "none"])


def test_make_decomposition_uses_the_given_bank(synth, tmp_path):
    overrides = ["tasks=[depth]", f"dataset.root={synth}", "dataset.crop=[32, 32]", "train.num_workers=0"]
    cfg = load_config(None, [*overrides, "train.device=cpu"])
    torch.manual_seed(7)
    bank = resnet_backbone("resnet18", "none")
    out = make_decomposition(cfg, tmp_path / "ri.safetensors", max_images=3, progress=False, backbone=bank)
    decomposition, meta = load_decomposition(out, expected_bank_sha256=filter_bank_sha256(bank_weights(bank)))
    assert meta["images"] == "3" and len(decomposition) == len(reparameterized_convs(bank))


# ----------------------------------------------------------------------------- benchmark


def test_bench_decomp_command(tmp_path, capsys):
    from rcm_nddr.commands import cli

    report_path = tmp_path / "bench.json"
    argv = ["bench", "decomp", "--images", "3", "--size", "32", "32", "--batch", "2", "--json", str(report_path)]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert table.startswith("| method | images | time (s) | images/s | peak RSS (MiB)")
    report = json.loads(report_path.read_text())
    runs = {run["method"]: run for run in report["runs"]}
    assert set(runs) == {"streaming", "reference"}
    for run in runs.values():
        assert run["images"] == 3 and run["peak_rss_mib"] >= run["baseline_rss_mib"] > 0
    # both methods decompose the same responses: their top eigenvalues agree (the reference is float32)
    assert runs["streaming"]["top10_eigenvalue_max_rel_diff_vs_reference"] < 1e-3
    assert "random initialization" in report["setup"]["weights"]


def test_reference_plan_subsamples_only_beyond_the_budget():
    from rcm_nddr.commands.bench import reference_plan

    exact = reference_plan(10, (32, 32), ram_bytes=2**40)
    assert exact["subsample"] == 1
    # resnet18 at 32x32, output stride 16: every reparameterized conv's float32 responses of one image
    per_image = 4 * (64 * 16 * 16 + 4 * 64 * 8 * 8 + 4 * 128 * 4 * 4 + 4 * 256 * 2 * 2 + 4 * 512 * 2 * 2)
    assert exact["response_bytes_per_image"] == per_image and exact["response_bytes"] == 10 * per_image
    tight = reference_plan(10, (32, 32), ram_bytes=exact["estimated_peak_bytes"])
    assert tight["subsample"] == 2  # 70% of the estimate fits half of the positions
