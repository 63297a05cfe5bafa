"""Gradient-masking checks: an honest model passes them, masked and randomised models are flagged."""

import json

import pytest
import torch
import torch.nn as nn
from _tiny_models import ROUNDED, TINY, trained_tiny

from riftlab import Batches, build_model, save_checkpoint
from riftlab.cli import main
from riftlab.evaluation.sanity import autoattack_checks, gradient_masking_checks, is_flagged, warning_lines

EPS, STEP = 8 / 255, 2 / 255


class Noisy(nn.Module):
    """Adds fresh Gaussian noise to the input on every call (a randomised defence)."""

    def __init__(self, net: nn.Module, sigma: float = 0.1):
        super().__init__()
        self.net, self.sigma = net, sigma
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self.gen).to(x.device)
        return self.net((x + self.sigma * noise).clamp(0, 1))


@pytest.fixture(scope="module")
def honest(tiny_splits):
    """A tiny CNN trained normally: about 90% clean accuracy, no robustness at 8/255."""
    return trained_tiny(tiny_splits, attack_steps=0, epochs=8)


def _rounded(tiny_splits, honest):
    """The honest model's weights behind a rounding of the input (zero gradient everywhere): a masked model."""
    info = tiny_splits.info
    model = build_model(ROUNDED, info.num_classes, info.channels, info.image_size, 8, info.mean, info.std)
    model.load_state_dict(honest.state_dict())
    return model.eval()


def _data(tiny_splits, n=128):
    return Batches(tiny_splits.test.subset(n), 64)


def _by_name(checks):
    return {c.name: c for c in checks}


def test_honest_model_passes_every_check(tiny_splits, honest):
    checks = gradient_masking_checks(honest, _data(tiny_splits), EPS, STEP)
    names = _by_name(checks)
    assert set(names) == {"eps_zero_is_clean", "more_restarts_never_help", "more_steps_never_help", "monotone_in_eps",
                          "large_eps_breaks_model", "gradients_not_zero"}
    assert not is_flagged(checks), warning_lines(checks)
    assert warning_lines(checks) == []
    curve = names["monotone_in_eps"].values
    assert curve["eps"][0] == 0 and curve["eps"][-1] == 0.5
    assert curve["robust_acc"][0] > 80 and curve["robust_acc"][-1] == 0  # accurate, and broken at a large radius
    assert all(isinstance(c.to_dict()["detail"], str) for c in checks)


def test_masked_model_is_flagged(tiny_splits, honest):
    checks = gradient_masking_checks(_rounded(tiny_splits, honest), _data(tiny_splits), EPS, STEP)
    names = _by_name(checks)
    assert is_flagged(checks)
    failed = {c.name for c in checks if not c.passed}
    assert {"gradients_not_zero", "large_eps_breaks_model"} <= failed
    assert names["large_eps_breaks_model"].values["robust_acc"] > 2  # random noise, not an attack, is all PGD manages
    lines = warning_lines(checks)
    assert len(lines) == len(failed)
    assert any(line.startswith("WARNING: sanity check gradients_not_zero failed:") and "exactly zero" in line for line in lines)


def test_randomised_model_is_flagged(tiny_splits, honest):
    checks = gradient_masking_checks(Noisy(honest), _data(tiny_splits, 64), EPS, STEP, eps_factors=(0.0, 1.0), steps=3)
    failed = {c.name for c in checks if not c.passed}
    assert "eps_zero_is_clean" in failed  # its output changes with nothing attacked


def test_autoattack_comparison_tolerances():
    ok = autoattack_checks(pgd_acc=52.0, autoattack_acc=48.5, n=1000)
    assert not is_flagged(ok)
    gap = _by_name(autoattack_checks(pgd_acc=60.0, autoattack_acc=30.0, n=1000))
    assert gap["pgd_not_below_autoattack"].passed and not gap["autoattack_gap_small"].passed
    below = _by_name(autoattack_checks(pgd_acc=40.0, autoattack_acc=45.0, n=1000))
    assert not below["pgd_not_below_autoattack"].passed
    # One example of 16 either way is within the slack of a 16-image comparison.
    assert not is_flagged(autoattack_checks(pgd_acc=50.0, autoattack_acc=56.25, n=16))


def test_bad_arguments_are_reported(tiny_splits, honest):
    with pytest.raises(ValueError, match="restarts"):
        gradient_masking_checks(honest, _data(tiny_splits, 8), EPS, STEP, restarts=1)
    with pytest.raises(ValueError, match="include 0"):
        gradient_masking_checks(honest, _data(tiny_splits, 8), EPS, STEP, eps_factors=(1.0, 2.0))
    with pytest.raises(ValueError, match="pixel units"):
        gradient_masking_checks(honest, _data(tiny_splits, 8), 8.0, STEP)


def _evaluate_cli(tmp_path, model, name, capsys):
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, {"model_state": model.state_dict(), "meta": {"dataset": "synthetic-cifar10", **model.riftlab_config}})
    code = main(["evaluate", "--checkpoint", str(path), "--profile", "demo", "--test-subset", "128", "--steps", "10",
                 "--autoattack", "16", "--sanity", "--sanity-examples", "128", "--device", "cpu", "--no-progress", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads((tmp_path / f"evaluate-{name}-test.json").read_text())
    return result, captured.err


def test_cli_evaluate_autoattack_and_sanity(tmp_path, tiny_splits, honest, capsys):
    assert honest.riftlab_config["model"] == TINY
    result, err = _evaluate_cli(tmp_path, honest, "honest", capsys)
    aa = result["autoattack"]
    assert aa["n"] == 16 and aa["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"] and aa["eps"] == pytest.approx(EPS)
    assert 0 <= aa["robust_acc"] <= aa["pgd_robust_acc"] <= aa["clean_acc"]
    assert (tmp_path / "autoattack-honest-test.log").is_file()
    assert result["sanity_examples"] == 128 and len(result["sanity"]) == 8  # six checks plus the two AutoAttack comparisons
    assert result["flagged"] is False and "WARNING" not in err


def test_cli_flags_a_masked_checkpoint(tmp_path, tiny_splits, honest, capsys):
    result, err = _evaluate_cli(tmp_path, _rounded(tiny_splits, honest), "masked", capsys)
    aa = result["autoattack"]
    assert aa["pgd_robust_acc"] > aa["robust_acc"] + 20  # blind PGD reports robustness that the black-box Square attack removes
    assert result["flagged"] is True
    failed = [c["name"] for c in result["sanity"] if not c["passed"]]
    assert {"gradients_not_zero", "large_eps_breaks_model", "autoattack_gap_small"} <= set(failed)
    lines = err.splitlines()
    for name in failed:  # every failure is on the console too, with its numbers
        assert any(line.startswith(f"WARNING: sanity check {name} failed: ") for line in lines), (name, err)
    assert "robust accuracy at eps=0.5 is" in err and f"from AutoAttack's {aa['robust_acc']:.2f}%" in err
