"""Fine-tuning one module's weight (or a few modules' weights) on clean data, everything else frozen.

Two protocols share this step (:data:`riftlab.engine.config.FT_PROTOCOLS`). riftlab's default runs the
network in eval mode, so only the chosen weight moves: the fine-tuned model differs from the AT model
in that one tensor, which is what MRC measured and what interpolation blends. The reference code
fine-tunes in train mode, so every BatchNorm's running statistics are also re-estimated from clean
images (``update_bn_stats=True``): a second change, to every layer, that MRC never measured. With
``train_weights=False`` the same schedule moves the statistics alone (no weight changes), the control
that tells the two changes apart.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ._graph import graphed_training_or_none
from ._loop import LoopState, check_finite, epoch_line, train_epoch
from .._progress import Bar, bar
from ..compute import autocast, grad_scaler
from ..graphs import cuda_graphs_enabled
from ..resume import StepState, ensure_state
from ..data import Batches
from ..evaluation.robust import accuracy
from ..models import weight_modules

__all__ = ["finetune_module", "FinetuneResult", "get_weight_module"]


@dataclass
class FinetuneResult:
    """The fine-tuned copy (best-on-validation epoch loaded), its per-epoch history and best epoch.

    ``module`` is the fine-tuned module's name, or the names joined by ``+`` when several were
    fine-tuned together; ``modules`` always lists them. ``epoch_states`` (with ``keep_epochs``) holds,
    for each epoch 1..E, the tensors fine-tuning can change as they were at the end of that epoch (the
    trained weights, and every buffer when BatchNorm ran in train mode), on the CPU: loaded over the
    starting model's state they give that epoch's model.
    """

    model: nn.Module
    module: str
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    modules: list[str] = field(default_factory=list)
    epoch_states: list[dict[str, torch.Tensor]] = field(default_factory=list)


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
    train_weights: bool = True,
    keep_epochs: bool = False,
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
    ``train_weights=False`` (with ``update_bn_stats=True``) is BatchNorm recalibration alone: the
    same epochs of the same batches pass through the network in train mode without gradients, so
    every parameter stays bit-identical and only the running statistics move (the history's
    ``train_loss`` is then the clean loss seen during the pass). ``keep_epochs=True`` keeps every
    epoch's changing tensors in ``epoch_states`` (what choosing an epoch on other data needs).

    Defaults are the paper's: SGD momentum 0.9, weight decay 5e-4, lr 0.001 decayed x0.1 after
    epoch 5, 10 epochs (batch size and crop/flip augmentation come from ``train``). The epoch with
    the best validation clean accuracy among epochs 1..``epochs`` is kept (never selected on test
    data). The starting point is not a candidate: the interpolation's alpha = 0 already is.
    Without ``val`` the last epoch is kept. The history's ``lr`` is the learning rate each epoch
    trained with. ``state`` (:mod:`riftlab.resume`) receives the loop's progress after every epoch;
    a call whose state holds progress continues from it with the same result.

    ``compile=True`` trains through ``torch.compile``; under torchrun the copy is trained with
    DistributedDataParallel, each rank on its slice of every batch (with the default frozen
    BatchNorm this is the single-process update, summed in another order). With CUDA graphs on
    (:func:`riftlab.graphs.set_cuda_graphs`) each batch step is one graph replay of the same step.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    names = [module_name] if isinstance(module_name, str) else list(module_name)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"module_name must be one name or a list of distinct names, got {module_name!r}")
    if not train_weights and not update_bn_stats:
        raise ValueError("train_weights=False with frozen BatchNorm would change nothing: pass update_bn_stats=True "
                         "(BatchNorm recalibration alone) or train the weights")
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
    # With CUDA graphs on, each batch step is one replay of the same step (riftlab.steps._graph, no attack).
    graphed = graphed_training_or_none(tuned, opt, "pgd", 0.0, 0.0, 0, compile, distributed.active(), grad_scaler(train.device) is not None
                                       ) if cuda_graphs_enabled() and train_weights else None
    # what an epoch can change: the trained weights and, in train mode, every buffer (BatchNorm's statistics)
    changing = ([f"{name}.weight" for name in names] if train_weights else []) + (
        [n for n, _ in tuned.named_buffers() if n in tuned.state_dict()] if update_bn_stats else [])
    for epoch in range(loop.next_epoch, epochs):
        tuned.train(update_bn_stats)
        batches.set_epoch(epoch)
        lr_used = opt.param_groups[0]["lr"]
        started = time.perf_counter()
        with bar(train.num_examples, f"fine-tuning {label} {epoch + 1}/{epochs}", progress, leave=False) as live:
            if graphed is not None:
                stats = graphed.epoch(batches, bar=live)
            else:
                stats = train_epoch(trainer, batches, opt, bar=live) if train_weights else _statistics_epoch(fast, batches, live)
            with warnings.catch_warnings():  # recalibration alone never steps the optimiser; the schedule still counts epochs
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                sched.step()
            check_finite(f"fine-tuning {label}", stats, tuned, epoch, lr_used, state)
            record = {"epoch": epoch + 1, "lr": lr_used, "train_loss": stats["loss"]}
            if val is not None:
                record["val_clean_acc"] = accuracy(fast, val)
            live.write(epoch_line(f"fine-tuning {label}", record, epochs, time.perf_counter() - started))
        loop.history.append(record)
        if keep_epochs:
            current = tuned.state_dict()
            loop.kept.append({k: current[k].detach().to("cpu", copy=True) for k in changing})
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
    return FinetuneResult(tuned, label, loop.history, loop.best_epoch, names, loop.kept)


@torch.no_grad()
def _statistics_epoch(model: nn.Module, batches, live: Bar | None = None) -> dict[str, float]:
    """One pass over ``batches`` in the model's current (train) mode without gradients: BatchNorm re-estimates its
    running statistics and nothing else changes. Returns the clean loss and accuracy seen, as :func:`train_epoch` does."""
    device = next(model.parameters()).device
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, correct, seen
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    for step, (x, y) in enumerate(batches):
        with autocast(device):
            logits = model(x).float()
        loss = F.cross_entropy(logits, y)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        sums += torch.stack([loss.double() * len(y), (logits.argmax(1) == y).sum().double(), torch.tensor(float(len(y)), device=device,
                                                                                                       dtype=torch.float64)])
        if live is not None:
            live.update(len(y) * distributed.world_size(), lambda: {"loss": sums[0] / sums[2].clamp_min(1)})
    distributed.all_reduce_sum(sums)
    distributed.all_reduce_max(first_bad)
    n = max(float(sums[2]), 1.0)
    return {"loss": float(sums[0]) / n, "acc": 100.0 * float(sums[1]) / n, "first_bad_step": int(first_bad)}
