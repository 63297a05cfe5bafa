"""How often riftlab's paired 95% interval covers the true accuracy difference, simulated.

Two models scored on the same N images: each image is gained by B with probability ``p_gain``, lost with
``p_loss``, and otherwise the same for both, so the true difference of accuracies is ``p_gain - p_loss``.
For each (p_gain, p_loss, N) of a grid that includes RiFT's regime (few, one-sided flips), ``replicates``
simulated comparisons are drawn and the share of intervals containing the truth is printed, for riftlab's
interval (Tango's score interval with Laud's skewness correction,
:func:`riftlab.evaluation.stats.paired_interval`) and, beside it, for
the exact conditional interval riftlab used before (Clopper-Pearson on the discordant images mapped
through (m / n)(2p - 1), which holds m fixed).

    python benchmarks/interval_coverage.py                 # the grid, 2000 replicates each, about a minute
    python benchmarks/interval_coverage.py --json out.json

``tests/test_stats.py`` runs :func:`coverage` on the same grid: [0.93, 0.99] wherever at least 3 discordant images
are expected, and at least 0.95 (conservative) below that, where the count takes too few values for any interval's
coverage to be tuned to 95%.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import lru_cache

import numpy as np
from scipy import stats as st

from riftlab.evaluation.stats import paired_interval

# (p_gain, p_loss): balanced, mildly and strongly one-sided, and near zero. (0, 0) is left out: every interval
# contains a true difference of 0 when nothing ever flips, so its coverage is 1 by construction.
GRID = [(0.03, 0.02), (0.025, 0.025), (0.02, 0.005), (0.003, 0.001), (0.004, 0.0), (0.05, 0.0), (0.01, 0.0),
        (0.001, 0.0), (0.0005, 0.0005)]
SIZES = (500, 1000, 10000)


def conditional_interval(gained: int, lost: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The interval riftlab used before: Clopper-Pearson of gained / m mapped through (m / n)(2p - 1); [0, 0] for m = 0."""
    m = gained + lost
    if m == 0:
        return 0.0, 0.0
    tail = (1 - level) / 2
    p_low = 0.0 if gained == 0 else st.beta.ppf(tail, gained, m - gained + 1)
    p_high = 1.0 if gained == m else st.beta.ppf(1 - tail, gained + 1, m - gained)
    return m / n * (2 * p_low - 1), m / n * (2 * p_high - 1)


def coverage(p_gain: float, p_loss: float, n: int, replicates: int = 2000, seed: int = 0, interval=paired_interval) -> float:
    """The share of ``replicates`` simulated comparisons of ``n`` images whose interval contains p_gain - p_loss."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [p_gain, p_loss, 1 - p_gain - p_loss], size=replicates)[:, :2]
    limits = lru_cache(maxsize=None)(lambda g, l: interval(g, l, n))  # counts repeat: each distinct pair solved once
    truth = p_gain - p_loss
    covered = 0
    for g, l in counts.tolist():
        low, high = limits(g, l)
        covered += low - 1e-12 <= truth <= high + 1e-12
    return covered / replicates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicates", type=int, default=2000)
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'p_gain / p_loss':>16} {'N':>6} {'flips':>6} {'riftlab':>7} {'before':>7}")
    for n in SIZES:
        for p_gain, p_loss in GRID:
            new = coverage(p_gain, p_loss, n, args.replicates)
            old = coverage(p_gain, p_loss, n, args.replicates, interval=conditional_interval)
            rows.append({"p_gain": p_gain, "p_loss": p_loss, "n": n, "riftlab": new, "conditional": old})
            print(f"{p_gain:>7g} / {p_loss:<7g} {n:>6} {n * (p_gain + p_loss):>6g} {new:>7.3f} {old:>7.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"replicates": args.replicates, "level": 0.95, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
