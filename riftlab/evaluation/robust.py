"""Clean and PGD robust accuracy."""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from .. import distributed
from ..attacks import _ascend, eval_mode, random_start_point
from .._progress import bar
from ..compute import autocast, batch_layout, fold_batchnorm
from ..graphs import graphed_for, use_cuda_graphs
from ..resume import StepState, ensure_state

__all__ = ["evaluate", "accuracy", "clean_correct", "compare", "batch_size_for_memory", "eval_batch_size_for"]


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
    fold_bn: bool = False,
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

    ``fold_bn=True`` attacks and classifies :func:`riftlab.compute.fold_batchnorm`'s copy of ``model`` (every
    BatchNorm after a convolution folded into it; the weights are fixed for the whole evaluation, so the fold is
    exact up to rounding): fewer kernels per attack step, results equal to the unfolded model's up to images whose
    outcome floating-point rounding decides. The copy is kept with ``model`` and refreshed from its weights at each
    call (the interpolation curve's alphas reuse its storage and CUDA graphs). ``model`` itself is not changed.
    """
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if eps < 0 or step < 0 or steps < 0:
        raise ValueError(f"eps, step (the PGD step size) and steps must be non-negative, got {eps}, {step}, {steps}")
    model = distributed.unwrap(model)
    if fold_bn:
        model = _folded(model)
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
    fold_bn: bool = False,
) -> dict[str, Any]:
    """Evaluate two models on the same images with the same per-image random starts, and compare them.

    Both models go through :func:`evaluate` with the same ``batches`` and ``seed``, so every image
    meets the same PGD starts for A and for B; the robust difference is then a difference of the
    models, not of the attack's luck. Differences are B minus A, in points, each with the paired 95%
    score interval of :func:`riftlab.stats.paired_difference`, the exact McNemar p-value and the
    counts of images gained and lost.

    ``state`` (:mod:`riftlab.resume`): each model's evaluation keeps its progress in
    ``state.child("a")`` / ``state.child("b")``. ``fold_bn``: :func:`evaluate`'s, for both.

    Returns:
        ``{"clean": paired difference, "robust": paired difference, "a": evaluate(A), "b": evaluate(B)}``;
        ``a`` and ``b`` carry the per-image ``clean_correct`` / ``robust_correct`` masks.
    """
    from .stats import paired_difference

    state = ensure_state(state)
    a = evaluate(model_a, batches, eps, step, steps, restarts, seed, per_image=True, state=state.child("a"), progress=progress,
                 fold_bn=fold_bn)
    b = evaluate(model_b, batches, eps, step, steps, restarts, seed, per_image=True, state=state.child("b"), progress=progress,
                 fold_bn=fold_bn)
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


# Each model's BatchNorm-folded copy (evaluate's fold_bn), kept while the model lives and refreshed in place at each call.
_FOLDED: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def _folded(model: nn.Module) -> nn.Module:
    """:func:`riftlab.compute.fold_batchnorm` of ``model`` with its current weights, into the copy an earlier call made
    when it is still on ``model``'s device (so CUDA graphs recorded on it are reused), else into a new one."""
    kept = _FOLDED.get(model)
    device = next(model.parameters()).device
    if kept is not None and next(kept.parameters()).device == device:
        return fold_batchnorm(model, out=kept)
    _FOLDED[model] = folded = fold_batchnorm(model)
    return folded


def batch_size_for_memory(free_bytes: float, bytes_per_image: float, fixed_bytes: float = 0.0, fraction: float = 0.5,
                          floor: int = 64, cap: int = 4096) -> int:
    """The largest power of two ``n`` in [``floor``, ``cap``] whose attack fits: ``fixed_bytes + n * bytes_per_image <=
    fraction * free_bytes``; ``floor`` when not even that fits (:func:`evaluate` halves a batch that runs out of memory).

    A power of two, so that the size moves only when the free memory doubles or halves: a run resumed on the same
    GPU finds the same size (its stages' fingerprints hold it).

    Args:
        free_bytes: device memory free for the evaluation, bytes.
        bytes_per_image: what each image of an attacked batch adds to the peak, bytes (> 0).
        fixed_bytes: what an attacked batch needs whatever its size (workspaces), bytes.
        fraction: the share of ``free_bytes`` the evaluation may take, in (0, 1]; the rest is headroom for what else
            the run holds (the second model of a comparison, the training state, the allocator's fragmentation).
        floor, cap: the smallest and largest sizes returned, powers of two.
    """
    if not (floor >= 1 and cap >= floor and floor & (floor - 1) == 0 and cap & (cap - 1) == 0):
        raise ValueError(f"floor and cap must be powers of two with floor <= cap, got {floor} and {cap}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not bytes_per_image > 0 or free_bytes < 0 or fixed_bytes < 0:
        raise ValueError(f"bytes_per_image must be > 0 and free_bytes, fixed_bytes >= 0, "
                         f"got {bytes_per_image}, {free_bytes}, {fixed_bytes}")
    room = fraction * free_bytes - fixed_bytes
    n = cap
    while n > floor and n * bytes_per_image > room:
        n //= 2
    return n


def eval_batch_size_for(model: nn.Module, sample_shape: Sequence[int], device: torch.device | str, default: int = 512,
                        free_bytes: float | None = None, fraction: float = 0.5, floor: int = 64, cap: int = 4096) -> int:
    """The evaluation batch size that fits ``device``'s free memory: :func:`batch_size_for_memory` of what one attacked
    image takes there; ``default`` unchanged off CUDA (the CPU's caches, not its memory, set its best size).

    On CUDA it measures :func:`evaluate`'s own batch step (the clean pass, a random start, one PGD step with its input
    gradient, the pass on the adversarial images; eagerly, under the current precision) at 32 and 64 images with
    ``torch.cuda.max_memory_allocated``, each after a call that lets cudnn tune: the difference is the memory per
    image, the rest the fixed part. More PGD steps need no more memory (each step's graph is freed before the next).
    A second of GPU time. ``model`` is put in eval mode for the measurement, its weights untouched.

    Args:
        model: the model to evaluate, on ``device``. sample_shape: one image's shape (C, H, W).
        free_bytes: the free memory to size for, bytes; default: the device's free memory
            (``torch.cuda.mem_get_info``) plus what this process's allocator holds unused.
        fraction, floor, cap: :func:`batch_size_for_memory`'s (half the free memory, between 64 and 4096 images).

    Returns:
        A power of two in [floor, cap] on CUDA; ``default`` elsewhere.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return default
    peaks = {n: _attack_peak_bytes(model, tuple(sample_shape), device, n) for n in (32, 64)}
    per_image = (peaks[64] - peaks[32]) / 32
    if per_image <= 0:  # allocator rounding hid the difference: charge the whole peak to the images (larger, so safe)
        per_image = peaks[64] / 64
    fixed = max(peaks[32] - 32 * per_image, 0.0)
    if free_bytes is None:
        free, _ = torch.cuda.mem_get_info(device)
        free_bytes = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return batch_size_for_memory(free_bytes, per_image, fixed, fraction, floor, cap)


def _attack_peak_bytes(model: nn.Module, sample_shape: tuple[int, ...], device: torch.device, n: int) -> int:
    """The peak memory (bytes above what was allocated before) of :func:`_robust_correct` on ``n`` random images with
    one PGD step, measured at its second call (the first lets cudnn tune its algorithms, whose trials need workspace)."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = batch_layout(torch.rand((n, *sample_shape), device=device, generator=gen))
    with eval_mode(model), use_cuda_graphs(False):  # eager: a probe must not record graphs that stay with the model
        with torch.no_grad(), autocast(device):
            y = model(x).argmax(1)  # every image classified right, so every image is attacked
        for _ in range(2):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            _robust_correct(model, x, y, 8 / 255, 2 / 255, 1, 1, gen)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
    return peak
