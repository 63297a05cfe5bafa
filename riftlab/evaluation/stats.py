"""Paired statistics for comparing two models on the same images.

Two models evaluated on the same images (and, for robust accuracy, the same per-image random
starts) differ only on the images where exactly one of them is right: the *discordant* images.
With ``gained`` images that model B gets right and A wrong, and ``lost`` images the other way
round, out of ``n``, B's accuracy minus A's is ``(gained - lost) / n``.

:func:`paired_difference` gives that difference in points with **Tango's score interval with Laud's
skewness correction** (Tango 1998; Laud 2017) and the exact McNemar p-value. Why this interval:
RiFT's changes are few and mostly one-sided (an interpolation a little way towards the fine-tuned
module flips a handful of images, nearly all in one direction), and in that regime the usual
intervals fail. The exact conditional interval riftlab used before (Clopper-Pearson on the
discordant split, mapped through ``(m / n)(2p - 1)``) holds the number of discordant images ``m``
fixed although it is random: with no image lost its upper end is the observed difference, with no
discordant image it is [0, 0], and simulated it covered the true difference in 13% to 59% of
one-sided cases. Tango's interval inverts the score test of ``delta = p_gain - p_loss`` with the
chance of a loss profiled out by its restricted maximum likelihood, so the randomness of ``m`` is
in it; Fagerland, Lydersen and Laake (2014) recommend it for coverage close to the nominal level,
zero cells included. Plain, it still dips to 0.924 for four expected one-sided flips among 1000
images (the score treats a small count as symmetric); Laud's correction for the score's skewness
removes the dip. ``benchmarks/interval_coverage.py`` prints the simulated coverage on a grid of
balanced, one-sided and near-zero flip rates at 500, 1000 and 10000 images, and
``tests/test_stats.py`` requires it: within [0.93, 0.99] wherever 3 or more discordant images are
expected, at least 0.95 below that (where the count takes too few values for any interval's
coverage to be tuned, it errs on the safe side). No discordant image gives a finite interval that
shrinks with ``n`` (about +-3 / n): 30000 images of identical predictions bound the difference to
+-0.010 points, not to exactly 0.

The McNemar p-value stays the exact conditional test of "no difference" (two-sided binomial test of
``gained`` out of ``m`` at 1/2); conditioning is right for a test, not for an interval.

:func:`over_seeds` summarises one difference measured for several seeds (independently trained
models): mean, standard deviation and a Student-t 95% interval of the mean, which, unlike the
per-seed interval, includes the variation from one training run to the next.

Distributions and the root finder come from SciPy; this module holds only the interval's formula and
the mapping to riftlab's result format.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from scipy import optimize, stats

__all__ = ["paired_difference", "paired_interval", "difference_from_counts", "over_seeds", "format_difference", "CI_METHOD", "SEEDS_METHOD"]

CI_METHOD = "skewness-corrected Tango score 95% interval (paired images); exact McNemar p-value"
SEEDS_METHOD = "Student-t 95% interval over seeds"


def _restricted_loss_rate(gained: int, lost: int, n: int, delta: float) -> float:
    """The maximum-likelihood chance of a lost image under ``p_gain - p_loss = delta`` (Tango 1998).

    The constrained likelihood ``gained log(q + delta) + lost log q + (n - m) log(1 - 2q - delta)`` is
    maximised where ``2n q^2 - b q - lost delta (1 - delta) = 0``, whose non-negative root this is.
    """
    b = gained + lost - delta * (2 * n - gained + lost)
    c = lost * delta * (1.0 - delta)
    return max(0.0, (b + math.sqrt(max(0.0, b * b + 8.0 * n * c))) / (4.0 * n))


def _tango_score(delta: float, gained: int, lost: int, n: int, skew: bool = True) -> float:
    """Tango's score statistic at ``delta`` (0 at the observed difference), with Laud's skewness correction.

    The score is ``T / sqrt(V)`` with ``T = gained - lost - n delta`` and ``V`` its variance under the
    restricted estimates. ``skew`` subtracts ``(mu3 / 6 V^1.5)(S^2 - 1)``, ``mu3`` being T's third
    central moment there (Laud 2017): without it the score treats a count of a few flips as symmetric
    and the interval is too short on the side away from zero (simulated: 0.924 coverage for four
    expected one-sided flips among 1000 images). +-inf where the variance vanishes.
    """
    q = _restricted_loss_rate(gained, lost, n, delta)
    variance = n * (2.0 * q + delta - delta * delta)
    excess = gained - lost - n * delta
    if variance <= 1e-300:
        return math.copysign(math.inf, excess) if excess else 0.0
    score = excess / math.sqrt(variance)
    if skew:
        third = n * (delta - 3.0 * delta * (2.0 * q + delta) + 2.0 * delta ** 3)
        score -= third / (6.0 * variance ** 1.5) * (score * score - 1.0)
    return score


def paired_interval(gained: int, lost: int, n: int, level: float = 0.95, skew: bool = True) -> tuple[float, float]:
    """The score interval of ``p_gain - p_loss`` (fractions, not points) from the counts alone.

    Args:
        gained: images B gets right and A wrong.
        lost: images A gets right and B wrong.
        n: all paired images (``gained + lost <= n``).
        level: coverage (0.95).
        skew: Laud's skewness correction (riftlab's choice); ``False`` gives Tango's plain score
            interval (the one Fagerland, Lydersen and Laake tabulate).

    Returns:
        ``(low, high)``, inside [-1, 1]: the nearest deltas on either side of the observed difference
        where the score statistic equals -+ the normal quantile (bracketed outwards, then SciPy's
        ``brentq``), and -1 or 1 where no such delta exists.
    """
    for name, value in (("gained", gained), ("lost", lost), ("n", n)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
    gained, lost, n = int(gained), int(lost), int(n)
    if n < 1 or gained + lost > n:
        raise ValueError(f"need gained + lost <= n and n >= 1, got gained={gained}, lost={lost}, n={n}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    z = float(stats.norm.ppf(0.5 + level / 2))
    observed = (gained - lost) / n

    def limit(target: float, direction: int) -> float:
        # Step outwards from the observed difference, doubling, until the score crosses the target: the root nearest
        # the estimate (the corrected score need not be monotone far out in the tails).
        def f(delta: float) -> float:
            return _tango_score(delta, gained, lost, n, skew) - target
        inner, step, end = observed, 0.5 / n, float(direction)
        while True:
            outer = min(1.0, max(-1.0, observed + direction * step))
            if abs(outer) == 1.0:
                outer = end - direction * 1e-12
                if f(inner) * f(outer) > 0:
                    return end
            if f(inner) * f(outer) <= 0:
                return float(optimize.brentq(f, min(inner, outer), max(inner, outer), xtol=1e-15, rtol=1e-12))
            inner, step = outer, step * 2

    low = -1.0 if gained - lost == -n else limit(z, -1)
    high = 1.0 if gained - lost == n else limit(-z, 1)
    return low, high


def _as_mask(values: Any) -> torch.Tensor:
    mask = torch.as_tensor(values).detach().to("cpu").reshape(-1)
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("per-image correctness must be booleans (or 0 / 1)")
        mask = mask.bool()
    return mask


def difference_from_counts(gained: int, lost: int, n: int, acc_a: float | None = None, level: float = 0.95) -> dict[str, Any]:
    """:func:`paired_difference`'s result from stored counts (``acc_a`` in percent, when known, gives ``acc_b`` too)."""
    low, high = paired_interval(gained, lost, n, level)
    m = gained + lost
    p_value = 1.0 if m == 0 else float(stats.binomtest(gained, m, 0.5).pvalue)
    out: dict[str, Any] = {"n": n}
    if acc_a is not None:
        out.update(acc_a=acc_a, acc_b=acc_a + 100.0 * (gained - lost) / n)
    out.update(diff=100.0 * (gained - lost) / n, ci_low=100.0 * low, ci_high=100.0 * high, gained=gained, lost=lost,
               p_value=p_value, level=level, method=CI_METHOD)
    return out


