"""Adversarial-training objectives: PGD-AT (Madry et al. 2018), TRADES (Zhang et al. 2019) and
MART (Wang et al. 2020), so RiFT can start from a model trained with any of them.

With clean logits z = f(x), adversarial logits z' = f(x'), p = softmax(z), p' = softmax(z'):

    PGD-AT:  CE(z', y)                                   x' = PGD on CE, uniform random start
    TRADES:  CE(z, y) + beta * KL(p || p')               x' = PGD on KL(p || p'), start x + 0.001 N(0, 1)
    MART:    CE(z', y) - log(1 - max_{k != y} p'_k)       x' = PGD on CE, uniform random start
             + beta * mean_i[ KL(p_i || p'_i) * (1 - p_i,y) ]

KL is summed over classes and averaged over the batch. Attacks run with BatchNorm in eval mode;
the outer loss is computed in whatever mode the model is in (train mode during training), with
separate forward passes for clean and adversarial batches, as in the original implementations.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attacks import eval_mode, pgd
from ..compute import autocast, input_gradients_only, loss_scale
from ..distributed import unwrap

__all__ = ["AT_METHODS", "trades_loss", "mart_loss", "trades_attack", "at_objective"]

AT_METHODS = ("pgd", "trades", "mart")

Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def check_method(method: str, beta: float = 6.0) -> None:
    """Raise ValueError for an unknown adversarial-training method or a negative beta."""
    if method not in AT_METHODS:
        raise ValueError(f"unknown adversarial-training method {method!r}; choices: {', '.join(AT_METHODS)}")
    if not beta >= 0 or beta == float("inf"):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")


def _kl_per_example(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits_p) || softmax(logits_q)) for each row, (N, K) -> (N,), in log space."""
    return F.kl_div(F.log_softmax(logits_q, dim=1), F.log_softmax(logits_p, dim=1), reduction="none", log_target=True).sum(1)


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float = 6.0) -> torch.Tensor:
    """TRADES: CE(z, y) + beta * mean_i KL(p_i || p'_i) (a scalar).

    Args:
        logits_clean: f(x), (N, K).
        logits_adv: f(x'), (N, K).
        y: labels, (N,).
        beta: weight of the robustness (KL) term; 6 in the TRADES paper, 0 gives plain CE on x.
    """
    return F.cross_entropy(logits_clean, y) + beta * _kl_per_example(logits_clean, logits_adv).mean()


def mart_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float = 6.0) -> torch.Tensor:
    """MART: boosted CE on x' plus beta times the KL term weighted by 1 - p_y(x) (a scalar).

    The boosting term -log(1 - max_{k != y} p'_k) is computed exactly in log space
    (log(1 - p'_k) = logsumexp_{j != k} z'_j - logsumexp_j z'_j), not with the original code's
    ``log(1.0001 - p + 1e-12)`` guard, so it stays finite and exact for confident predictions.

    Args:
        logits_clean: f(x), (N, K).
        logits_adv: f(x'), (N, K).
        y: labels, (N,).
        beta: weight of the KL term; 6 in the MART paper, 0 leaves the boosted CE alone.
    """
    true_class = F.one_hot(y, logits_adv.shape[1]).bool()
    runner_up = logits_adv.detach().masked_fill(true_class, float("-inf")).argmax(1)
    without_runner_up = logits_adv.masked_fill(F.one_hot(runner_up, logits_adv.shape[1]).bool(), float("-inf"))
    log_not_runner_up = without_runner_up.logsumexp(1) - logits_adv.logsumexp(1)  # log(1 - p'_runner_up)
    boosted_ce = F.cross_entropy(logits_adv, y) - log_not_runner_up.mean()
    p_true = F.softmax(logits_clean, dim=1).gather(1, y[:, None]).squeeze(1)
    return boosted_ce + beta * (_kl_per_example(logits_clean, logits_adv) * (1 - p_true)).mean()


def trades_attack(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    step: float,
    steps: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TRADES' inner maximisation: l_inf PGD on KL(p(x) || p(x')), starting from x + 0.001 N(0, 1).

    Needs no labels. BatchNorm runs in eval mode; weights get no ``.grad``.

    Args:
        model: maps images in [0, 1], (N, C, H, W), to logits (N, K).
        x: clean images in [0, 1], (N, C, H, W).
        eps: l_inf radius in pixel units (8/255 for CIFAR).
        step: step size in pixel units (2/255 for CIFAR).
        steps: number of sign-gradient steps.
        generator: random source for the start point.

    Returns:
        Adversarial images, detached, within eps of x and in [0, 1].
    """
    if eps < 0 or step < 0 or steps < 0:
        raise ValueError(f"eps, step and steps must be non-negative (got eps={eps}, step={step}, steps={steps})")
    x = x.detach()
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    x_adv = torch.min(torch.max(x + 0.001 * noise, x - eps), x + eps).clamp_(0, 1)
    model = unwrap(model)
    scale = loss_scale(x.device)  # fp16: keep small input gradients from underflowing (the sign is unchanged)
    with eval_mode(model), input_gradients_only(model):
        with torch.no_grad(), autocast(x.device):
            log_p_clean = F.log_softmax(model(x).float(), dim=1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with autocast(x.device):
                log_p_adv = F.log_softmax(model(x_adv).float(), dim=1)
                loss = F.kl_div(log_p_adv, log_p_clean, reduction="sum", log_target=True)
            (grad,) = torch.autograd.grad(loss * scale if scale != 1.0 else loss, x_adv)
            with torch.no_grad():
                x_adv = x_adv.detach() + step * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()


def at_objective(
    method: str,
    eps: float,
    step: float,
    steps: int,
    beta: float = 6.0,
    generator: torch.Generator | None = None,
    attacker: nn.Module | None = None,
) -> Objective:
    """The training loss of ``method`` as ``fn(model, x, y) -> (loss, adversarial logits)``.

    The adversarial example is crafted inside ``fn`` (BatchNorm in eval mode), then the loss is
    computed with the model in its current mode. The returned logits are those of x' (for the
    training robust accuracy). ``beta`` is ignored by ``"pgd"``. ``attacker``, when given, is the
    network the attack runs through instead of ``model`` (the same weights: under torchrun and
    ``--compile``, ``model`` is ``compile(DDP(net))`` for the update and ``attacker`` ``compile(net)``).
    """
    check_method(method, beta)

    def attack_model(model: nn.Module) -> nn.Module:
        return attacker if attacker is not None else model

    def pgd_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_adv = model(pgd(attack_model(model), x, y, eps, step, steps, generator=generator)).float()
        return F.cross_entropy(logits_adv, y), logits_adv

    def trades(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = trades_attack(attack_model(model), x, eps, step, steps, generator=generator)
        logits_clean, logits_adv = model(x).float(), model(x_adv).float()
        return trades_loss(logits_clean, logits_adv, y, beta), logits_adv

    def mart(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = pgd(attack_model(model), x, y, eps, step, steps, generator=generator)
        logits_clean, logits_adv = model(x).float(), model(x_adv).float()
        return mart_loss(logits_clean, logits_adv, y, beta), logits_adv

    return {"pgd": pgd_at, "trades": trades, "mart": mart}[method]
