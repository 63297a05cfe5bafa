"""Adversarial training (PGD-AT by default; TRADES or MART) with the recipe RiFT starts from."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .. import distributed
from ._graph import graphed_training_or_none
from ._loop import LoopState, check_finite, epoch_line, train_epoch
from .._progress import bar
from .._util import milestones_for
from ..resume import StepState, ensure_state
from ..compute import grad_scaler
from ..data import Batches
from ..graphs import cuda_graphs_enabled
from ..evaluation.robust import accuracy, evaluate
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
    state: StepState | None = None,
    progress: bool = False,
    compile: bool = False,
    warmup_epochs: int = 0,
) -> TrainResult:
    """Train ``model`` in place on PGD adversarial examples (``attack_steps=0``: standard training).

    Defaults are the paper's recipe (Bag of Tricks for AT): SGD momentum 0.9, weight decay 5e-4,
    lr 0.1 decayed x0.1 at epochs 100 and 105 of 110 (scaled to shorter runs), PGD-10 with step
    2/255 inside an 8/255 ball, random start, BatchNorm in eval mode while attacking.
    ``warmup_epochs=w`` ramps the learning rate linearly over the first w epochs (lr * (e + 1) / w in
    epoch e), as large-batch training does when it scales the learning rate with the batch (the
    throughput profile: batch 512, lr 0.4, 5 warm-up epochs; not the paper's recipe).

    ``method`` picks the objective (see :mod:`riftlab.losses`): ``"pgd"`` (PGD-AT, cross-entropy
    on PGD examples), ``"trades"`` (CE on x + ``beta`` * KL to the KL-PGD example) or ``"mart"``
    (boosted CE on PGD examples + ``beta`` * KL weighted by 1 - p_y(x)); ``beta`` is ignored by
    ``"pgd"``.

    After each epoch the model is evaluated on ``val`` (clean and PGD-``eval_steps``) and the
    checkpoint with the best validation robust accuracy (clean accuracy for standard training)
    is kept; it is loaded into ``model`` at the end. ``eval_every=k`` validates only every k-th
    epoch and the last one, and picks the best among those (a short run's early epochs, at the
    high learning rate, are never the best, and validating them costs as much as a third of a
    PGD-3 epoch). The history's ``lr`` is the learning rate the epoch trained with.

    ``state`` (:mod:`riftlab.resume`) receives the loop's progress after every epoch (weights,
    optimiser, scheduler, history, best so far); a call whose state holds progress continues from
    it and ends with the same weights as an uninterrupted run. Keeping the state consistent with
    the settings is the caller's part (riftlab's runner fingerprints every setting).

    Speed: attacks and forward passes run under :func:`riftlab.compute.autocast` (bf16 on CUDA by
    default); ``compile=True`` trains through ``torch.compile(model)``. Under torchrun the model
    is trained with DistributedDataParallel, each rank on its slice of every batch (see
    :mod:`riftlab.distributed`). With CUDA graphs on (:func:`riftlab.graphs.set_cuda_graphs`), PGD-AT's batch
    step (standard training's too) is one graph replay (:mod:`riftlab.steps._graph`: the same step, the same
    random starts); TRADES, MART, ``compile``, torchrun and fp16 train eagerly, with a line saying so.
    """
    if epochs < 1 or eval_every < 1:
        raise ValueError(f"epochs and eval_every must be >= 1, got {epochs} and {eval_every}")
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs) = [0, {epochs}), got {warmup_epochs}")
    check_method(method, beta)
    if method != "pgd" and attack_steps < 1:
        raise ValueError(f"method {method!r} needs adversarial examples: attack_steps must be >= 1, got {attack_steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    milestones = milestones if milestones is not None else milestones_for(epochs, 110, (100, 105))
    if warmup_epochs > 0:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupThenSteps(warmup_epochs, milestones))
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    adversarial = attack_steps > 0
    key = "val_robust_acc" if adversarial and val is not None else "val_clean_acc"
    state = ensure_state(state)
    loop = LoopState.resume(state, model, opt, sched)
    device = train.device
    trainer, fast = distributed.for_training(model, compile)
    batches, _ = distributed.shard(train)
    graphed = graphed_training_or_none(model, opt, method, eps, step, attack_steps, compile, distributed.active(),
                                       grad_scaler(device) is not None) if cuda_graphs_enabled() else None
    what = "adversarial training" if adversarial else "training"
    for epoch in range(loop.next_epoch, epochs):
        model.train()
        batches.set_epoch(epoch)
        gen = torch.Generator(device=device).manual_seed(seed * 7919 + epoch + 1_000_003 * distributed.rank())
        lr_used = opt.param_groups[0]["lr"]
        started = time.perf_counter()
        with bar(train.num_examples, f"{what} {epoch + 1}/{epochs}", progress, leave=False) as live:
            if graphed is not None:
                stats = graphed.epoch(batches, gen, bar=live)
            else:
                objective = at_objective(method, eps, step, attack_steps, beta, generator=gen, attacker=fast) if adversarial else None
                stats = train_epoch(trainer, batches, opt, loss_fn=objective, bar=live)
            sched.step()
            check_finite(what, stats, model, epoch, lr_used, state)
            record = {"epoch": epoch + 1, "lr": lr_used, "train_loss": stats["loss"],
                      ("train_robust_acc" if adversarial else "train_clean_acc"): stats["acc"]}
            validate = val is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs)
            if validate:
                if adversarial:
                    result = evaluate(fast, val, eps, step, eval_steps, restarts=1, seed=seed)
                    record["val_clean_acc"], record["val_robust_acc"] = result["clean_acc"], result["robust_acc"]
                else:
                    record["val_clean_acc"] = accuracy(fast, val)
            live.write(epoch_line(what, record, epochs, time.perf_counter() - started))
        loop.history.append(record)
        if validate or val is None:
            loop.update_best(epoch + 1, record.get(key, -stats["loss"]), model)
        loop.next_epoch = epoch + 1
        state.save(loop.progress(model, opt, sched))
    distributed.done_training(model)
    opt.zero_grad(set_to_none=True)  # hand back a model without stale gradients
    if loop.best_state is not None:
        model.load_state_dict(loop.best_state)
    return TrainResult(model, loop.history, loop.best_epoch)


@dataclass(frozen=True)
class WarmupThenSteps:
    """The learning-rate factor of epoch ``e`` (from 0): (e + 1) / ``warmup`` during the warm-up, times 0.1 for every
    milestone passed (MultiStepLR's drops). A dataclass, not a lambda, so that a scheduler's state can be saved."""

    warmup: int
    milestones: list[int]

    def __call__(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / self.warmup) * 0.1 ** bisect.bisect_right(self.milestones, epoch)
