"""Clean and PGD robust accuracy."""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from .. import distributed
from ..attacks import _ascend, eval_mode, random_start_point
from .._progress import bar
from ..compute import autocast
from ..graphs import graphed_for
from ..resume import StepState, ensure_state

__all__ = ["evaluate", "accuracy", "clean_correct", "compare"]


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


@torch.no_grad()
def clean_correct(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Whether ``model`` classifies each clean image right: a boolean CPU tensor (N,) in the order of ``batches``
    (every rank evaluates all of them under torchrun: a clean pass is cheap)."""
    model = distributed.unwrap(model)
    device = next(model.parameters()).device
    out = []
    with eval_mode(model), autocast(device):
        for x, y in batches:
            out.append((model(x).argmax(1) == y).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps: float,
    step: float,
    steps: int = 10,
    restarts: int = 1,
    seed: int = 0,
    per_image: bool = False,
    state: StepState | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Clean accuracy and PGD-``steps`` robust accuracy, worst case over ``restarts`` random starts.

    An example counts as robust only if it is classified correctly on the clean image and under
    every restart (a per-example worst case, never weaker than the paper's worst of 3 whole runs).
    Only examples still correct are attacked again, which leaves the result unchanged and saves
    time. Accuracies are in percent; ``eps`` and ``step`` in pixel units.

    Random starts are drawn per image, in batch order, from ``seed``: two models evaluated with
    the same batches and seed meet the same starts on every image (see :func:`compare`).
    ``per_image=True`` adds ``clean_correct`` and ``robust_correct``, boolean CPU tensors (N,) in
    the order of ``batches``.

    A batch that does not fit in GPU memory is evaluated in halves (the same attack; the halves draw
    their own random starts).
    ``state`` (:mod:`riftlab.resume`) receives the counts (and per-image results) and the attack's
    random state after every batch; a call whose state holds progress continues from it.

    Under torchrun, each rank attacks its slice of every batch (random starts drawn from
    ``seed`` and the rank) and the counts are summed over the ranks; ``state`` is then not used
    (a rank's partial counts mean nothing alone).
    """
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if eps < 0 or step < 0 or steps < 0:
        raise ValueError(f"eps, step (the PGD step size) and steps must be non-negative, got {eps}, {step}, {steps}")
    model = distributed.unwrap(model)
    batches, sharded = distributed.shard(batches)
    if sharded:
        state = None
        seed = seed + 1_000_003 * distributed.rank()
    keeper = ensure_state(state)
    saved = keeper.load() or {}
    done = saved.get("batches", 0)
    counts = {k: saved.get(k, 0) for k in ("clean", "robust", "total")}
    masks: dict[str, list[torch.Tensor]] = {k: list(saved.get(k + "_masks", [])) for k in ("clean", "robust")}
    gen = None
    total_images = getattr(batches, "num_examples", 0)
    with eval_mode(model), bar(total_images, f"PGD-{steps} evaluation", progress and total_images > 0, leave=False,
                               initial=counts["total"]) as live:
        for i, (x, y) in enumerate(batches):
            if gen is None:
                gen = torch.Generator(device=x.device).manual_seed(seed)
                if "generator" in saved:
                    gen.set_state(saved["generator"])
            if i < done:
                continue
            clean, robust = _evaluate_batch(model, x, y, eps, step, steps, restarts, gen)
            counts["clean"] += int(clean.sum())
            counts["robust"] += int(robust.sum())
            counts["total"] += len(y)
            if per_image:
                masks["clean"].append(clean.cpu())
                masks["robust"].append(robust.cpu())
            snapshot = {"batches": i + 1, **counts, "generator": gen.get_state()}
            if per_image:
                snapshot.update(clean_masks=masks["clean"], robust_masks=masks["robust"])
            keeper.save(snapshot)
            live.update(len(y) * (distributed.world_size() if sharded else 1),
                        lambda: {"clean": 100.0 * counts["clean"] / max(counts["total"], 1), "robust": 100.0 * counts["robust"] / max(counts["total"], 1)})
    if sharded:
        summed = torch.tensor([counts["clean"], counts["robust"], counts["total"]], device=next(model.parameters()).device)
        distributed.all_reduce_sum(summed)
        counts = dict(zip(("clean", "robust", "total"), summed.tolist()))
        if per_image:  # rank r holds slice r of every batch: batch by batch, the slices in rank order are the batch
            parts = distributed.gather_objects(masks)
            masks = {k: [torch.cat([p[k][i] for p in parts]) for i in range(len(parts[0][k]))] for k in ("clean", "robust")}
    total = max(counts["total"], 1)
    result: dict[str, Any] = {"clean_acc": 100.0 * counts["clean"] / total, "robust_acc": 100.0 * counts["robust"] / total,
                              "eps": eps, "step": step, "steps": steps, "restarts": restarts, "seed": seed, "n": counts["total"]}
    if per_image:
        for k in ("clean", "robust"):
            result[f"{k}_correct"] = torch.cat(masks[k]) if masks[k] else torch.zeros(0, dtype=torch.bool)
    return result


def compare(
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps: float,
    step: float,
    steps: int = 10,
    restarts: int = 1,
    seed: int = 0,
    state: StepState | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate two models on the same images with the same per-image random starts, and compare them.

    Both models go through :func:`evaluate` with the same ``batches`` and ``seed``, so every image
    meets the same PGD starts for A and for B; the robust difference is then a difference of the
    models, not of the attack's luck. Differences are B minus A, in points, each with the paired 95%
    score interval of :func:`riftlab.stats.paired_difference`, the exact McNemar p-value and the
    counts of images gained and lost.

    ``state`` (:mod:`riftlab.resume`): each model's evaluation keeps its progress in
    ``state.child("a")`` / ``state.child("b")``.

    Returns:
        ``{"clean": paired difference, "robust": paired difference, "a": evaluate(A), "b": evaluate(B)}``;
        ``a`` and ``b`` carry the per-image ``clean_correct`` / ``robust_correct`` masks.
    """
    from .stats import paired_difference

    state = ensure_state(state)
    a = evaluate(model_a, batches, eps, step, steps, restarts, seed, per_image=True, state=state.child("a"), progress=progress)
    b = evaluate(model_b, batches, eps, step, steps, restarts, seed, per_image=True, state=state.child("b"), progress=progress)
    return {"clean": paired_difference(a["clean_correct"], b["clean_correct"]),
            "robust": paired_difference(a["robust_correct"], b["robust_correct"]), "a": a, "b": b}


def _robust_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int, restarts: int,
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
        if eps == 0:
            continue  # no perturbation can change a prediction: robust is clean, exactly (not re-evaluated on another batch)
        idx = alive.nonzero().squeeze(1)  # one host sync per restart: the attacked batch's size
        if len(idx) == 0:
            continue  # still draw the remaining starts, so later batches keep theirs
        live = len(idx)
        if x.is_cuda:  # a few fixed batch shapes, so cudnn.benchmark tunes each once: pad with images already lost
            idx = _bucketed(idx, alive, len(y))
        alive[idx[:live]] = graphed_for(model, survives_attack, (eps, step, steps))(x[idx], y[idx], starts[idx])[:live]
    return clean, alive


def survives_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor, eps: float, step: float,
                    steps: int) -> torch.Tensor:
    """Whether ``model`` (in eval mode) still classifies each image right after PGD from ``start``: boolean (N,).

    Capture-safe (:mod:`riftlab.graphs`): with CUDA graphs on, each bucket shape of :func:`_robust_correct`'s
    attacked batches is one graph replay.

    Args:
        x: clean images in [0, 1], (N, C, H, W); ``start``: the attack's start points, same shape. y: labels, (N,).
        eps, step, steps: the l_inf radius, step size (pixel units) and number of PGD steps.
    """
    x_adv = _ascend(model, x, y, start, eps, step, steps)
    with torch.no_grad(), autocast(x.device), eval_mode(model):
        return model(x_adv).argmax(1) == y


def _bucketed(idx: torch.Tensor, alive: torch.Tensor, n: int, buckets: int = 8) -> torch.Tensor:
    """``idx`` (the images still correct) followed by images already lost, up to the next multiple of n / ``buckets``.

    Each image is attacked independently (BatchNorm in eval mode), so the padding changes no result;
    it only keeps the attacked batch to ``buckets`` shapes instead of up to ``n``."""
    size = min(n, -(-len(idx) * buckets // n) * -(-n // buckets))
    if size <= len(idx):
        return idx
    lost = (~alive).nonzero().squeeze(1)[: size - len(idx)]
    return torch.cat([idx, lost])


def _evaluate_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int, restarts: int,
                    gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image masks (clean correct, robust correct) of one batch; halves it on a CUDA out-of-memory error."""
    try:
        return _robust_correct(model, x, y, eps, step, steps, restarts, gen)
    except torch.cuda.OutOfMemoryError:
        if len(y) == 1:
            raise
        if x.is_cuda:
            torch.cuda.empty_cache()
        half = len(y) // 2
        a = _evaluate_batch(model, x[:half], y[:half], eps, step, steps, restarts, gen)
        b = _evaluate_batch(model, x[half:], y[half:], eps, step, steps, restarts, gen)
        return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])
