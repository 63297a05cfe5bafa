"""What choosing on the test split reports, and how much of it the choice alone makes.

RiFT's reference code chooses twice on the test images it then reports: it keeps the fine-tuning
epoch with the best test clean accuracy, and it reads the interpolation weight off a test curve
(the largest clean gain that does not cost robust accuracy). riftlab chooses both on validation. To
show what the reference procedure would have printed on the same run, and how large a "gain" such a
choice finds when there is nothing to find, this module works on per-image results only (boolean
tensors, one row per candidate; no models, no files):

* :func:`max_selection` applies the rule: among the candidates whose robust accuracy is at most
  ``threshold`` points below the reference model's, the largest clean gain over it.
* :func:`selection_null` calibrates it on a control whose true effect is exactly zero: a paired
  sign-flip permutation. For each image at random, the reference model's result and the candidates'
  are swapped (every candidate's difference on that image changes sign together, clean and robust
  together), which keeps the candidates' correlations and makes every expected difference zero;
  the same max-selection on each permuted copy gives the distribution of the "gain" that selection
  alone reports.
* :func:`reference_selection_report` puts the reference procedure's two choices together (the epoch on
  test clean accuracy, then alpha on the test curve of that epoch) with a null for each.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .stats import paired_difference

__all__ = ["max_selection", "selection_null", "reference_selection_report"]


def _matrix(rows: torch.Tensor, n: int, what: str) -> torch.Tensor:
    rows = torch.as_tensor(rows)
    if rows.dim() == 1:
        rows = rows[None]
    if rows.dim() != 2 or rows.shape[1] != n or rows.shape[0] == 0:
        raise ValueError(f"{what} must be per-image results shaped (candidates, {n}) matching the reference's {n} images, "
                         f"got shape {tuple(rows.shape)}")
    return rows.to(torch.float64)


def _differences(at_clean: torch.Tensor, at_robust: torch.Tensor | None, clean: torch.Tensor,
                 robust: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per candidate and image, candidate minus reference (-1, 0 or +1): clean (K, N) and robust (K, N) or None."""
    at_clean = torch.as_tensor(at_clean).reshape(-1).to(torch.float64)
    n = len(at_clean)
    if n == 0:
        raise ValueError("the reference's per-image results are empty")
    d_clean = _matrix(clean, n, "clean") - at_clean
    if (robust is None) != (at_robust is None):
        raise ValueError("give robust results for both the reference and the candidates, or for neither")
    if robust is None:
        return d_clean, None
    d_robust = _matrix(robust, n, "robust") - torch.as_tensor(at_robust).reshape(-1).to(torch.float64)
    if d_robust.shape != d_clean.shape:
        raise ValueError(f"clean and robust results must have the same shape, got {tuple(d_clean.shape)} and {tuple(d_robust.shape)}")
    return d_clean, d_robust


