"""Paired statistics (riftlab.stats) and the paired comparison of two models (riftlab.compare)."""

import math

import pytest
import torch
import torch.nn as nn

from riftlab import Batches, ImageSet, compare, evaluate
from riftlab.evaluation.stats import clopper_pearson, format_difference, over_seeds, paired_difference, t_quantile


def test_difference_counts_and_interval_on_hand_made_pairs():
    # 10 images: A right on 0-5, B right on 2-8. B gains 6, 7, 8 and loses 0, 1.
    a = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    b = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    d = paired_difference(a, b)
    assert (d["n"], d["gained"], d["lost"]) == (10, 3, 2)
    assert d["acc_a"] == 60.0 and d["acc_b"] == 70.0 and d["diff"] == pytest.approx(10.0)
    # Direct computation: Clopper-Pearson on 3 successes of 5 discordant pairs, mapped to (m/n)(2p - 1).
    scipy = pytest.importorskip("scipy.stats")
    p_low, p_high = scipy.beta.ppf(0.025, 3, 3), scipy.beta.ppf(0.975, 4, 2)
    assert d["ci_low"] == pytest.approx(100 * 5 / 10 * (2 * p_low - 1), abs=1e-9)
    assert d["ci_high"] == pytest.approx(100 * 5 / 10 * (2 * p_high - 1), abs=1e-9)
    assert d["ci_low"] < d["diff"] < d["ci_high"]
    # Exact McNemar: two-sided binomial test of 3 vs 2 at p = 1/2.
    assert d["p_value"] == pytest.approx(min(1.0, 2 * scipy.binom.cdf(2, 5, 0.5)))


def test_clopper_pearson_closed_forms_and_scipy():
    # k = 0 and k = m have closed forms.
    assert clopper_pearson(0, 5)[0] == 0.0
    assert clopper_pearson(0, 5)[1] == pytest.approx(1 - 0.025 ** (1 / 5), abs=1e-12)
    assert clopper_pearson(5, 5) == (pytest.approx(0.025 ** (1 / 5), abs=1e-12), 1.0)
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    scipy = pytest.importorskip("scipy.stats")
    for k, m in ((1, 7), (40, 100), (333, 1000), (2, 3000)):
        low, high = clopper_pearson(k, m)
        assert low == pytest.approx(scipy.beta.ppf(0.025, k, m - k + 1), rel=1e-8)
        assert high == pytest.approx(scipy.beta.ppf(0.975, k + 1, m - k), rel=1e-8)


def test_one_sided_flips_exclude_zero_and_balanced_flips_do_not():
    n = 1000
    a = torch.zeros(n, dtype=torch.bool)
    b = a.clone()
    b[:20] = True  # B gains 20 images and loses none
    d = paired_difference(a, b)
    assert d["diff"] == pytest.approx(2.0) and d["ci_low"] > 0
    b[20:40], a[20:40] = False, True  # now also loses 20: no net difference
    d = paired_difference(a, b)
    assert d["diff"] == 0.0 and d["ci_low"] < 0 < d["ci_high"] and d["p_value"] == 1.0


def test_identical_results_differ_by_exactly_zero():
    mask = torch.rand(500, generator=torch.Generator().manual_seed(0)) < 0.7
    d = paired_difference(mask, mask.clone())
    assert (d["diff"], d["ci_low"], d["ci_high"], d["gained"], d["lost"]) == (0.0, 0.0, 0.0, 0, 0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same images"):
        paired_difference(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="booleans"):
        paired_difference(torch.tensor([0, 2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="0 <= k <= m"):
        clopper_pearson(6, 5)


def test_t_quantile_against_scipy_and_over_seeds():
    scipy = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 30):
        assert t_quantile(0.95, df) == pytest.approx(scipy.t.ppf(0.975, df), rel=1e-9)
    s = over_seeds([1.0, 2.0, 3.0], seeds=[0, 1, 2])
    assert s["mean"] == 2.0 and s["sd"] == pytest.approx(1.0)
    half = scipy.t.ppf(0.975, 2) / math.sqrt(3)
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(2 - half), pytest.approx(2 + half))
    one = over_seeds([0.5])
    assert one["sd"] is None and one["ci_low"] is None and one["mean"] == 0.5
    assert format_difference(s) == f"+2.00 [{2 - half:+.2f}, {2 + half:+.2f}]"


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
    marked = [3, 17, 50, 51, 77, 90, 99, 118]  # 8 one-sided flips: the exact interval excludes 0 (with 5 it would not)
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
