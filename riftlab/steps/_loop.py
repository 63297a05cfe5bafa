"""The epoch loop shared by adversarial training and fine-tuning: one epoch of SGD, and the loop's
progress (model, optimiser, scheduler, history, best epoch) as a step hands it to its state."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from .._util import clone_state
from .._progress import Bar
from ..compute import autocast, grad_scaler
from ..resume import StepState


def train_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], opt: torch.optim.Optimizer,
                make_input: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                bar: Bar | None = None) -> dict[str, float]:
    """One pass of SGD over ``batches``; ``make_input`` turns a clean batch into the trained one (e.g. PGD).

    ``loss_fn(model, x, y) -> (loss, logits)`` replaces the cross-entropy on ``make_input(x, y)``
    for objectives that need more than one forward pass (TRADES, MART); accuracy is taken on its logits.

    Forward passes (and the attacks inside ``make_input`` / ``loss_fn``) run under
    :func:`riftlab.compute.autocast`; the backward pass and the update are outside it. Under fp16
    autocast the loss is scaled (:func:`riftlab.compute.grad_scaler`), and a step whose gradients
    overflowed is skipped, as mixed-precision training does. Sums and the index of the first
    non-finite loss stay on the device: one host sync per epoch (``bar`` reads them at most twice a
    second). Under torchrun (``model`` a DDP wrapper, ``batches`` this rank's slices) each rank's
    mean loss is weighted by its share of the batch, so that the averaged gradient is the whole
    batch's mean even when the slices are unequal, and the sums are taken over all ranks. Returns
    mean loss, accuracy (percent) on the trained inputs, and ``first_bad_step`` (-1 if none).
    """
    device = next(model.parameters()).device
    scaler = grad_scaler(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    figures = lambda: {"loss": loss_sum / seen.clamp_min(1), "acc": 100 * correct / seen.clamp_min(1)}  # noqa: E731
    for step, (x, y) in enumerate(batches):
        with autocast(device):
            if loss_fn is not None:
                loss, logits = loss_fn(model, x, y)
            else:
                x_in = make_input(x, y) if make_input is not None else x
                logits = model(x_in).float()
                loss = F.cross_entropy(logits, y)
        share = getattr(batches, "shard_weight", None)  # this rank's slice / the mean slice (torchrun)
        update = loss * share if share is not None else loss
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(update).backward()
            scaler.step(opt)
            scaler.update()
        else:
            update.backward()
            opt.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        seen += len(y)
        if bar is not None:
            bar.update(len(y) * distributed.world_size(), figures)
    distributed.all_reduce_sum(loss_sum, correct, seen)
    distributed.all_reduce_max(first_bad)
    n = max(float(seen), 1.0)
    return {"loss": float(loss_sum) / n, "acc": 100.0 * float(correct) / n, "first_bad_step": int(first_bad)}


@dataclass
class LoopState:
    """Progress of an epoch loop: completed epochs, history and the best epoch so far."""

    next_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = -math.inf
    best_state: dict[str, torch.Tensor] | None = None
    kept: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per-epoch tensors a step chose to keep

    def update_best(self, epoch: int, score: float, model: nn.Module) -> bool:
        if score > self.best_score:
            self.best_epoch, self.best_score, self.best_state = epoch, score, clone_state(model)
            return True
        return False

    def progress(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
        """Everything needed to continue after the epoch just finished (for :meth:`StepState.save`)."""
        return {"model_state": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "next_epoch": self.next_epoch, "history": self.history, "best_epoch": self.best_epoch,
                "best_score": self.best_score, "best_state": self.best_state, "kept": self.kept}

    @classmethod
    def resume(cls, state: StepState, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> "LoopState":
        """The loop as ``state`` last saved it, loaded into ``model``, ``opt`` and ``sched``; a fresh loop when nothing was saved."""
        saved = state.load()
        if saved is None:
            return cls()
        device = next(model.parameters()).device
        model.load_state_dict(saved["model_state"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        best = {k: v.to(device) for k, v in saved["best_state"].items()} if saved["best_state"] is not None else None
        return cls(saved["next_epoch"], list(saved["history"]), saved["best_epoch"], saved["best_score"], best, list(saved.get("kept", [])))


def epoch_line(what: str, record: dict[str, Any], epochs: int, seconds: float) -> str:
    """The one log line per epoch: ``adversarial training 3/10: loss 0.812, train 61.2%, val 81.3 / 56.0 (clean / robust), lr 0.1, 41 s``."""
    parts = [f"loss {record['train_loss']:.4g}"]
    train = record.get("train_robust_acc", record.get("train_clean_acc"))
    if train is not None:
        parts.append(f"train {train:.1f}%")
    if "val_robust_acc" in record:
        parts.append(f"val {record['val_clean_acc']:.2f} / {record['val_robust_acc']:.2f} (clean / robust)")
    elif "val_clean_acc" in record:
        parts.append(f"val clean {record['val_clean_acc']:.2f}")
    parts.append(f"lr {record['lr']:.3g}")
    return f"{what} {record['epoch']}/{epochs}: {', '.join(parts)}, {seconds:.0f} s"


def first_nonfinite(model: nn.Module) -> str | None:
    """The name of the first floating-point tensor of ``model`` (parameter or buffer) holding a NaN or an infinity, else None."""
    tensors = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
    if not tensors:
        return None
    bad = torch.stack([~torch.isfinite(t).all() for _, t in tensors])  # one host sync for the whole model
    return tensors[int(bad.nonzero()[0, 0])][0] if bool(bad.any()) else None


def check_finite(what: str, stats: dict[str, Any], model: nn.Module, epoch: int, lr: float, state: StepState) -> None:
    """Stop the epoch just trained (``epoch``, from 0) if it went non-finite: its loss (at the first such batch) or the
    weights it left (the last batch's update: the next batch's loss would have shown it). Called before the epoch's
    progress is saved, so no NaN or infinite weights are kept anywhere."""
    if stats["first_bad_step"] >= 0:
        where = f"the loss became {stats['loss']:g} at batch {stats['first_bad_step'] + 1}"
    else:
        name = first_nonfinite(model)
        if name is None:
            return
        where = f"{name} became non-finite at the last batch"
    raise nonfinite_error(what, where, epoch, lr, state)


def nonfinite_error(what: str, where: str, epoch: int, lr: float, state: StepState) -> FloatingPointError:
    """The one-line error for a step that went NaN or infinite: where it happened, what is kept, what to change."""
    kept_in = getattr(state, "where", None)
    done = "epoch 1 is" if epoch == 1 else f"epochs 1-{epoch} are"
    kept = f"; {done} kept in {kept_in}" if kept_in and epoch > 0 else ""
    return FloatingPointError(f"{what}: {where} of epoch {epoch + 1} (learning rate {lr:g}); nothing of epoch {epoch + 1} "
                              f"is saved{kept}. Lower the learning rate (or check the data for NaNs).")