def _select(gains: torch.Tensor, changes: torch.Tensor | None, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row of ``gains`` (P, K): the chosen gain and candidate index (-1 and gain 0 where none qualifies)."""
    allowed = torch.ones_like(gains, dtype=torch.bool) if changes is None else changes >= -threshold - 1e-9
    masked = torch.where(allowed, gains, torch.full_like(gains, -torch.inf))
    best, index = masked.max(dim=1)  # the first of equal maxima, as a strict ">" over candidates in order keeps
    none = ~allowed.any(dim=1)
    return torch.where(none, torch.zeros_like(best), best), torch.where(none, torch.full_like(index, -1), index)


def _check_threshold(threshold: float) -> None:
    if not threshold >= 0:
        raise ValueError(f"threshold must be a number of points >= 0 (inf: no robust constraint), got {threshold}")


def max_selection(at_clean: torch.Tensor, at_robust: torch.Tensor | None, clean: torch.Tensor, robust: torch.Tensor | None = None,
                  threshold: float = 0.1) -> dict[str, Any]:
    """The candidate with the largest clean gain over the reference model among those whose robust accuracy is at
    most ``threshold`` points below the reference's.

    Args:
        at_clean, at_robust: the reference model's per-image correctness (N,) (bool or 0/1); ``at_robust`` None
            (and ``robust`` None): no robust constraint.
        clean, robust: the candidates' per-image correctness (K, N), one row per candidate, on the same images.
        threshold: the allowed robust drop in points (the paper's 0.1).

    Returns ``index`` (the chosen row; the first of equal gains; -1 when no candidate qualifies, and then
    ``clean_gain`` 0: the procedure keeps the reference model), ``clean_gain`` and ``robust_change`` (points), each
    candidate's ``clean_gains`` and ``robust_changes``, and the chosen candidate's paired 95% intervals against the
    reference (:func:`~riftlab.evaluation.stats.paired_difference`) as ``clean`` and ``robust``.
    """
    _check_threshold(threshold)
    d_clean, d_robust = _differences(at_clean, at_robust, clean, robust)
    n = d_clean.shape[1]
    gains = 100.0 * d_clean.sum(1) / n
    changes = 100.0 * d_robust.sum(1) / n if d_robust is not None else None
    best, index = _select(gains[None], changes[None] if changes is not None else None, threshold)
    i = int(index[0])
    out: dict[str, Any] = {"index": i, "clean_gain": float(best[0]), "robust_change": float(changes[i]) if changes is not None and i >= 0 else 0.0,
                           "clean_gains": gains.tolist(), "robust_changes": changes.tolist() if changes is not None else None,
                           "threshold": float(threshold)}
    if i >= 0:
        out["clean"] = paired_difference(torch.as_tensor(at_clean).reshape(-1).bool(), torch.as_tensor(clean).reshape(len(gains), -1)[i].bool())
        if robust is not None:
            out["robust"] = paired_difference(torch.as_tensor(at_robust).reshape(-1).bool(), torch.as_tensor(robust).reshape(len(gains), -1)[i].bool())
    return out


def selection_null(at_clean: torch.Tensor, at_robust: torch.Tensor | None, clean: torch.Tensor, robust: torch.Tensor | None = None,
                   threshold: float = 0.1, permutations: int = 200, seed: int = 0, observed: float | None = None) -> dict[str, Any]:
    """The clean "gain" :func:`max_selection` reports when the true effect is exactly zero: a paired sign-flip null.

    Each permutation swaps, for a random half of the images (independently per image, probability 1/2), the
    reference's results with the candidates' (every candidate's clean and robust difference on that image changes
    sign together) and applies the same max-selection. Arguments as :func:`max_selection`; ``permutations`` copies
    drawn from ``seed`` (the same seed, the same flips). Returns the selected gain's ``mean``, ``sd``, ``p95`` (95th
    percentile) and ``max`` over the permutations (points), and, given the ``observed`` selected gain, ``p_value``:
    the share of permutations (counting the observed one) whose selection reached it.
    """
    _check_threshold(threshold)
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    d_clean, d_robust = _differences(at_clean, at_robust, clean, robust)
    n = d_clean.shape[1]
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (permutations, n), generator=gen).to(torch.float64) * 2 - 1  # (P, N)
    gains = 100.0 * (signs @ d_clean.T) / n  # (P, K): integer sums, exact in float64
    changes = 100.0 * (signs @ d_robust.T) / n if d_robust is not None else None
    selected, _ = _select(gains, changes, threshold)
    out: dict[str, Any] = {"permutations": permutations, "seed": seed, "mean": float(selected.mean()),
                           "sd": float(selected.std()) if permutations > 1 else 0.0,
                           "p95": float(torch.quantile(selected, 0.95)), "max": float(selected.max())}
    if observed is not None:
        out["p_value"] = (1 + int((selected >= observed - 1e-9).sum())) / (1 + permutations)
    return out


def reference_selection_report(at_clean: torch.Tensor, at_robust: torch.Tensor, epoch_clean: torch.Tensor, epochs: Sequence[int],
                          alphas: Sequence[float], curve_clean: torch.Tensor, curve_robust: torch.Tensor, threshold: float = 0.1,
                          permutations: int = 200, seed: int = 0) -> dict[str, Any]:
    """What the reference procedure reports on the test split, beside what choosing alone would report there.

    The reference code keeps the fine-tuning epoch with the best test clean accuracy (the first of equals; the
    starting point is not a candidate), then reads alpha off that epoch's test interpolation curve: the largest
    clean gain whose robust accuracy is at most ``threshold`` points below the AT model's (alpha = 0, the AT model
    itself, is a candidate, so the report is never below 0).

    Args:
        at_clean, at_robust: the AT model's per-image test correctness (N,).
        epoch_clean: each fine-tuning epoch's model (alpha 1), clean test correctness (E, N), in ``epochs``' order.
        epochs: the epoch numbers of ``epoch_clean``'s rows (1..E).
        alphas: the curve's interpolation weights, including 0.
        curve_clean, curve_robust: test correctness (A, N) of the chosen epoch's model interpolated at each alpha
            (computed after the epoch was chosen: :func:`max_selection` on ``epoch_clean`` without a robust constraint).
        threshold: the allowed robust drop in points; ``permutations``, ``seed``: the nulls (:func:`selection_null`).

    Returns ``epoch`` (the chosen epoch), ``alpha``, ``clean_gain`` and ``robust_change`` (points against AT),
    ``clean`` / ``robust`` (their paired intervals), ``null`` (the alpha choice on the curve under the sign-flip
    null, with the observed report's ``p_value``) and ``epoch_stage`` (the chosen epoch's clean gain at alpha 1 and
    the null of choosing the best of the epochs). The null of the alpha choice holds the epoch fixed, so the whole
    procedure's bias is at least its mean.
    """
    alphas = [float(a) for a in alphas]
    if 0.0 not in alphas:
        raise ValueError(f"alphas must include 0 (the AT model, always a candidate), got {alphas}")
    if len(epochs) != len(torch.as_tensor(epoch_clean).reshape(len(epochs), -1)):
        raise ValueError(f"epochs names {len(epochs)} epochs but epoch_clean has another number of rows")
    stage1 = max_selection(at_clean, None, epoch_clean, None, float("inf"))
    null1 = selection_null(at_clean, None, epoch_clean, None, float("inf"), permutations, seed, observed=stage1["clean_gain"])
    choice = max_selection(at_clean, at_robust, curve_clean, curve_robust, threshold)
    null2 = selection_null(at_clean, at_robust, curve_clean, curve_robust, threshold, permutations, seed, observed=choice["clean_gain"])
    i = choice["index"]
    report = {"epoch": int(epochs[stage1["index"]]), "alpha": alphas[i] if i >= 0 else 0.0, "clean_gain": choice["clean_gain"],
              "robust_change": choice["robust_change"], "threshold": float(threshold), "alphas": alphas,
              "curve": [{"alpha": a, "clean_gain": g, "robust_change": r} for a, g, r in zip(alphas, choice["clean_gains"], choice["robust_changes"])],
              "null": null2,
              "epoch_stage": {"epochs": [int(e) for e in epochs], "clean_gains": stage1["clean_gains"], "epoch": int(epochs[stage1["index"]]),
                              "clean_gain": stage1["clean_gain"], "null": null1}}
    for kind in ("clean", "robust"):
        if kind in choice:
            report[kind] = choice[kind]
    return report
