"""Checks that a PGD robust accuracy is not an artefact of gradient masking.

A model can look robust because the attack fails, not because the model resists it: gradients
that are zero, shattered or random make PGD stall (Athalye et al. 2018, "Obfuscated gradients";
Carlini et al. 2019, "On evaluating adversarial robustness"). The symptoms are testable:

=============================  ==============================================  ==============
check                          what a sound evaluation shows                   kind
=============================  ==============================================  ==============
``eps_zero_is_clean``          the attack at eps = 0 leaves clean accuracy     exact
``more_restarts_never_help``   more random restarts never raise robust acc.   exact (*)
``more_steps_never_help``      PGD with 4x the steps is not weaker             statistical
``monotone_in_eps``            robust accuracy never rises with eps            statistical
``large_eps_breaks_model``     at eps = 0.5 robust accuracy is about 0         statistical
``gradients_not_zero``         the input gradient is non-zero everywhere       exact
``pgd_not_below_autoattack``   PGD accuracy >= AutoAttack accuracy             statistical
``autoattack_gap_small``       PGD is not far above AutoAttack                 statistical
=============================  ==============================================  ==============

(*) Each restart attacks only the examples still classified correctly, with random starts drawn
from a generator seeded per batch, so the first restart of the R-restart run repeats the 1-restart
run exactly: on bit-reproducible hardware (CPU) R restarts can only remove examples, and any
increase means the model's output is random or depends on its batch mates (a randomised defence,
dropout or BatchNorm left in training mode). CUDA kernels are not all bit-reproducible (atomic
adds in some backward passes), so there the check gets the statistical slack.

Statistical checks compare two attacks that are each only upper bounds; they allow ``slack``
points (at least one example). PGD keeps its last iterate, so extra steps can lose an example it
had fooled earlier; independent attacks at two radii can disagree on borderline examples.

Why eps = 0.5 (pixel units) for the large radius: the l_inf ball of radius 0.5 around any image
in [0, 1] contains the uniform grey image, and every pixel can be moved anywhere on its side of
grey, so no image keeps its content; an attack that works drives accuracy to about 0 whatever the
dataset (64/255 would be large for CIFAR but not for Fashion-MNIST's eps of 0.1). A model whose
gradients carry no information stays at the accuracy of random noise there (about 1/K).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attacks import eval_mode
from ..compute import autocast
from .robust import _robust_correct

__all__ = ["CheckResult", "gradient_masking_checks", "autoattack_checks", "is_flagged", "warning_lines", "LARGE_EPS"]

LARGE_EPS = 0.5
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class CheckResult:
    """One sanity check: its name, whether it passed, a one-line explanation and the numbers."""

    name: str
    passed: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_flagged(checks: Sequence[CheckResult | Mapping[str, Any]]) -> bool:
    """True when any check failed."""
    return any(not (c.passed if isinstance(c, CheckResult) else c["passed"]) for c in checks)


def warning_lines(checks: Sequence[CheckResult | Mapping[str, Any]]) -> list[str]:
    """``WARNING: ...`` lines naming each failed check and its numbers (empty when all passed)."""
    lines = []
    for c in checks:
        name, passed, detail = (c.name, c.passed, c.detail) if isinstance(c, CheckResult) else (c["name"], c["passed"], c["detail"])
        if not passed:
            lines.append(f"WARNING: sanity check {name} failed: {detail}")
    return lines


def _robust_mask(model: nn.Module, data: Sequence[Batch], eps: float, step: float, steps: int, restarts: int,
                 seed: int) -> torch.Tensor:
    """Per example: correct on the clean image and under every one of ``restarts`` PGD attacks.

    The random starts of batch ``i`` come from a generator seeded with (seed, i), so runs that
    differ only in ``restarts`` share their first restarts exactly.
    """
    masks = []
    for i, (x, y) in enumerate(data):
        gen = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + i)
        masks.append(_robust_correct(model, x, y, eps, step, steps, restarts, gen)[1])
    return torch.cat(masks)


def _zero_gradient_count(model: nn.Module, data: Sequence[Batch]) -> tuple[int, int]:
    """(examples classified correctly whose input gradient of the cross-entropy is exactly 0, examples classified correctly)."""
    zero = correct = 0
    for x, y in data:
        x = x.detach().clone().requires_grad_(True)
        logits = model(x)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
        ok = logits.argmax(1) == y
        zero += int((grad.flatten(1).abs().amax(1)[ok] == 0).sum())
        correct += int(ok.sum())
    return zero, correct


def gradient_masking_checks(
    model: nn.Module,
    batches: Iterable[Batch],
    eps: float,
    step: float,
    steps: int = 10,
    restarts: int = 3,
    eps_factors: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0),
    large_eps: float = LARGE_EPS,
    large_eps_max_acc: float = 2.0,
    more_steps_factor: int = 4,
    slack: float = 1.0,
    autoattack: Mapping[str, Any] | None = None,
    max_autoattack_gap: float = 10.0,
    seed: int = 0,
) -> list[CheckResult]:
    """Run the gradient-masking checks of this module's table on ``batches`` (see the module doc).

    Args:
        model: maps images in [0, 1], (N, C, H, W), to logits; run in eval mode.
        batches: the evaluation images, (x, y) pairs; iterated once and kept in memory.
        eps, step: the l_inf budget and PGD step of the evaluation, pixel units. On the eps
            grid the step scales with the radius (step * eps_k / eps).
        steps: PGD steps of the evaluation; ``more_steps_factor`` times as many for the steps check.
        restarts: restarts compared with a single one (must be >= 2).
        eps_factors: the grid, as multiples of ``eps`` (0 must be included); ``large_eps`` is
            added to it.
        large_eps: the radius at which robust accuracy must be about 0, in pixel units.
        large_eps_max_acc: the largest robust accuracy (percent) accepted at ``large_eps``.
        slack: tolerance of the statistical checks, in percentage points (at least one example).
        autoattack: a result of :func:`riftlab.autoattack.autoattack_accuracy` with
            ``pgd_robust_acc`` (PGD on the same images) added; adds the two AutoAttack checks.
        max_autoattack_gap: the largest accepted PGD - AutoAttack gap, in points.
        seed: seed of the PGD random starts.

    Returns:
        A list of :class:`CheckResult` (``passed=False`` for each symptom found).
    """
    if restarts < 2:
        raise ValueError(f"restarts must be >= 2 to compare with a single restart, got {restarts}")
    if steps < 1 or more_steps_factor < 2:
        raise ValueError(f"steps must be >= 1 and more_steps_factor >= 2, got {steps} and {more_steps_factor}")
    if not 0 < eps <= 1 or not 0 < step <= 1:
        raise ValueError(f"eps and step must be in (0, 1] (pixel units), got {eps} and {step}")
    if 0.0 not in eps_factors or any(f < 0 for f in eps_factors):
        raise ValueError(f"eps_factors must be non-negative and include 0 (the clean check), got {tuple(eps_factors)}")
    if not 0 < large_eps <= 1:
        raise ValueError(f"large_eps must be in (0, 1] (pixel units), got {large_eps}")
    data = [(x, y) for x, y in batches]
    if not data:
        raise ValueError("no evaluation batches: the split is empty")
    n = sum(len(y) for _, y in data)
    device = data[0][0].device
    slack_n = max(1, math.ceil(slack * n / 100))

    def pct(count: int | torch.Tensor) -> float:
        return 100.0 * float(count) / n

    checks: list[CheckResult] = []
    with eval_mode(model):
        with torch.no_grad():  # the evaluation's own clean path (its precision, its batches), so that eps = 0 must equal it exactly
            clean = 0
            for x, y in data:
                with autocast(x.device):
                    clean += int((model(x).argmax(1) == y).sum())

        grid = sorted({min(1.0, f * eps) for f in eps_factors} | {large_eps})
        counts = {}
        masks = {}
        for e in grid:
            mask = _robust_mask(model, data, e, min(e, step * e / eps), steps, 1, seed)
            masks[e], counts[e] = mask, int(mask.sum())

        at_zero = counts[0.0]
        checks.append(CheckResult(
            "eps_zero_is_clean", at_zero == clean,
            f"robust accuracy at eps=0 is {pct(at_zero):.2f}%, clean accuracy {pct(clean):.2f}%"
            + ("" if at_zero == clean else ": the model's output changes without any perturbation (randomness or batch dependence)"),
            {"clean_acc": pct(clean), "robust_acc_eps0": pct(at_zero)}))

        base = masks.get(eps)
        if base is None:
            base = _robust_mask(model, data, eps, step, steps, 1, seed)
        more = _robust_mask(model, data, eps, step, steps, restarts, seed)
        gained = int((more & ~base).sum())
        tolerance = 0 if device.type == "cpu" else slack_n
        checks.append(CheckResult(
            "more_restarts_never_help", gained <= tolerance,
            f"PGD-{steps} robust accuracy {pct(base.sum()):.2f}% with 1 restart, {pct(more.sum()):.2f}% with {restarts}; "
            f"{gained} example(s) robust only with more restarts (allowed {tolerance})",
            {"robust_acc_1_restart": pct(base.sum()), f"robust_acc_{restarts}_restarts": pct(more.sum()), "examples_gained": gained,
             "allowed": tolerance}))

        long_steps = steps * more_steps_factor
        longer = int(_robust_mask(model, data, eps, step, long_steps, 1, seed).sum())
        checks.append(CheckResult(
            "more_steps_never_help", longer <= int(base.sum()) + slack_n,
            f"robust accuracy {pct(base.sum()):.2f}% with PGD-{steps}, {pct(longer):.2f}% with PGD-{long_steps} "
            f"(allowed rise {pct(slack_n):.2f} points)",
            {f"robust_acc_pgd{steps}": pct(base.sum()), f"robust_acc_pgd{long_steps}": pct(longer), "allowed_rise": pct(slack_n)}))

        rises = [(a, b) for a, b in zip(grid, grid[1:]) if counts[b] > counts[a] + slack_n]
        curve = ", ".join(f"{e:.4f}: {pct(counts[e]):.2f}%" for e in grid)
        checks.append(CheckResult(
            "monotone_in_eps", not rises,
            f"robust accuracy over eps ({curve})"
            + ("" if not rises else "; rises from eps " + ", ".join(f"{a:.4f} to {b:.4f}" for a, b in rises)),
            {"eps": grid, "robust_acc": [pct(counts[e]) for e in grid], "allowed_rise": pct(slack_n)}))

        at_large = pct(counts[large_eps])
        checks.append(CheckResult(
            "large_eps_breaks_model", at_large <= large_eps_max_acc,
            f"robust accuracy at eps={large_eps} is {at_large:.2f}% (must be <= {large_eps_max_acc}%; an attack that works "
            "reaches about 0 there)",
            {"large_eps": large_eps, "robust_acc": at_large, "max_acc": large_eps_max_acc}))

        zero, correct = _zero_gradient_count(model, data)
        checks.append(CheckResult(
            "gradients_not_zero", zero == 0,
            f"{zero} of {correct} correctly classified examples have an input gradient that is exactly zero"
            + ("" if zero == 0 else " (non-differentiable layers or a saturated softmax: PGD cannot move them)"),
            {"zero_gradient_examples": zero, "correct_examples": correct}))

    if autoattack is not None:
        checks.extend(autoattack_checks(autoattack["pgd_robust_acc"], autoattack["robust_acc"], int(autoattack["n"]),
                                        slack=slack, max_gap=max_autoattack_gap))
    return checks


def autoattack_checks(pgd_acc: float, autoattack_acc: float, n: int, slack: float = 1.0, max_gap: float = 10.0) -> list[CheckResult]:
    """Compare PGD and AutoAttack robust accuracy (percent) on the same ``n`` images.

    AutoAttack is the stronger attack, so PGD should not be below it (beyond ``slack`` points, at
    least one example: neither is exact); PGD far above it (more than ``max_gap`` points, at least
    one example beyond the slack) means PGD's gradients mislead it: gradient masking.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    one = 100.0 / n
    below = max(slack, one)
    gap_allowed = max(max_gap, below + one)
    gap = pgd_acc - autoattack_acc
    return [
        CheckResult("pgd_not_below_autoattack", gap >= -below - 1e-9,
                    f"PGD robust accuracy {pgd_acc:.2f}%, AutoAttack {autoattack_acc:.2f}% on the same {n} images "
                    f"(PGD may be below by {below:.2f} points at most)",
                    {"pgd_robust_acc": pgd_acc, "autoattack_robust_acc": autoattack_acc, "n": n, "allowed": below}),
        CheckResult("autoattack_gap_small", gap <= gap_allowed + 1e-9,
                    f"PGD robust accuracy {pgd_acc:.2f}% is {gap:+.2f} points from AutoAttack's {autoattack_acc:.2f}% "
                    f"on the same {n} images (allowed {gap_allowed:.2f}; more suggests gradient masking)",
                    {"pgd_robust_acc": pgd_acc, "autoattack_robust_acc": autoattack_acc, "n": n, "gap": gap, "allowed": gap_allowed}),
    ]
