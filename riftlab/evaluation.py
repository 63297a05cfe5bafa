"""Clean and PGD robust accuracy."""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.nn as nn

from . import distributed
from ._loop import SweepProgress
from .attacks import _ascend, eval_mode, random_start_point
from .compute import autocast

__all__ = ["evaluate", "accuracy"]


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Clean top-1 accuracy in percent (under torchrun, each rank counts its slice of every batch)."""
    model = distributed.unwrap(model)
    batches, sharded = distributed.shard(batches)
    device = next(model.parameters()).device
    counts = torch.zeros(2, device=device, dtype=torch.long)  # correct, total
    with eval_mode(model), autocast(device):
        for x, y in batches:
            counts[0] += (model(x).argmax(1) == y).sum()
            counts[1] += len(y)
    if sharded:
        distributed.all_reduce_sum(counts)
    correct, total = counts.tolist()
    return 100.0 * correct / max(total, 1)


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps: float,
    alpha: float,
    steps: int = 10,
    restarts: int = 1,
    seed: int = 0,
    checkpoint_path: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Clean accuracy and PGD-``steps`` robust accuracy, worst case over ``restarts`` random starts.

    An example counts as robust only if it is classified correctly on the clean image and under
    every restart (a per-example worst case, never weaker than the paper's worst of 3 whole runs).
    Only examples still correct are attacked again, which leaves the result unchanged and saves
    time. Accuracies are in percent.

    A batch that does not fit in GPU memory is evaluated in halves (the same attack; the halves draw
    their own random starts).
    With ``checkpoint_path``, the counts and the attack's random state are saved after every
    batch and an existing file resumes the evaluation.

    Under torchrun, each rank attacks its slice of every batch (random starts drawn from
    ``seed`` and the rank) and the counts are summed over the ranks; ``checkpoint_path`` is then
    not used (a rank's partial counts mean nothing alone).
    """
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if eps < 0 or alpha < 0 or steps < 0:
        raise ValueError(f"eps, alpha (step size) and steps must be non-negative, got {eps}, {alpha}, {steps}")
    model = distributed.unwrap(model)
    batches, sharded = distributed.shard(batches)
    if sharded:
        checkpoint_path = None
        seed = seed + 1_000_003 * distributed.rank()
    progress = SweepProgress(checkpoint_path, {"eps": eps, "alpha": alpha, "steps": steps, "restarts": restarts, "seed": seed})
    state = progress.load()
    done = state.get("batches", 0)
    counts = {k: state.get(k, 0) for k in ("clean", "robust", "total")}
    gen = None
    with eval_mode(model):
        for i, (x, y) in enumerate(batches):
            if gen is None:
                gen = torch.Generator(device=x.device).manual_seed(seed)
                if "generator" in state:
                    gen.set_state(state["generator"])
            if i < done:
                continue
            clean, robust = _evaluate_batch(model, x, y, eps, alpha, steps, restarts, gen)
            counts["clean"] += clean
            counts["robust"] += robust
            counts["total"] += len(y)
            if checkpoint_path is not None:
                progress.save({"batches": i + 1, **counts, "generator": gen.get_state()})
    if sharded:
        summed = torch.tensor([counts["clean"], counts["robust"], counts["total"]], device=next(model.parameters()).device)
        distributed.all_reduce_sum(summed)
        counts = dict(zip(("clean", "robust", "total"), summed.tolist()))
    total = max(counts["total"], 1)
    return {"clean_acc": 100.0 * counts["clean"] / total, "robust_acc": 100.0 * counts["robust"] / total,
            "eps": eps, "step": alpha, "steps": steps, "restarts": restarts, "n": counts["total"]}


def _robust_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int, restarts: int,
                    gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (N,): correct on the clean image, and correct under every one of ``restarts`` PGD attacks.

    Only examples still correct are attacked again, which leaves the worst case unchanged. Every
    restart draws a start point for the whole batch, attacked or not, so each image's starts depend
    only on its place in the batch order: two models evaluated with one seed meet the same starts.
    """
    with torch.no_grad(), autocast(x.device):
        clean = model(x).argmax(1) == y
    alive = clean.clone()
    for _ in range(restarts):
        starts = random_start_point(x, eps, gen)
        idx = alive.nonzero().squeeze(1)  # one host sync per restart: the attacked batch's size
        if len(idx) == 0:
            continue  # still draw the remaining starts, so later batches keep theirs
        x_adv = _ascend(model, x[idx], y[idx], starts[idx], eps, alpha, steps)
        with torch.no_grad(), autocast(x.device):
            alive[idx] = model(x_adv).argmax(1) == y[idx]
    return clean, alive


def _evaluate_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int, restarts: int,
                    gen: torch.Generator) -> tuple[int, int]:
    try:
        clean, robust = _robust_correct(model, x, y, eps, alpha, steps, restarts, gen)
        return int(clean.sum()), int(robust.sum())
    except torch.cuda.OutOfMemoryError:
        if len(y) == 1:
            raise
        if x.is_cuda:
            torch.cuda.empty_cache()
        half = len(y) // 2
        a = _evaluate_batch(model, x[:half], y[:half], eps, alpha, steps, restarts, gen)
        b = _evaluate_batch(model, x[half:], y[half:], eps, alpha, steps, restarts, gen)
        return a[0] + b[0], a[1] + b[1]
