"""Weight-space interpolation between the AT model and its fine-tuned version, and choosing alpha."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn as nn

from .._progress import bar
from ..evaluation.robust import evaluate
from ..resume import StepState, ensure_state
from ..evaluation.stats import paired_difference

__all__ = ["interpolate", "interpolation_curve", "select_alpha", "DEFAULT_ALPHAS"]

DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def interpolate(theta_at: Mapping[str, torch.Tensor], theta_ft: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """theta(alpha) = (1 - alpha) * theta_at + alpha * theta_ft, tensor by tensor.

    alpha = 0 gives the AT model and alpha = 1 the fine-tuned one, exactly. Integer buffers (such
    as BatchNorm's batch counter) are taken from ``theta_at``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if set(theta_at) != set(theta_ft):
        diff = sorted(set(theta_at) ^ set(theta_ft))
        raise ValueError(f"the two state dicts differ in their tensors, first {diff[0]!r}")
    out = {}
    for name, a in theta_at.items():
        b = theta_ft[name]
        if not a.is_floating_point() or alpha == 0.0:
            out[name] = a.clone()
        elif alpha == 1.0:
            out[name] = b.clone()
        else:
            out[name] = torch.lerp(a, b.to(a.dtype), alpha)
    return out


def interpolation_curve(
    model: nn.Module,
    theta_at: Mapping[str, torch.Tensor],
    theta_ft: Mapping[str, torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps: float,
    step: float,
    attack_steps: int = 10,
    restarts: int = 1,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    seed: int = 0,
    state: StepState | None = None,
    progress: bool = False,
    per_image: bool = False,
    fold_bn: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, list[dict[str, torch.Tensor]]]:
    """Clean and PGD robust accuracy of theta(alpha) for every alpha, on ``batches``.

    ``model`` supplies the architecture; its weights are restored afterwards. Every alpha is
    attacked with the same per-image random starts (same ``seed``), so differences along the curve
    are differences of the weights, not attack noise. Returns a DataFrame with columns ``alpha``,
    ``clean_acc``, ``robust_acc`` (percent) and, when ``alphas`` include 0, each alpha's change
    against alpha = 0 on the same images with its paired 95% interval
    (:func:`riftlab.stats.paired_difference`): ``clean_change``, ``clean_change_low``,
    ``clean_change_high``, ``robust_change``, ``robust_change_low``, ``robust_change_high`` (points),
    so the noise the selection rule works against is visible.
    ``per_image=True`` returns ``(curve, masks)``: for each alpha, ``{"clean": ..., "robust": ...}``
    boolean CPU tensors (N,), each image's result in the order of ``batches``.
    ``state`` (:mod:`riftlab.resume`) receives the rows after each alpha, and the evaluation of
    the alpha in progress its own progress after each batch (``state.child("alpha-<i>")``).
    ``fold_bn``: :func:`riftlab.evaluation.robust.evaluate`'s, at every alpha (theta(alpha)'s BatchNorms folded into
    its convolutions, into one copy refreshed per alpha).
    """
    state = ensure_state(state)
    saved = state.load() or {}
    rows, masks = list(saved.get("rows", [])), list(saved.get("masks", []))
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        with bar(len(alphas), "interpolation curve", progress, unit="alpha", initial=len(rows)) as live:
            for alpha in list(alphas)[len(rows):]:
                model.load_state_dict(interpolate(theta_at, theta_ft, float(alpha)))
                point = state.child(f"alpha-{len(rows)}")  # one per point: a finished point's leftovers are never read again
                result = evaluate(model, batches, eps, step, attack_steps, restarts, seed=seed, per_image=True, state=point, progress=progress,
                                  fold_bn=fold_bn)
                rows.append({"alpha": float(alpha), "clean_acc": result["clean_acc"], "robust_acc": result["robust_acc"]})
                masks.append({"clean": result["clean_correct"], "robust": result["robust_correct"]})
                state.save({"rows": rows, "masks": masks})
                point.clear()
                live.update(1, lambda: {"alpha": rows[-1]["alpha"], "clean": rows[-1]["clean_acc"], "robust": rows[-1]["robust_acc"]})
    finally:
        model.load_state_dict(original)
    curve = pd.DataFrame(rows)
    if 0.0 in [float(a) for a in alphas]:
        base = masks[[float(a) for a in alphas].index(0.0)]
        for kind in ("clean", "robust"):
            diffs = [paired_difference(base[kind], m[kind]) for m in masks]
            curve[f"{kind}_change"] = [d["diff"] for d in diffs]
            curve[f"{kind}_change_low"] = [d["ci_low"] for d in diffs]
            curve[f"{kind}_change_high"] = [d["ci_high"] for d in diffs]
    return (curve, masks) if per_image else curve


def select_alpha(curve: pd.DataFrame, threshold: float = 0.1) -> dict[str, float]:
    """The paper's rule: the alpha with the largest clean-accuracy gain over alpha = 0 whose robust
    accuracy is at most ``threshold`` points below alpha = 0's.

    Use it on a *validation* curve. Returns the chosen row with ``clean_gain`` and ``robust_change``
    (points, relative to alpha = 0), and their paired 95% intervals ``clean_ci`` / ``robust_ci``
    when the curve has them (:func:`interpolation_curve`'s change columns); alpha = 0 when no
    alpha gains clean accuracy within the rule. The rule looks at point estimates only, as the
    paper's does: a gain whose interval includes 0 is still chosen, and the interval says so.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be non-negative, got {threshold}")
    base = curve.loc[curve["alpha"] == 0.0]
    if base.empty:
        raise ValueError("the curve needs alpha = 0 (the AT model) as its reference point")
    base_clean, base_robust = float(base["clean_acc"].iloc[0]), float(base["robust_acc"].iloc[0])
    ok = curve[curve["robust_acc"] >= base_robust - threshold - 1e-9]
    best = ok.loc[ok["clean_acc"].idxmax()]
    if float(best["clean_acc"]) <= base_clean:
        best = base.iloc[0]
    choice = {"alpha": float(best["alpha"]), "clean_acc": float(best["clean_acc"]), "robust_acc": float(best["robust_acc"]),
              "clean_gain": float(best["clean_acc"]) - base_clean, "robust_change": float(best["robust_acc"]) - base_robust,
              "threshold": threshold}
    for kind in ("clean", "robust"):  # the chosen point's paired interval against alpha = 0, where the curve has it
        if f"{kind}_change_low" in curve:
            choice[f"{kind}_ci"] = [float(best[f"{kind}_change_low"]), float(best[f"{kind}_change_high"])]
    return choice