def paired_difference(correct_a: Any, correct_b: Any, level: float = 0.95) -> dict[str, Any]:
    """B's accuracy minus A's on the same images, with Tango's paired score interval.

    Args:
        correct_a, correct_b: per-image correctness of models A and B on the *same* images in the
            same order, shape (N,), booleans (or 0 / 1).
        level: coverage of the interval (0.95).

    Returns:
        ``{"n", "acc_a", "acc_b" (percent), "diff" (acc_b - acc_a, points), "ci_low", "ci_high"
        (points), "gained" (B right, A wrong), "lost" (A right, B wrong), "p_value" (two-sided exact
        McNemar), "level", "method"}``.
    """
    a, b = _as_mask(correct_a), _as_mask(correct_b)
    if a.shape != b.shape:
        raise ValueError(f"the two models must be scored on the same images: got {a.numel()} and {b.numel()} results")
    n = a.numel()
    if n == 0:
        raise ValueError("no images to compare")
    gained, lost = int((b & ~a).sum()), int((a & ~b).sum())
    return difference_from_counts(gained, lost, n, acc_a=100.0 * float(a.sum()) / n, level=level)


def over_seeds(diffs: Sequence[float], seeds: Sequence[int] | None = None, level: float = 0.95) -> dict[str, Any]:
    """Mean, standard deviation (ddof 1) and Student-t interval of a difference measured once per seed.

    One seed gives its value with no spread (``sd`` and the interval are None). When every seed's
    difference is exactly the same (most often every one exactly 0: the selection rule kept alpha = 0
    in every seed, so AT+RiFT *is* the AT model each time) the interval has width 0: it says the
    seeds agree, not that the difference is known to be exactly that; the uncertainty from the test
    images is in each seed's (and the pooled) paired interval, and ``note`` says so.
    """
    values = [float(d) for d in diffs]
    if not values:
        raise ValueError("no seeds to summarise")
    if seeds is not None and len(seeds) != len(values):
        raise ValueError(f"{len(values)} differences but {len(seeds)} seeds")
    k = len(values)
    mean = sum(values) / k
    out: dict[str, Any] = {"k": k, "mean": mean, "sd": None, "ci_low": None, "ci_high": None, "level": level,
                           "values": values, "seeds": list(seeds) if seeds is not None else None,
                           "method": SEEDS_METHOD if level == 0.95 else f"Student-t {level:.0%} interval over seeds"}
    if k > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
        half = float(stats.t.ppf(0.5 + level / 2, k - 1)) * sd / math.sqrt(k)
        out.update(sd=sd, ci_low=mean - half, ci_high=mean + half)
        if sd == 0.0:
            out["note"] = (f"all {k} seeds gave exactly {mean:+g}: the seeds agree, so the interval over seeds has width 0; "
                           "the uncertainty from the test images is in the paired intervals")
    return out


def format_difference(d: Mapping[str, Any], digits: int = 2) -> str:
    """``+0.80 [-0.12, +1.70]`` (points, 95% interval), with ``(+12/-4)`` images gained / lost when known."""
    low, high = d.get("ci_low"), d.get("ci_high")
    value = d["diff"] if "diff" in d else d["mean"]
    text = f"{value:+.{digits}f}"
    if low is not None and high is not None:
        text += f" [{low:+.{digits}f}, {high:+.{digits}f}]"
    if "gained" in d:
        text += f" (+{d['gained']}/-{d['lost']})"
    return text
