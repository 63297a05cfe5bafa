"""The l_inf PGD attack (Madry et al.), with BatchNorm in eval mode while attacking."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .compute import autocast, input_gradients_only, loss_scale
from .distributed import unwrap
from .graphs import graphed_for

__all__ = ["pgd", "eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore each submodule's mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step: float,
    steps: int,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient descent under an l_inf budget, maximising the cross-entropy.

    BatchNorm runs in eval mode during the attack (its statistics are not updated by adversarial
    batches, and each example is attacked independently of its batch mates). Only the gradient
    with respect to the input is computed: weights get no ``.grad``, and the backward pass skips
    the weight-gradient kernels (a compiled model's weights are frozen for the attack, see
    :func:`riftlab.compute.input_gradients_only`). Forward and backward run under
    :func:`riftlab.compute.autocast` (bf16 or fp16 on CUDA by default); the step and the
    projection are fp32. With CUDA graphs on (:mod:`riftlab.graphs`) the steps are one graph
    replay per batch shape; the random start is drawn before, as without.

    Args:
        model: maps images in [0, 1], shaped (N, C, H, W), to logits (N, K).
        x: clean images in [0, 1], (N, C, H, W).
        y: labels, (N,).
        eps: l_inf radius in pixel units (8/255 for CIFAR).
        step: step size in pixel units (2/255 for CIFAR).
        steps: number of gradient steps (0 returns the start point).
        random_start: start from a uniform point in the eps ball, as in PGD-AT.
        generator: random source for the start point (for reproducible attacks).

    Returns:
        Adversarial images, detached, with ``|x_adv - x| <= eps`` and values in [0, 1].
    """
    if eps < 0 or step < 0 or steps < 0:
        raise ValueError(f"eps, step and steps must be non-negative (got eps={eps}, step={step}, steps={steps})")
    x = x.detach()
    if random_start and eps > 0:
        x_adv = random_start_point(x, eps, generator)
    else:
        x_adv = x.clone()
    return graphed_for(model, _ascend, (eps, step, steps))(x, y, x_adv)


def random_start_point(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform random point of the l_inf ball of radius ``eps`` around ``x``, clipped to [0, 1]; shape of ``x``."""
    return start_from_uniform(x, torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator), eps)


def start_from_uniform(x: torch.Tensor, uniform: torch.Tensor, eps: float) -> torch.Tensor:
    """The start point that ``uniform`` (draws in [0, 1), shaped like ``x``) picks in the l_inf ball of radius ``eps``
    around ``x``, clipped to [0, 1]. Drawing the uniforms apart lets a CUDA graph take them from a buffer filled outside it."""
    return (x + (uniform * (2 * eps) - eps)).clamp_(0, 1)


def _ascend(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, eps: float, step: float, steps: int) -> torch.Tensor:
    """``steps`` signed-gradient ascent steps from ``x_adv``, each projected onto the eps ball around ``x`` and [0, 1]."""
    if eps == 0 or steps == 0:
        return x_adv
    model = unwrap(model)  # a DDP wrapper would prepare a gradient all-reduce that never comes
    scale = loss_scale(x.device)  # fp16: keep small input gradients from underflowing (the sign is unchanged)
    with eval_mode(model), input_gradients_only(model):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with autocast(x.device):
                loss = F.cross_entropy(model(x_adv).float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss * scale if scale != 1.0 else loss, x_adv)
            with torch.no_grad():
                x_adv = x_adv.detach() + step * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()
