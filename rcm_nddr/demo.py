"""The main job, offline on a CPU: generate SYNTH_MT when missing, pretrain a filter bank on it (or
reuse it), then for every task with both a ``<task>_single_task.yaml`` and a ``<task>_RC_RI_NFF.yaml``
config train the fully fine-tuned single-task baseline and the reparameterized task (frozen bank,
response-initialized, weight-normalized modulators), and print a table: the primary metric of the
trivial predictor, the baseline and RC_RI_NFF, the trainable parameters of each, and Delta_MTL."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .config import load_config
from .data.synthetic import generate
from .engine.builders import build_dataset
from .engine.checkpoint import atomic_write_text
from .engine.evaluate import delta_mtl, evaluate_trivial, primary_metrics, to_json
from .engine.trainer import Trainer
from .pretrain import pretrain

log = logging.getLogger(__name__)

DEFAULT_OUT = "results/demo"
DEFAULT_DATA = "data/SYNTH_MT"
DEFAULT_TRAIN = 320
DEFAULT_VAL = 80
DEFAULT_SIZE = (128, 128)
#: training iterations of each task in the demo (the configs' own schedules are longer)
DEFAULT_ITERS = 100
DEFAULT_PRETRAIN_ITERS = 200
BASELINE, VARIANT = "single_task", "RC_RI_NFF"


def default_configs() -> Path:
    """``configs/synthetic`` of the source tree, else of the current directory."""
    here = Path(__file__).resolve().parents[1] / "configs" / "synthetic"
    return here if here.is_dir() else Path("configs/synthetic")


def run_demo(
    out: str | Path = DEFAULT_OUT,
    data: str | Path = DEFAULT_DATA,
    configs: str | Path | None = None,
    n_train: int = DEFAULT_TRAIN,
    n_val: int = DEFAULT_VAL,
    size: tuple[int, int] = DEFAULT_SIZE,
    max_iters: int = DEFAULT_ITERS,
    pretrain_iters: int = DEFAULT_PRETRAIN_ITERS,
    progress: bool = True,
) -> dict:
    """Run the demo; return ``{"rows": [...], "delta_mtl": ...}`` (also written to
    ``<out>/demo_results.json``, and the table to ``<out>/demo_results.md``)."""
    start = time.monotonic()
    out = Path(out)
    configs = Path(configs) if configs is not None else default_configs()
    names = sorted(
        p.name.removesuffix(f"_{BASELINE}.yaml")
        for p in configs.glob(f"*_{BASELINE}.yaml")
        if (configs / p.name.replace(BASELINE, VARIANT)).is_file()
    )
    if not names or not (configs / "pretrain.yaml").is_file():
        raise FileNotFoundError(f"{configs} needs pretrain.yaml and pairs of *_{BASELINE}.yaml / *_{VARIANT}.yaml")
    generate(data, n_train, n_val, size=size, seed=0, progress=progress)
    # On a CPU a sample loads in ~2 ms, ~1% of a training step: worker processes would only compete
    # with the model for the cores.
    common = [f"dataset.root={data}", f"dataset.crop=[{size[0]}, {size[1]}]", "train.num_workers=0"]

    bank = out / "resnet18_bank.pth"
    if bank.is_file():
        log.info("reusing the pretrained filter bank %s", bank)
    else:
        cfg = load_config(
            configs / "pretrain.yaml",
            [*common, f"store={out / 'pretrain'}", f"train.max_iters={pretrain_iters}", "train.epochs=null"],
        )
        pretrain(cfg, bank, overwrite=True, progress=progress)
    log.info("filter bank ready (%.0f s)", time.monotonic() - start)

    schedule = [f"train.max_iters={max_iters}", "train.epochs=null", f"train.val_every={max_iters}"]
    rows = []
    results: dict[str, dict] = {BASELINE: {}, VARIANT: {}}
    for name in names:
        row: dict = {"task": name}
        for variant in (BASELINE, VARIANT):
            cfg = load_config(
                configs / f"{name}_{variant}.yaml",
                [
                    *common,
                    *schedule,
                    f"store={out / variant}",
                    f"backbone.weights={bank}",
                    f"backbone.decomposition={out / 'resnet18_bank_ri.safetensors'}",
                ],
            )
            t0 = time.monotonic()
            trainer = Trainer(cfg, overwrite=True, progress=progress)
            # One validation, at the end: the final metrics are those of the best (= last) checkpoint,
            # which is what test.py would report.
            metrics = trainer.fit()
            results[variant].update(metrics)
            primaries = primary_metrics(trainer.tasks)
            key, higher = primaries[name]
            row.update(metric=key, higher_is_better=higher)
            row[variant] = metrics[name][key]
            row[f"{variant}_parameters"] = trainer.parameter_counts[name]["total"]
            row[f"{variant}_seconds"] = round(time.monotonic() - t0, 1)
            if variant == BASELINE:
                # The trainer's tasks and validation set serve as they are; only the train split is
                # read again, without augmentation, to fit the trivial predictor.
                train_set = build_dataset(cfg, cfg.dataset.train_split, train=False)
                trivial = evaluate_trivial(trainer.tasks, train_set, trainer.val_set, cfg.test.batch_size)
                row["trivial"] = trivial[name][key]
        row["delta"] = delta_mtl(
            {name: {row["metric"]: row[VARIANT]}},
            {name: {row["metric"]: row[BASELINE]}},
            {name: (row["metric"], row["higher_is_better"])},
        )
        rows.append(row)
    overall = delta_mtl(
        {r["task"]: {r["metric"]: r[VARIANT]} for r in rows},
        {r["task"]: {r["metric"]: r[BASELINE]} for r in rows},
        {r["task"]: (r["metric"], r["higher_is_better"]) for r in rows},
    )
    summary = {"rows": rows, "delta_mtl": overall, "seconds": round(time.monotonic() - start)}
    table = format_table(rows, overall)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "demo_results.json", to_json(summary, indent=2))
    atomic_write_text(out / "demo_results.md", table + "\n")
    log.info("demo finished in %.0f s; results in %s", time.monotonic() - start, out)
    print(table)  # noqa: T201 - the demo's result is this table on stdout
    return summary


def format_table(rows: list[dict], overall: float) -> str:
    lines = [
        f"| task | metric | trivial | {BASELINE} | {VARIANT} | Delta (%) | trainable params {BASELINE} | "
        f"trainable params {VARIANT} |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        arrow = "higher is better" if r["higher_is_better"] else "lower is better"
        lines.append(
            f"| {r['task']} | {r['metric']} ({arrow}) | {r['trivial']:.4g} | {r[BASELINE]:.4g} | {r[VARIANT]:.4g} | "
            f"{r['delta']:+.1f} | {r[f'{BASELINE}_parameters']:,} | {r[f'{VARIANT}_parameters']:,} |"
        )
    lines.append(f"\nDelta_MTL of {VARIANT} against the single-task baselines: {overall:+.2f}%")
    return "\n".join(lines)
