"""What choosing on the test split reports (riftlab.evaluation.selection), on hand-built per-image results."""

import pytest
import torch

from riftlab.evaluation.selection import max_selection, reference_selection_report, selection_null


def _flip(base: torch.Tensor, images: list[int]) -> torch.Tensor:
    out = base.clone()
    out[images] = ~out[images]
    return out


def _noisy(at: torch.Tensor, k: int, flips: int, seed: int) -> torch.Tensor:
    """``k`` candidates with no effect: each gains ``flips / 2`` random images and loses as many (its accuracy is ``at``'s)."""
    gen = torch.Generator().manual_seed(seed)
    right, wrong = at.nonzero().flatten(), (~at).nonzero().flatten()
    rows = []
    for _ in range(k):
        lost = right[torch.randperm(len(right), generator=gen)[:flips // 2]]
        gained = wrong[torch.randperm(len(wrong), generator=gen)[:flips // 2]]
        rows.append(_flip(at, torch.cat([lost, gained]).tolist()))
    return torch.stack(rows)


def test_the_rule_takes_the_largest_clean_gain_that_keeps_robust_accuracy():
    at_clean = torch.tensor([True] * 50 + [False] * 50)
    at_robust = torch.tensor([True] * 30 + [False] * 70)
    clean = torch.stack([at_clean,                                # alpha 0: the AT model itself
                         _flip(at_clean, [60, 61]),               # +2 points
                         _flip(at_clean, [60, 61, 62, 63, 64]),   # +5 points ...
                         _flip(at_clean, [60, 61])])              # +2 again (a tie with row 1)
    robust = torch.stack([at_robust, at_robust, _flip(at_robust, [0]), at_robust])  # ... but row 2 loses 1 robust point
    choice = max_selection(at_clean, at_robust, clean, robust, threshold=0.1)
    assert choice["index"] == 1 and choice["clean_gain"] == pytest.approx(2.0) and choice["robust_change"] == 0.0  # first of equals
    assert choice["clean_gains"] == pytest.approx([0, 2, 5, 2]) and choice["robust_changes"] == pytest.approx([0, 0, -1, 0])
    assert (choice["clean"]["gained"], choice["clean"]["lost"]) == (2, 0)
    loose = max_selection(at_clean, at_robust, clean, robust, threshold=1.0)  # a 1-point drop is now allowed
    assert loose["index"] == 2 and loose["clean_gain"] == pytest.approx(5.0) and loose["robust_change"] == pytest.approx(-1.0)
    # Without a robust constraint the best clean row wins even when it is below the reference (no floor at 0).
    worse = torch.stack([_flip(at_clean, [0, 1, 2]), _flip(at_clean, [0])])
    only = max_selection(at_clean, None, worse, None, float("inf"))
    assert only["index"] == 1 and only["clean_gain"] == pytest.approx(-1.0)
    # No candidate keeps robust accuracy: the procedure keeps the reference (index -1, gain 0).
    none = max_selection(at_clean, at_robust, clean[2:3], robust[2:3], threshold=0.1)
    assert none["index"] == -1 and none["clean_gain"] == 0.0 and "clean" not in none
    with pytest.raises(ValueError, match=r"shaped \(candidates, 100\)"):
        max_selection(at_clean, at_robust, clean[:, :99], robust[:, :99])
    with pytest.raises(ValueError, match="for both the reference and the candidates"):
        max_selection(at_clean, None, clean, robust)


def test_the_null_is_centred_on_zero_for_one_candidate_and_biased_upwards_for_many():
    gen = torch.Generator().manual_seed(0)
    at = torch.rand(4000, generator=gen) < 0.7
    one = _noisy(at, 1, 200, seed=1)
    assert max_selection(at, None, one, None, float("inf"))["clean_gain"] == 0.0  # no effect, exactly
    single = selection_null(at, None, one, None, float("inf"), permutations=400, seed=3)
    # One candidate, no effect: the selected "gain" is the candidate's own sign-flipped difference, symmetric about 0
    # (sd = 100 * sqrt(200) / 4000 = 0.35 points; the mean over 400 copies is within 3 sd / 20 of 0).
    assert single["sd"] == pytest.approx(0.354, abs=0.05)
    assert abs(single["mean"]) < 3 * single["sd"] / 20
    many = selection_null(at, None, _noisy(at, 30, 200, seed=2), None, float("inf"), permutations=400, seed=3)
    # The best of 30 noisy candidates gains about 2 sd on average when none of them changes anything (the expected
    # maximum of 30 independent standard normals is 2.04).
    assert many["mean"] > 1.5 * single["sd"] and many["p95"] > single["p95"] and many["mean"] > 5 * abs(single["mean"])
    again = selection_null(at, None, _noisy(at, 30, 200, seed=2), None, float("inf"), permutations=400, seed=3)
    assert again == many  # the same seed, the same flips


def test_the_null_of_a_candidate_identical_to_the_reference_is_exactly_zero_and_a_real_gain_beats_it():
    gen = torch.Generator().manual_seed(1)
    at_clean, at_robust = torch.rand(1000, generator=gen) < 0.6, torch.rand(1000, generator=gen) < 0.4
    same = selection_null(at_clean, at_robust, at_clean[None], at_robust[None], 0.1, permutations=50, seed=0, observed=0.0)
    assert (same["mean"], same["p95"], same["max"]) == (0.0, 0.0, 0.0) and same["p_value"] == 1.0
    better = at_clean | (torch.arange(1000) < 200)  # right on every one of the first 200 images: a real gain
    gain = max_selection(at_clean, at_robust, torch.stack([at_clean, better]), torch.stack([at_robust, at_robust]))
    null = selection_null(at_clean, at_robust, torch.stack([at_clean, better]), torch.stack([at_robust, at_robust]), 0.1,
                          permutations=200, seed=0, observed=gain["clean_gain"])
    assert gain["index"] == 1 and gain["clean_gain"] > 5 and null["max"] < gain["clean_gain"]
    assert null["p_value"] == pytest.approx(1 / 201)  # no permutation reaches it; the observed copy counts once
    assert null["mean"] > 0  # the alpha-0 row (gain 0) floors every permuted choice: never below 0


def test_the_reference_procedure_chooses_the_epoch_on_clean_then_alpha_on_the_curve():
    gen = torch.Generator().manual_seed(2)
    at_clean, at_robust = torch.rand(500, generator=gen) < 0.6, torch.rand(500, generator=gen) < 0.4
    wrong_clean = (~at_clean).nonzero().flatten()
    epochs = torch.stack([_flip(at_clean, wrong_clean[:3].tolist()), _flip(at_clean, wrong_clean[:8].tolist()),
                          _flip(at_clean, wrong_clean[:8].tolist())])  # epochs 2 and 3 tie: the first is kept
    wrong_robust = (~at_robust).nonzero().flatten()
    right_robust = at_robust.nonzero().flatten()
    curve_clean = torch.stack([at_clean, _flip(at_clean, wrong_clean[:2].tolist()), _flip(at_clean, wrong_clean[:6].tolist()),
                               _flip(at_clean, wrong_clean[:8].tolist())])
    curve_robust = torch.stack([at_robust, _flip(at_robust, wrong_robust[:1].tolist()), at_robust,
                                _flip(at_robust, right_robust[:5].tolist())])  # alpha 1 loses 1 robust point
    report = reference_selection_report(at_clean, at_robust, epochs, [1, 2, 3], [0.0, 0.3, 0.6, 1.0], curve_clean, curve_robust,
                                        threshold=0.1, permutations=100, seed=0)
    assert report["epoch"] == 2 and report["epoch_stage"]["clean_gains"] == pytest.approx([0.6, 1.6, 1.6])
    assert report["alpha"] == 0.6 and report["clean_gain"] == pytest.approx(1.2) and report["robust_change"] == 0.0
    assert [p["alpha"] for p in report["curve"]] == [0.0, 0.3, 0.6, 1.0] and report["curve"][3]["robust_change"] == pytest.approx(-1.0)
    assert report["null"]["permutations"] == 100 and 0 <= report["null"]["mean"] <= report["null"]["p95"] <= report["null"]["max"]
    assert 0 < report["null"]["p_value"] <= 1 and report["clean"]["gained"] == 6
    with pytest.raises(ValueError, match="must include 0"):
        reference_selection_report(at_clean, at_robust, epochs, [1, 2, 3], [0.3, 0.6, 0.9, 1.0], curve_clean, curve_robust)
