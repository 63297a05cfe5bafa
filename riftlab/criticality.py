"""Module robust criticality (MRC): how much can one module's weights hurt robustness?

For module i with weight W_i (every Conv2d and Linear of the net),

    MRC(i) = max_{||dW||_2 <= eps * ||W_i||_2}  L_adv(W + dW) - L_adv(W)

where L_adv is the mean cross-entropy on a *fixed* set of adversarial examples crafted once
against the unperturbed model. The maximum is approximated by projected, normalised gradient
ascent on W_i alone; the ball is enforced after every step, and the reported value is the loss
at the final iterate (not the best seen along the way).
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from ._loop import SweepProgress
from ._util import progress as _progress, relative_distance
from .attacks import eval_mode, pgd
from .compute import autocast
from .models import weight_modules

__all__ = ["module_robust_criticality", "adversarial_set"]

Batch = tuple[torch.Tensor, torch.Tensor]


def adversarial_set(model: nn.Module, batches: Iterable[Batch], eps: float, step: float, steps: int = 10, seed: int = 0) -> list[Batch]:
    """Craft PGD adversarial examples against ``model`` once and keep them (as a list of batches).

    RiFT builds this set from *training* data: the test split is only ever reported.
    """
    out: list[Batch] = []
    gen = None
    for x, y in batches:
        if gen is None:
            gen = torch.Generator(device=x.device).manual_seed(seed)
        out.append((pgd(model, x, y, eps, step, steps, generator=gen), y))
    return out


@torch.no_grad()
def _loss_and_accuracy(model: nn.Module, adv: Sequence[Batch]) -> tuple[float, float]:
    loss = torch.zeros((), device=adv[0][0].device)
    correct = torch.zeros((), device=adv[0][0].device)
    n = 0
    for x, y in adv:
        logits = model(x)  # fp32 even when the ascent runs in bf16: MRC is a small difference of two losses
        loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        n += len(y)
    return float(loss) / n, 100.0 * float(correct) / n


def module_robust_criticality(
    model: nn.Module,
    adv: Sequence[Batch],
    eps: float = 0.1,
    passes: int = 10,
    step_size: float | None = None,
    modules: Sequence[str] | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """MRC of every Conv2d / Linear weight, lowest (least robust-critical) first.

    The ascent runs under :func:`riftlab.compute.autocast` (bf16 on CUDA by default); the losses
    before and after it are measured in fp32, since MRC is a small difference of two losses.
    Under torchrun the modules are shared out across the ranks and every rank returns the table.

    The model is left exactly as it was: each weight is perturbed in place, one at a time, and
    restored from a copy of that weight alone (no copy of the whole model per module). The model
    runs in eval mode, so BatchNorm statistics are not touched.

    Args:
        model: the adversarially trained model.
        adv: fixed adversarial batches [(x_adv, y), ...], from :func:`adversarial_set`.
        eps: radius of the ball, relative to the weight's l2 (Frobenius) norm (paper: 0.1).
        passes: passes of gradient ascent over ``adv`` (paper: 10); one step per batch.
        step_size: length of each ascent step as a fraction of the ball's radius; by default
            2.5 / (number of steps), the usual l2-PGD choice, which can cross the ball and back.
        modules: names to evaluate (default: all Conv2d and Linear modules).
        checkpoint_path: file where the rows are saved after each module; an existing file
            resumes the sweep (the adversarial set must be the same: it is, for the same seed).

    Returns:
        A DataFrame with one row per module: ``module``, ``mrc`` (increase of the mean adversarial
        cross-entropy), ``adv_loss`` and ``perturbed_adv_loss``, ``robust_acc`` and
        ``perturbed_robust_acc`` on ``adv`` (percent), ``robust_acc_drop`` (points), ``params``
        and ``relative_change`` (||dW|| / ||W|| reached), sorted by ``mrc``.
    """
    if not adv:
        raise ValueError("the adversarial set is empty")
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    if step_size is None:
        step_size = 2.5 / max(1, passes * len(adv))
    candidates = dict(weight_modules(model))
    names = list(candidates) if modules is None else list(modules)
    unknown = [n for n in names if n not in candidates]
    if unknown:
        raise ValueError(f"unknown module {unknown[0]!r}; valid modules: {', '.join(candidates)}")
    sweep = SweepProgress(checkpoint_path, {"eps": eps, "passes": passes, "step_size": step_size, "modules": names,
                                            "examples": sum(len(y) for _, y in adv)})
    rows = list(sweep.load().get("rows", []))
    finished = {row["module"] for row in rows}
    todo = [n for n in names if n not in finished]
    # Under torchrun the modules are handed out round-robin; after each round the rows are gathered
    # (and saved by rank 0), so every rank ends with the whole table.
    world, rank = distributed.world_size(), distributed.rank()
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with eval_mode(model):
            base_loss, base_acc = _loss_and_accuracy(model, adv)
            bar = _progress(range(0, len(todo), world), progress, desc="MRC", initial=len(finished), total=len(names))
            for start in bar:
                mine = todo[start + rank : start + rank + 1]
                new_rows = [_module_row(model, candidates[name], name, adv, eps, passes, step_size, base_loss, base_acc) for name in mine]
                for part in distributed.gather_objects(new_rows):
                    rows.extend(part)
                if hasattr(bar, "update") and world > 1:
                    bar.update(min(world, len(todo) - start) - 1)
                sweep.save({"rows": rows})
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return pd.DataFrame(rows).sort_values("mrc", kind="stable").reset_index(drop=True)


def _module_row(model: nn.Module, module: nn.Module, name: str, adv: Sequence[Batch], eps: float, passes: int, step_size: float,
                base_loss: float, base_acc: float) -> dict[str, float | str | int]:
    """Projected gradient ascent on ``module``'s weight alone, then its MRC row; the weight is restored."""
    weight = module.weight
    original = weight.detach().clone()
    radius = eps * original.norm()
    try:
        weight.requires_grad_(True)
        for _ in range(passes):
            for x, y in adv:
                with autocast(x.device):
                    loss = F.cross_entropy(model(x).float(), y)
                (grad,) = torch.autograd.grad(loss, weight)
                with torch.no_grad():
                    weight.add_(grad * (step_size * radius / grad.norm().clamp_min(1e-12)))
                    # Project back onto the ball after every step (the reference checks once per pass).
                    delta = weight - original
                    scale = torch.clamp(radius / delta.norm().clamp_min(1e-30), max=1.0)
                    weight.copy_(original + delta * scale)
        weight.requires_grad_(False)
        loss, acc = _loss_and_accuracy(model, adv)
        reached = relative_distance(weight, original)
    finally:
        with torch.no_grad():
            weight.copy_(original)
        weight.requires_grad_(False)
    return {"module": name, "mrc": loss - base_loss, "adv_loss": base_loss, "perturbed_adv_loss": loss,
            "robust_acc": base_acc, "perturbed_robust_acc": acc, "robust_acc_drop": base_acc - acc,
            "params": weight.numel(), "relative_change": reached}
