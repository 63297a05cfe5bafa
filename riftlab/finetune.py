"""Fine-tuning one module's weight on clean data, everything else frozen."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._util import clone_state, progress as _progress
from .data import Batches
from .evaluation import accuracy
from .models import weight_modules

__all__ = ["finetune_module", "FinetuneResult", "get_weight_module"]


@dataclass
class FinetuneResult:
    """The fine-tuned copy (best-on-validation epoch loaded), its per-epoch history and best epoch."""

    model: nn.Module
    module: str
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1


def get_weight_module(model: nn.Module, name: str) -> nn.Module:
    """The Conv2d / Linear module called exactly ``name``; an unknown name lists the valid ones."""
    modules = dict(weight_modules(model))
    if name not in modules:
        raise ValueError(f"unknown module {name!r}; valid modules: {', '.join(modules)}")
    return modules[name]


def finetune_module(
    model: nn.Module,
    module_name: str,
    train: Batches,
    val: Batches | None = None,
    epochs: int = 10,
    lr: float = 0.001,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    milestones: list[int] | None = None,
    update_bn_stats: bool = False,
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune the weight of module ``module_name`` (exact name) on clean data.

    ``model`` is not modified: a copy is fine-tuned and returned. Only the chosen module's weight
    receives gradients, weight decay and updates (its bias, if any, stays frozen as in the paper).

    BatchNorm: by default the whole network runs in eval mode, so every BatchNorm keeps the
    running statistics of the adversarially trained model and every tensor other than the chosen
    weight stays bit-identical. ``update_bn_stats=True`` reproduces the reference code, which
    fine-tunes in train mode and so lets *all* BatchNorm statistics drift towards clean data.

    Defaults are the paper's: SGD momentum 0.9, weight decay 5e-4, lr 0.001 decayed x0.1 after
    epoch 5, 10 epochs (batch size and crop/flip augmentation come from ``train``). The epoch with
    the best validation clean accuracy among epochs 1..``epochs`` is kept (never selected on test
    data). The starting point is not a candidate: the interpolation's alpha = 0 already is.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    tuned = copy.deepcopy(model)
    weight = get_weight_module(tuned, module_name).weight
    for p in tuned.parameters():
        p.requires_grad_(False)
    weight.requires_grad_(True)
    opt = torch.optim.SGD([weight], lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones if milestones is not None else [max(1, epochs // 2)], gamma=0.1)
    history: list[dict[str, float]] = []
    best_epoch, best_score, best_state = -1, -math.inf, None
    if val is not None:  # epoch 0 is the starting point, recorded for reference but never selected
        history.append({"epoch": 0, "lr": lr, "train_loss": float("nan"), "val_clean_acc": accuracy(tuned, val)})
    device = train.device
    for epoch in _progress(range(epochs), progress, desc=f"fine-tuning {module_name}"):
        tuned.train(update_bn_stats)
        train.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for x, y in train:
            loss = F.cross_entropy(tuned(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(y)
            seen += len(y)
        sched.step()
        train_loss = float(loss_sum) / seen
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"fine-tuning loss became {train_loss} in epoch {epoch + 1}; lower the learning rate")
        record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": train_loss}
        if val is not None:
            record["val_clean_acc"] = accuracy(tuned, val)
            if record["val_clean_acc"] > best_score:
                best_epoch, best_score, best_state = epoch + 1, record["val_clean_acc"], clone_state(tuned)
        history.append(record)
    if best_state is not None:
        tuned.load_state_dict(best_state)
    else:
        best_epoch = epochs
    weight.requires_grad_(False)
    weight.grad = None
    tuned.eval()
    return FinetuneResult(tuned, module_name, history, best_epoch)
