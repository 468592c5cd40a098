"""Where each task's own parameters get their gradient from, in a group trained jointly with NDDR.

In a group of several tasks (e.g. configs/synthetic/incremental/1_semseg+edge.yaml) the NDDR layers feed
each task's features into the others' paths, so every task loss also reaches the other tasks' modulators,
BatchNorms and NDDR layers. For each task T this prints the norm of the gradient of each weighted task loss
(loss weight x loss) with respect to T's own parameters, and the share of it that comes from the other
tasks, averaged over a few training batches; at the start of training, or at a checkpoint of the group.

    python scripts/nddr_gradient_shares.py --config configs/synthetic/incremental/1_semseg+edge.yaml \
        [--checkpoint STORE/checkpoints/semseg+edge/last.pt] [--batches 4] [--set key=value ...]
"""

from __future__ import annotations

import statistics

import torch
from group_probe import group_trainer, parse

from rcm_nddr.engine.checkpoint import load_checkpoint


def own_parameters(model: torch.nn.Module, task: str) -> list[torch.nn.Parameter]:
    """The trainable parameters that belong to ``task`` alone: its modulators, BatchNorms, downsample
    convs, NDDR layers and head (named ``...<task>...`` in the module tree)."""
    return [p for name, p in model.named_parameters() if p.requires_grad and f".{task}." in f".{name}."]


def main() -> None:
    checkpoint = ("--checkpoint", {"help": "the group's training checkpoint (default: the start of training)"})
    args = parse(__doc__, checkpoint)
    with group_trainer(args) as trainer:
        cfg = trainer.cfg
        model = trainer.model
        if args.checkpoint:
            missing, unexpected = model.load_state_dict(load_checkpoint(args.checkpoint)["model"], strict=False)
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            if trainable & set(missing) or unexpected:
                raise SystemExit(f"{args.checkpoint} does not hold this group's parameters")
        model.train()
        objective = trainer.objective.objective
        weights = {n: float(cfg.loss[n]["weight"]) for n in objective.names}
        shares: dict[str, dict[str, list[float]]] = {t: {n: [] for n in objective.names} for t in objective.names}
        batches = iter(trainer._train_loader())
        for _ in range(args.batches):
            batch = next(batches)
            outputs = model(batch["image"], raw=True)
            targets = {n: batch[task.target_key] for n, task in trainer.tasks.items()}
            losses, _ = objective.losses(outputs, targets, batch["image"])
            for owner in objective.names:
                params = own_parameters(model, owner)
                for i, name in enumerate(objective.names):
                    grads = torch.autograd.grad(weights[name] * losses[i], params, retain_graph=True, allow_unused=True)
                    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
                    shares[owner][name].append(float(norm))
    print(f"{args.config}{' at ' + args.checkpoint if args.checkpoint else ' at the start'}, loss weights {weights}")  # noqa: T201
    for owner, norms in shares.items():
        mean = {n: statistics.fmean(v) for n, v in norms.items()}
        others = sum(v for n, v in mean.items() if n != owner)
        cells = ", ".join(f"from {n}: {v:.4g}" for n, v in mean.items())
        print(f"{owner}'s own parameters: gradient norm {cells}; others / own = {others / mean[owner]:.3f}")  # noqa: T201


if __name__ == "__main__":
    main()
