"""Paired statistics for comparing two models on the same images.

Two models evaluated on the same images (and, for robust accuracy, the same per-image random
starts) differ only on the images where exactly one of them is right: the *discordant* images.
With ``gained`` images that model B gets right and A wrong, and ``lost`` images the other way
round, out of ``n``, B's accuracy minus A's is ``(gained - lost) / n``.

:func:`paired_difference` gives that difference in points with an **exact conditional 95%
interval**: given the ``m = gained + lost`` discordant images, ``gained ~ Binomial(m, p)`` under
the usual McNemar model, and the difference is ``(m / n) * (2p - 1)``; the Clopper-Pearson interval
of ``p`` is mapped through that line. The two-sided exact McNemar p-value comes with it. Identical
predictions give exactly 0 with the interval [0, 0]: on these images the two models do not differ.

:func:`over_seeds` summarises one difference measured for several seeds (independently trained
models): mean, standard deviation and a Student-t 95% interval of the mean, which, unlike the
per-seed interval, includes the variation from one training run to the next.

Pure Python (``math`` only); ``tests/test_stats.py`` checks it against SciPy.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

__all__ = ["paired_difference", "over_seeds", "clopper_pearson", "t_quantile", "format_difference", "CI_METHOD"]

CI_METHOD = "exact conditional 95% interval (Clopper-Pearson on the discordant images, McNemar)"


def _log_binom_pmf(k: int, m: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == m else -math.inf
    return math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1) + k * math.log(p) + (m - k) * math.log1p(-p)


def _binom_cdf(k: int, m: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(m, p), summed in log space from the mode outwards (stable for m up to 10^6)."""
    if k < 0:
        return 0.0
    if k >= m:
        return 1.0
    logs = [_log_binom_pmf(i, m, p) for i in range(k + 1)]
    top = max(logs)
    if top == -math.inf:
        return 0.0
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def _bisect(f, lo: float, hi: float, iterations: int = 200) -> float:
    """The root of the increasing function ``f`` on [lo, hi] (f(lo) <= 0 <= f(hi))."""
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return 0.5 * (lo + hi)


def clopper_pearson(k: int, m: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a binomial proportion from ``k`` successes in ``m`` trials.

    The lower end solves P(X >= k | p) = (1 - level) / 2 and the upper end P(X <= k | p) = (1 - level) / 2;
    0 and 1 are exact ends when k = 0 or k = m. ``m = 0`` gives (0, 1): nothing is known.
    """
    if not 0 <= k <= m:
        raise ValueError(f"need 0 <= k <= m, got k={k}, m={m}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if m == 0:
        return 0.0, 1.0
    tail = (1 - level) / 2
    lower = 0.0 if k == 0 else _bisect(lambda p: (1.0 - _binom_cdf(k - 1, m, p)) - tail, 0.0, 1.0)
    upper = 1.0 if k == m else _bisect(lambda p: tail - _binom_cdf(k, m, p), 0.0, 1.0)
    return lower, upper


def _mcnemar_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: twice the smaller binomial tail of the discordant split, at most 1."""
    m = gained + lost
    if m == 0:
        return 1.0
    return min(1.0, 2.0 * _binom_cdf(min(gained, lost), m, 0.5))


def _as_mask(values: Any) -> torch.Tensor:
    mask = torch.as_tensor(values).detach().to("cpu").reshape(-1)
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("per-image correctness must be booleans (or 0 / 1)")
        mask = mask.bool()
    return mask


def paired_difference(correct_a: Any, correct_b: Any, level: float = 0.95) -> dict[str, Any]:
    """B's accuracy minus A's on the same images, with its exact paired interval.

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
    m = gained + lost
    if m == 0:
        low = high = 0.0
    else:
        p_low, p_high = clopper_pearson(gained, m, level)
        low, high = 100.0 * m / n * (2 * p_low - 1), 100.0 * m / n * (2 * p_high - 1)
    return {"n": n, "acc_a": 100.0 * float(a.sum()) / n, "acc_b": 100.0 * float(b.sum()) / n,
            "diff": 100.0 * (gained - lost) / n, "ci_low": low, "ci_high": high, "gained": gained, "lost": lost,
            "p_value": _mcnemar_p(gained, lost), "level": level, "method": CI_METHOD}


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3 / 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        total, term = 0.0, math.cos(theta)
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * j) / (2 * j + 1)
        return 2 / math.pi * (theta + math.sin(theta) * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0
    for j in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * j - 1) / (2 * j)
    return math.sin(theta) * total


def t_quantile(level: float, df: int) -> float:
    """The two-sided Student-t critical value: P(|T| <= t) = ``level`` with ``df`` degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a whole number >= 1, got {df}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    hi = 1.0
    while _t_two_sided(hi, int(df)) < level:
        hi *= 2
    return _bisect(lambda t: _t_two_sided(t, int(df)) - level, 0.0, hi)


def over_seeds(diffs: Sequence[float], seeds: Sequence[int] | None = None, level: float = 0.95) -> dict[str, Any]:
    """Mean, standard deviation (ddof 1) and Student-t interval of a difference measured once per seed.

    One seed gives its value with no spread (``sd`` and the interval are None).
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
                           "method": f"Student-t {int(level * 100)}% interval over seeds"}
    if k > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
        half = t_quantile(level, k - 1) * sd / math.sqrt(k)
        out.update(sd=sd, ci_low=mean - half, ci_high=mean + half)
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
