"""Fine-tuning one module's weight (or a few modules' weights) on clean data, everything else frozen."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from .. import distributed
from ._loop import LoopState, epoch_line, nonfinite_error, train_epoch
from .._progress import bar
from ..resume import StepState, ensure_state
from ..data import Batches
from ..evaluation.robust import accuracy
from ..models import weight_modules

__all__ = ["finetune_module", "FinetuneResult", "get_weight_module"]


@dataclass
class FinetuneResult:
    """The fine-tuned copy (best-on-validation epoch loaded), its per-epoch history and best epoch.

    ``module`` is the fine-tuned module's name, or the names joined by ``+`` when several were
    fine-tuned together; ``modules`` always lists them.
    """

    model: nn.Module
    module: str
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    modules: list[str] = field(default_factory=list)


def get_weight_module(model: nn.Module, name: str) -> nn.Module:
    """The Conv2d / Linear module called exactly ``name``; an unknown name lists the valid ones."""
    modules = dict(weight_modules(model))
    if name not in modules:
        raise ValueError(f"unknown module {name!r}; valid modules: {', '.join(modules)}")
    return modules[name]


def finetune_module(
    model: nn.Module,
    module_name: str | Sequence[str],
    train: Batches,
    val: Batches | None = None,
    epochs: int = 10,
    lr: float = 0.001,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    milestones: list[int] | None = None,
    update_bn_stats: bool = False,
    state: StepState | None = None,
    progress: bool = False,
    compile: bool = False,
) -> FinetuneResult:
    """Fine-tune the weight of module ``module_name`` (exact name) on clean data.

    ``module_name`` may also be a list of exact names: their weights are fine-tuned together (the
    ablations "all layers", "top-k least critical"). ``model`` is not modified: a copy is fine-tuned
    and returned. Only the chosen modules' weights receive gradients, weight decay and updates
    (biases, if any, stay frozen as in the paper).

    BatchNorm: by default the whole network runs in eval mode, so every BatchNorm keeps the
    running statistics of the adversarially trained model and every tensor other than the chosen
    weight stays bit-identical. ``update_bn_stats=True`` reproduces the reference code, which
    fine-tunes in train mode and so lets *all* BatchNorm statistics drift towards clean data.

    Defaults are the paper's: SGD momentum 0.9, weight decay 5e-4, lr 0.001 decayed x0.1 after
    epoch 5, 10 epochs (batch size and crop/flip augmentation come from ``train``). The epoch with
    the best validation clean accuracy among epochs 1..``epochs`` is kept (never selected on test
    data). The starting point is not a candidate: the interpolation's alpha = 0 already is.
    Without ``val`` the last epoch is kept. The history's ``lr`` is the learning rate each epoch
    trained with. ``state`` (:mod:`riftlab.resume`) receives the loop's progress after every epoch;
    a call whose state holds progress continues from it with the same result.

    ``compile=True`` trains through ``torch.compile``; under torchrun the copy is trained with
    DistributedDataParallel, each rank on its slice of every batch (with the default frozen
    BatchNorm this is the single-process update, summed in another order).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    names = [module_name] if isinstance(module_name, str) else list(module_name)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"module_name must be one name or a list of distinct names, got {module_name!r}")
    label = "+".join(names)
    tuned = copy.deepcopy(model)
    weights = [get_weight_module(tuned, name).weight for name in names]
    for p in tuned.parameters():
        p.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    opt = torch.optim.SGD(weights, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones if milestones is not None else [max(1, epochs // 2)], gamma=0.1)
    state = ensure_state(state)
    loop = LoopState.resume(state, tuned, opt, sched)
    if val is not None and not loop.history:  # epoch 0 is the starting point, recorded but never selected
        loop.history.append({"epoch": 0, "lr": lr, "train_loss": None, "val_clean_acc": accuracy(tuned, val)})
    trainer, fast = distributed.for_training(tuned, compile)
    batches, _ = distributed.shard(train)
    for epoch in range(loop.next_epoch, epochs):
        tuned.train(update_bn_stats)
        batches.set_epoch(epoch)
        lr_used = opt.param_groups[0]["lr"]
        started = time.perf_counter()
        with bar(train.num_examples, f"fine-tuning {label} {epoch + 1}/{epochs}", progress, leave=False) as live:
            stats = train_epoch(trainer, batches, opt, bar=live)
            sched.step()
            if stats["first_bad_step"] >= 0:
                raise nonfinite_error("fine-tuning", stats["loss"], epoch, stats["first_bad_step"], state)
            record = {"epoch": epoch + 1, "lr": lr_used, "train_loss": stats["loss"]}
            if val is not None:
                record["val_clean_acc"] = accuracy(fast, val)
            live.write(epoch_line(f"fine-tuning {label}", record, epochs, time.perf_counter() - started))
        loop.history.append(record)
        loop.update_best(epoch + 1, record.get("val_clean_acc", epoch), tuned)
        loop.next_epoch = epoch + 1
        state.save(loop.progress(tuned, opt, sched))
    distributed.done_training(tuned)
    if val is not None and loop.best_state is not None:
        tuned.load_state_dict(loop.best_state)
    for weight in weights:
        weight.requires_grad_(False)
        weight.grad = None
    tuned.eval()
    return FinetuneResult(tuned, label, loop.history, loop.best_epoch, names)
