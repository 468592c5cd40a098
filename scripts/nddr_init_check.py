"""What a group's NDDR layers do to its tasks at the start of training, with and without their BatchNorm.

Every task of a group starts from the same bank, RI modulators and BatchNorms, so their stage features are
equal at initialization, and an NDDR conv whose blocks sum to one (alpha + (n - 1) beta = 1) passes them
on unchanged; the ReLU after it changes nothing either (the features are the output of a ReLU). The
BatchNorm between them does: in training mode it standardizes every channel over the batch, and the ReLU
then zeroes about half of what the next stage reads. This prints each task's initial loss and the relative L2
difference of its raw outputs from those of the same model run without its NDDR layers (each task alone on
the bank), with the NDDR layers as built and without their BatchNorm, over a few training batches in
training mode.

    python scripts/nddr_init_check.py --config configs/synthetic/incremental/1_semseg+edge.yaml [--batches 4]
"""

from __future__ import annotations

import copy
import statistics

import torch
from group_probe import group_trainer, parse
from torch import nn

from rcm_nddr.nn.nddr import NDDRLayer


def main() -> None:
    args = parse(__doc__)
    with group_trainer(args) as trainer:
        model = trainer.model.train()
        fusion = model.fusion
        if fusion is None:
            raise SystemExit(f"{args.config}: no NDDR fusion (fusion.type: none)")
        norms = [m for m in fusion.modules() if isinstance(m, NDDRLayer) and not isinstance(m.bn, nn.Identity)]
        objective = trainer.objective.objective
        loader = iter(trainer._train_loader())
        batches = [next(loader) for _ in range(args.batches)]

        def run() -> tuple[dict[str, float], list[dict[str, torch.Tensor]]]:
            """Mean loss per task and the raw outputs over the batches, in training mode (batch statistics,
            the running statistics restored after; the heads' dropout drawing the same masks every time)."""
            state = copy.deepcopy(model.state_dict())
            losses: dict[str, list[float]] = {n: [] for n in objective.names}
            outputs = []
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # the same dropout masks in every run
                for batch in batches:
                    out = model(batch["image"], raw=True)
                    targets = {n: batch[task.target_key] for n, task in trainer.tasks.items()}
                    values, _ = objective.losses(out, targets, batch["image"])
                    for name, value in zip(objective.names, values, strict=True):
                        losses[name].append(float(value))
                    outputs.append(out)
            model.load_state_dict(state)
            return {n: statistics.fmean(v) for n, v in losses.items()}, outputs

        model.fusion = None
        reference_losses, reference = run()
        model.fusion = fusion
        results = {"NDDR as configured": run()}
        if norms:  # the same layers without their BatchNorm: conv -> ReLU
            saved = [m.bn for m in norms]
            for m in norms:
                m.bn = nn.Identity()
            results["NDDR without its BatchNorm"] = run()
            for m, bn in zip(norms, saved, strict=True):
                m.bn = bn
    print(f"{args.config}, {args.batches} training batches at initialization")  # noqa: T201
    for label, (losses, outputs) in results.items():
        for name, loss in losses.items():
            difference = statistics.fmean(
                float((o[name] - r[name]).norm() / r[name].norm()) for o, r in zip(outputs, reference, strict=True)
            )
            print(  # noqa: T201
                f"{label}: {name} loss {loss:.4f} (without NDDR {reference_losses[name]:.4f}), "
                f"outputs differ from those without NDDR by {difference:.3g} (relative L2)"
            )


if __name__ == "__main__":
    main()
