"""Adversarial training (PGD-AT by default; TRADES or MART) with the recipe RiFT starts from."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import distributed
from ._loop import EpochCheckpoint, LoopState, train_epoch
from ._util import milestones_for, progress as _progress
from .checkpoint import read_checkpoint
from .compute import compiled
from .data import Batches
from .evaluation import accuracy, evaluate
from .losses import at_objective, check_method

__all__ = ["adversarial_train", "TrainResult"]


@dataclass
class TrainResult:
    """The trained model (best-on-validation weights loaded), per-epoch history and the best epoch."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1


def adversarial_train(
    model: nn.Module,
    train: Batches,
    val: Batches | None = None,
    epochs: int = 110,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    milestones: list[int] | None = None,
    eps: float = 8 / 255,
    step: float = 2 / 255,
    attack_steps: int = 10,
    method: str = "pgd",
    beta: float = 6.0,
    eval_steps: int = 10,
    eval_every: int = 1,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
    compile: bool = False,
) -> TrainResult:
    """Train ``model`` in place on PGD adversarial examples (``attack_steps=0``: standard training).

    Defaults are the paper's recipe (Bag of Tricks for AT): SGD momentum 0.9, weight decay 5e-4,
    lr 0.1 decayed x0.1 at epochs 100 and 105 of 110 (scaled to shorter runs), PGD-10 with step
    2/255 inside an 8/255 ball, random start, BatchNorm in eval mode while attacking.

    ``method`` picks the objective (see :mod:`riftlab.losses`): ``"pgd"`` (PGD-AT, cross-entropy
    on PGD examples), ``"trades"`` (CE on x + ``beta`` * KL to the KL-PGD example) or ``"mart"``
    (boosted CE on PGD examples + ``beta`` * KL weighted by 1 - p_y(x)); ``beta`` is ignored by
    ``"pgd"``. Method and beta are stored in the checkpoints' metadata (``at_method``, ``at_beta``),
    and resuming a run started with another method or beta is refused.

    After each epoch the model is evaluated on ``val`` (clean and PGD-``eval_steps``) and the
    checkpoint with the best validation robust accuracy (clean accuracy for standard training)
    is kept; it is loaded into ``model`` at the end. ``eval_every=k`` validates only every k-th
    epoch and the last one, and picks the best among those (a short run's early epochs, at the
    high learning rate, are never the best, and validating them costs as much as a third of a
    PGD-3 epoch). With ``out_dir``, ``last.pt`` (everything
    needed to resume) and ``best.pt`` are written atomically each epoch, and ``resume=True``
    continues from ``last.pt`` with the same result as an uninterrupted run.

    Speed: attacks and forward passes run under :func:`riftlab.compute.autocast` (bf16 on CUDA by
    default); ``compile=True`` trains through ``torch.compile(model)``. Under torchrun the model
    is trained with DistributedDataParallel, each rank on its slice of every batch (see
    :mod:`riftlab.distributed`); only rank 0 writes checkpoints.
    """
    if epochs < 1 or eval_every < 1:
        raise ValueError(f"epochs and eval_every must be >= 1, got {epochs} and {eval_every}")
    check_method(method, beta)
    if method != "pgd" and attack_steps < 1:
        raise ValueError(f"method {method!r} needs adversarial examples: attack_steps must be >= 1, got {attack_steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    milestones = milestones if milestones is not None else milestones_for(epochs, 110, (100, 105))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    adversarial = attack_steps > 0
    key = "val_robust_acc" if adversarial and val is not None else "val_clean_acc"
    ckpt = EpochCheckpoint(out_dir, {**(meta or {}), "at_method": method, "at_beta": float(beta)})
    if resume and ckpt.exists():
        _check_same_method(ckpt.last, method, float(beta))
    loop = ckpt.restore(model, opt, sched) if resume else LoopState()
    device = train.device
    fast = compiled(model, compile)
    trainer = distributed.ddp(fast)
    batches, _ = distributed.shard(train)
    for epoch in _progress(range(loop.next_epoch, epochs), progress, desc="adversarial training" if adversarial else "training",
                           initial=loop.next_epoch, total=epochs):
        model.train()
        batches.set_epoch(epoch)
        gen = torch.Generator(device=device).manual_seed(seed * 7919 + epoch + 1_000_003 * distributed.rank())
        objective = at_objective(method, eps, step, attack_steps, beta, generator=gen) if adversarial else None
        stats = train_epoch(trainer, batches, opt, loss_fn=objective)
        sched.step()
        if stats["first_bad_step"] >= 0:
            raise ckpt.nonfinite_error("training", stats["loss"], epoch, stats["first_bad_step"])
        record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": stats["loss"],
                  ("train_robust_acc" if adversarial else "train_clean_acc"): stats["acc"]}
        validate = val is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs)
        if validate:
            if adversarial:
                result = evaluate(fast, val, eps, step, eval_steps, restarts=1, seed=seed)
                record["val_clean_acc"], record["val_robust_acc"] = result["clean_acc"], result["robust_acc"]
            else:
                record["val_clean_acc"] = accuracy(fast, val)
        loop.history.append(record)
        changed = loop.update_best(epoch + 1, record.get(key, -stats["loss"]), model) if validate or val is None else False
        ckpt.save(model, opt, sched, epoch, loop, changed)
    opt.zero_grad(set_to_none=True)  # hand back a model without stale gradients
    if loop.best_state is not None:
        model.load_state_dict(loop.best_state)
    return TrainResult(model, loop.history, loop.best_epoch)


def _check_same_method(last: Path, method: str, beta: float) -> None:
    """Refuse to continue a run of another method: the mixed result would be neither."""
    saved = read_checkpoint(last).get("meta", {})
    old_method, old_beta = saved.get("at_method", "pgd"), float(saved.get("at_beta", 6.0))
    if old_method != method or (method != "pgd" and old_beta != beta):
        raise ValueError(f"{last} belongs to a run with method {old_method!r} (beta {old_beta}), not {method!r} (beta {beta}); "
                         "resume with the same method, or start over in another folder")
