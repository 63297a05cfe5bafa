"""Paired statistics (riftlab.stats) and the paired comparison of two models (riftlab.compare)."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from riftlab import Batches, ImageSet, compare, evaluate
from scipy import stats as scipy_stats

from riftlab.evaluation.stats import difference_from_counts, format_difference, over_seeds, paired_difference, paired_interval

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from interval_coverage import GRID, conditional_interval, coverage  # noqa: E402


def test_difference_counts_and_interval_on_hand_made_pairs():
    # 10 images: A right on 0-5, B right on 2-8. B gains 6, 7, 8 and loses 0, 1.
    a = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    b = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    d = paired_difference(a, b)
    assert (d["n"], d["gained"], d["lost"]) == (10, 3, 2)
    assert d["acc_a"] == 60.0 and d["acc_b"] == 70.0 and d["diff"] == pytest.approx(10.0)
    low, high = paired_interval(3, 2, 10)
    assert (d["ci_low"], d["ci_high"]) == (pytest.approx(100 * low), pytest.approx(100 * high))
    assert d["ci_low"] < d["diff"] < d["ci_high"]
    # Exact McNemar: two-sided binomial test of 3 vs 2 at p = 1/2.
    assert d["p_value"] == pytest.approx(min(1.0, 2 * scipy_stats.binom.cdf(2, 5, 0.5)))
    assert difference_from_counts(3, 2, 10, acc_a=60.0) == d


def test_the_score_interval_agrees_with_a_published_worked_example():
    # Fagerland, Lydersen and Laake, "Statistical Analysis of Contingency Tables" (2017), chapter 8: complete
    # response before and after consolidation therapy (Cavo et al. 2012), n12 = 6, n21 = 16, N = 161. Published:
    # estimate -0.0621, Tango's asymptotic score 95% CI -0.1240 to -0.0054, exact conditional McNemar P = 0.052479.
    low, high = paired_interval(6, 16, 161, skew=False)
    assert (round(low, 4), round(high, 4)) == (-0.1240, -0.0054)
    d = difference_from_counts(6, 16, 161)
    assert round(d["diff"] / 100, 4) == -0.0621 and round(d["p_value"], 6) == 0.052479
    # The skewness correction moves the ends a little and keeps the estimate inside.
    low_s, high_s = paired_interval(6, 16, 161)
    assert abs(low_s - low) < 0.005 and abs(high_s - high) < 0.005 and low_s < -0.0621 < high_s
    # Balanced flips have no skew at the estimate: the interval is symmetric about it.
    low_b, high_b = paired_interval(40, 40, 1000)
    assert low_b == pytest.approx(-high_b, abs=1e-9)


@pytest.mark.parametrize("n", [500, 1000, 10000])
def test_coverage_is_close_to_95_percent_where_rift_changes_live(n):
    """Simulated coverage of the true difference over balanced, one-sided and near-zero flip rates (the grid of
    benchmarks/interval_coverage.py, 1000 replicates each: the Monte Carlo standard error is 0.007)."""
    for p_gain, p_loss in GRID:
        covered = coverage(p_gain, p_loss, n, replicates=1000, seed=n)
        expected_flips = n * (p_gain + p_loss)
        if expected_flips >= 3:
            assert 0.93 <= covered <= 0.99, (p_gain, p_loss, n, covered)
        else:  # too few flips for the coverage to be tuned: it must err on the safe side
            assert covered >= 0.95, (p_gain, p_loss, n, covered)
    # The interval riftlab used before fails exactly there: one-sided flips.
    assert coverage(0.004, 0.0, 1000, replicates=1000, interval=conditional_interval) < 0.8


def test_edge_cases_give_finite_sensible_intervals():
    # No discordant image: a finite interval around 0 that shrinks with n (about +-3 / n), never [0, 0].
    for n in (100, 1000, 30000):
        low, high = paired_interval(0, 0, n)
        assert low == pytest.approx(-high) and 1 / n < high < 5 / n
    mask = torch.rand(500, generator=torch.Generator().manual_seed(0)) < 0.7
    d = paired_difference(mask, mask.clone())
    assert (d["diff"], d["gained"], d["lost"], d["p_value"]) == (0.0, 0, 0, 1.0) and d["ci_low"] < 0 < d["ci_high"]
    # Every image discordant, all one way: the interval reaches the end it can, and excludes 0.
    assert paired_interval(1000, 0, 1000)[1] == 1.0 and 0.99 < paired_interval(1000, 0, 1000)[0] < 1.0
    assert paired_interval(0, 1000, 1000)[0] == -1.0
    low, high = paired_interval(500, 500, 1000)  # every image discordant, half each way
    assert -0.1 < low < 0 < high < 0.1
    # One image: nothing is known, and the interval says so.
    for counts in ((0, 0, 1), (1, 0, 1), (0, 1, 1)):
        low, high = paired_interval(*counts)
        assert math.isfinite(low) and math.isfinite(high) and low <= (counts[0] - counts[1]) <= high and high - low >= 1


def test_one_sided_flips_exclude_zero_and_balanced_flips_do_not():
    n = 1000
    a = torch.zeros(n, dtype=torch.bool)
    b = a.clone()
    b[:20] = True  # B gains 20 images and loses none
    d = paired_difference(a, b)
    assert d["diff"] == pytest.approx(2.0) and d["ci_low"] > 0 and d["ci_high"] > d["diff"]
    b[20:40], a[20:40] = False, True  # now also loses 20: no net difference
    d = paired_difference(a, b)
    assert d["diff"] == 0.0 and d["ci_low"] < 0 < d["ci_high"] and d["p_value"] == 1.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same images"):
        paired_difference(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="booleans"):
        paired_difference(torch.tensor([0, 2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="gained \\+ lost <= n"):
        paired_interval(6, 5, 10)
    with pytest.raises(ValueError, match="whole number"):
        paired_interval(-1, 0, 10)


def test_over_seeds_against_scipy_and_when_every_seed_agrees():
    s = over_seeds([1.0, 2.0, 3.0], seeds=[0, 1, 2])
    assert s["mean"] == 2.0 and s["sd"] == pytest.approx(1.0)
    half = scipy_stats.t.ppf(0.975, 2) / math.sqrt(3)
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert "note" not in s
    one = over_seeds([0.5])
    assert one["sd"] is None and one["ci_low"] is None and one["mean"] == 0.5
    assert format_difference(s) == f"+2.00 [{2 - half:+.2f}, {2 + half:+.2f}]"
    zeros = over_seeds([0.0, 0.0, 0.0], seeds=[0, 1, 2])
    assert (zeros["ci_low"], zeros["ci_high"]) == (0.0, 0.0) and "seeds agree" in zeros["note"]


class _LabelReader(nn.Module):
    """Reads the label written into pixel (0, 0) of channel 0 (value k / 10): right on every image, and robust,
    since a small perturbation cannot move the value across a half-class boundary. ``flip_marked``: wrong
    (label + 1) on images whose pixel (0, 1) is 1."""

    def __init__(self, flip_marked: bool):
        super().__init__()
        self.flip_marked = flip_marked
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        value = x[:, 0, 0, 0] * 10 * self.scale
        if self.flip_marked:
            value = value + (x[:, 0, 0, 1] > 0.5).float()
        return -((value[:, None] - torch.arange(10.0)) ** 2) * 10


def _marked_images(n: int, marked: list[int]) -> ImageSet:
    labels = torch.arange(n) % 9  # 0..8, so label + 1 is still a class
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = (labels * 25.5).round().to(torch.uint8)  # k / 10 of 255
    images[marked, 0, 0, 1] = 255
    return ImageSet(images, labels)


def test_compare_counts_exactly_the_images_a_model_flips():
    marked = [3, 17, 50, 51, 77, 90, 99, 118]  # 8 one-sided flips of 120: the interval excludes 0
    data = Batches(_marked_images(120, marked), 32)
    right, flipper = _LabelReader(False), _LabelReader(True)
    same = compare(right, _LabelReader(False), data, eps=0.01, step=0.003, steps=3, seed=4)
    for kind in ("clean", "robust"):
        assert (same[kind]["diff"], same[kind]["gained"], same[kind]["lost"]) == (0.0, 0, 0)
    result = compare(right, flipper, data, eps=0.01, step=0.003, steps=3, seed=4)
    for kind in ("clean", "robust"):
        assert (result[kind]["gained"], result[kind]["lost"]) == (0, len(marked))
        assert result[kind]["diff"] == pytest.approx(-100 * len(marked) / 120)
        assert result[kind]["ci_high"] < 0
    lost = (result["a"]["clean_correct"] & ~result["b"]["clean_correct"]).nonzero().squeeze(1).tolist()
    assert lost == marked  # the per-image results are in the order of the batches
    assert result["a"]["robust_acc"] == 100.0  # the reader is robust at this eps: the attack really ran and failed


def test_evaluate_per_image_matches_counts_and_same_seed_gives_same_starts(at_model, tiny_splits):
    data = Batches(tiny_splits.val, 100)
    first = evaluate(at_model, data, 8 / 255, 2 / 255, 3, seed=7, per_image=True)
    assert first["clean_correct"].dtype == torch.bool and len(first["robust_correct"]) == len(tiny_splits.val)
    assert 100.0 * float(first["robust_correct"].float().mean()) == pytest.approx(first["robust_acc"])
    assert not bool((first["robust_correct"] & ~first["clean_correct"]).any())  # robust implies clean
    again = evaluate(at_model, data, 8 / 255, 2 / 255, 3, seed=7, per_image=True)
    assert torch.equal(first["robust_correct"], again["robust_correct"])
    plain = evaluate(at_model, data, 8 / 255, 2 / 255, 3, seed=7)
    assert "robust_correct" not in plain and plain["robust_acc"] == first["robust_acc"]
