"""Standard AutoAttack (the pyautoattack package) on a tiny riftlab model, on CPU."""

import logging

import pytest
import torch
from _tiny_models import trained_tiny

from riftlab import evaluate
from riftlab.evaluation.autoattack import autoattack_accuracy

EPS = 8 / 255


@pytest.fixture(scope="module")
def robust_tiny(tiny_splits):
    """A tiny CNN adversarially trained for a few epochs: some test images survive PGD at 8/255."""
    return trained_tiny(tiny_splits, attack_steps=2, epochs=4)


def _first(tiny_splits, n):
    return tiny_splits.test.float()[:n], tiny_splits.test.labels[:n]


def test_standard_autoattack_bounds_agrees_with_pgd_and_repeats(tiny_splits, robust_tiny, tmp_path):
    x, y = _first(tiny_splits, 16)
    log = tmp_path / "aa.log"
    logger = logging.getLogger("auto-attack")
    before = (logger.level, logger.propagate, list(logger.handlers))
    torch.manual_seed(123)
    rng = torch.random.get_rng_state()
    for p in robust_tiny.parameters():
        p.grad = None
    aa = autoattack_accuracy(robust_tiny, x, y, EPS, seed=3, log_path=log)
    # FAB calls backward(): the weights must still require grad and must not have received any.
    assert all(p.requires_grad and p.grad is None for p in robust_tiny.parameters())
    assert torch.equal(torch.random.get_rng_state(), rng)  # AutoAttack reseeds globally; riftlab forks the generator
    assert (logger.level, logger.propagate, list(logger.handlers)) == before  # the package's logger is restored
    assert aa["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"] and aa["n"] == 16 and aa["version"] == "standard"
    with torch.no_grad():
        assert aa["clean_acc"] == pytest.approx(100.0 * float((robust_tiny(x).argmax(1) == y).float().mean()))
    assert 0 < aa["robust_acc"] <= aa["clean_acc"]  # some images survive all four attacks; none gains from being attacked
    pgd = evaluate(robust_tiny, [(x, y)], EPS, 2 / 255, steps=10, restarts=3)
    assert pgd["clean_acc"] == aa["clean_acc"]
    assert pgd["robust_acc"] >= aa["robust_acc"]  # AutoAttack is the stronger attack
    text = log.read_text()
    assert "robust accuracy after APGD-CE" in text and "robust accuracy after SQUARE" in text
    again = autoattack_accuracy(robust_tiny, x, y, EPS, seed=3)  # same seed, same images: same result
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in aa.items() if k != "seconds"}


def test_autoattack_restores_train_mode_and_rejects_bad_input(tiny_splits, robust_tiny):
    x, y = _first(tiny_splits, 4)
    robust_tiny.train()
    try:
        large = autoattack_accuracy(robust_tiny, x, y, 0.5)  # every image falls to APGD-CE: the later attacks are skipped
        assert robust_tiny.training and all(m.training for m in robust_tiny.modules())
    finally:
        robust_tiny.eval()
    assert large["robust_acc"] == 0
    none = autoattack_accuracy(robust_tiny, x, y, 0.0)
    assert none["robust_acc"] == none["clean_acc"] and none["attacks"] == []
    with pytest.raises(ValueError, match="version"):
        autoattack_accuracy(robust_tiny, x, y, EPS, version="fast")
    with pytest.raises(ValueError, match="pixel units"):
        autoattack_accuracy(robust_tiny, x, y, 8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        autoattack_accuracy(robust_tiny, x * 255, y, EPS)
