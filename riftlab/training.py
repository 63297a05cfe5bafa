"""PGD adversarial training (Madry et al.) with the recipe RiFT starts from."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._util import clone_state, milestones_for, progress as _progress
from .attacks import pgd
from .checkpoint import read_checkpoint, save_checkpoint
from .data import Batches
from .evaluation import evaluate

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
    eval_steps: int = 10,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train ``model`` in place on PGD adversarial examples (``attack_steps=0``: standard training).

    Defaults are the paper's recipe (Bag of Tricks for AT): SGD momentum 0.9, weight decay 5e-4,
    lr 0.1 decayed x0.1 at epochs 100 and 105 of 110 (scaled to shorter runs), PGD-10 with step
    2/255 inside an 8/255 ball, random start, BatchNorm in eval mode while attacking.

    After each epoch the model is evaluated on ``val`` (clean and PGD-``eval_steps``) and the
    checkpoint with the best validation robust accuracy (clean accuracy for standard training)
    is kept; it is loaded into ``model`` at the end. With ``out_dir``, ``last.pt`` (everything
    needed to resume) and ``best.pt`` are written atomically each epoch, and ``resume=True``
    continues from ``last.pt`` with the same result as an uninterrupted run.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    milestones = milestones if milestones is not None else milestones_for(epochs, 110, (100, 105))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    adversarial = attack_steps > 0
    key = "val_robust_acc" if adversarial and val is not None else "val_clean_acc"
    history: list[dict[str, float]] = []
    best_epoch, best_score, best_state = -1, -math.inf, None
    start = 0
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and resume and (out / "last.pt").is_file():
        state = read_checkpoint(out / "last.pt", map_location=next(model.parameters()).device)
        model.load_state_dict(state["model_state"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, best_epoch, best_score = list(state["history"]), state["best_epoch"], state["best_score"]
        best_state = read_checkpoint(out / "best.pt", map_location=next(model.parameters()).device)["model_state"]
        start = state["epoch"] + 1
    device = train.device
    for epoch in _progress(range(start, epochs), progress, desc="adversarial training" if adversarial else "training", initial=start, total=epochs):
        model.train()
        train.set_epoch(epoch)
        gen = torch.Generator(device=device).manual_seed(seed * 7919 + epoch)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        for x, y in train:
            x_in = pgd(model, x, y, eps, step, attack_steps, generator=gen) if adversarial else x
            logits = model(x_in)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        sched.step()
        train_loss = float(loss_sum) / seen
        if not math.isfinite(train_loss):
            where = f"; the last good checkpoint is {out / 'last.pt'}" if out is not None and (out / "last.pt").is_file() else ""
            raise FloatingPointError(f"training loss became {train_loss} in epoch {epoch + 1}{where}. Lower the learning rate.")
        record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": train_loss,
                  ("train_robust_acc" if adversarial else "train_clean_acc"): 100.0 * float(correct) / seen}
        if val is not None:
            result = evaluate(model, val, eps, step, eval_steps, restarts=1, seed=seed) if adversarial else \
                {"clean_acc": _clean(model, val)}
            record["val_clean_acc"] = result["clean_acc"]
            if adversarial:
                record["val_robust_acc"] = result["robust_acc"]
        history.append(record)
        score = record.get(key, -train_loss)
        if score > best_score:
            best_epoch, best_score, best_state = epoch + 1, score, clone_state(model)
            if out is not None:
                save_checkpoint(out / "best.pt", {"model_state": best_state, "meta": {**(meta or {}), "epoch": epoch + 1, key: score}})
        if out is not None:
            save_checkpoint(out / "last.pt", {"model_state": model.state_dict(), "optimizer": opt.state_dict(),
                                              "scheduler": sched.state_dict(), "epoch": epoch, "history": history,
                                              "best_epoch": best_epoch, "best_score": best_score, "meta": meta or {}})
    opt.zero_grad(set_to_none=True)  # hand back a model without stale gradients
    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainResult(model, history, best_epoch)


def _clean(model: nn.Module, batches: Batches) -> float:
    from .evaluation import accuracy

    return accuracy(model, batches)
