"""The epoch loop shared by adversarial training and fine-tuning: one epoch of SGD, and the
atomic, resumable checkpoint of everything a loop needs to continue."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from ._util import clone_state
from .checkpoint import read_checkpoint, save_checkpoint
from .compute import autocast


def train_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], opt: torch.optim.Optimizer,
                make_input: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                ) -> dict[str, float]:
    """One pass of SGD over ``batches``; ``make_input`` turns a clean batch into the trained one (e.g. PGD).

    ``loss_fn(model, x, y) -> (loss, logits)`` replaces the cross-entropy on ``make_input(x, y)``
    for objectives that need more than one forward pass (TRADES, MART); accuracy is taken on its logits.

    Forward passes (and the attacks inside ``make_input`` / ``loss_fn``) run under
    :func:`riftlab.compute.autocast`; the backward pass and the update are outside it.
    Sums and the index of the first non-finite loss stay on the device: one host sync per epoch.
    Under torchrun (``model`` a DDP wrapper, ``batches`` this rank's slices) the sums are taken
    over all ranks. Returns mean loss, accuracy (percent) on the trained inputs, and
    ``first_bad_step`` (-1 if none).
    """
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    for step, (x, y) in enumerate(batches):
        with autocast(device):
            if loss_fn is not None:
                loss, logits = loss_fn(model, x, y)
            else:
                x_in = make_input(x, y) if make_input is not None else x
                logits = model(x_in).float()
                loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        seen += len(y)
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

    def update_best(self, epoch: int, score: float, model: nn.Module) -> bool:
        if score > self.best_score:
            self.best_epoch, self.best_score, self.best_state = epoch, score, clone_state(model)
            return True
        return False


class EpochCheckpoint:
    """``last.pt`` (model, optimiser, scheduler, history, best so far) and ``best.pt`` in ``folder``.

    Written atomically after every epoch, so a run killed at any point resumes from its last
    complete epoch; with per-epoch seeded data order and attacks, the resumed run ends with the
    same weights as an uninterrupted one.
    """

    def __init__(self, folder: str | Path | None, meta: dict[str, Any] | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.meta = dict(meta or {})

    @property
    def last(self) -> Path | None:
        return self.folder / "last.pt" if self.folder is not None else None

    def exists(self) -> bool:
        return self.last is not None and self.last.is_file()

    def restore(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> LoopState:
        if not self.exists():
            return LoopState()
        device = next(model.parameters()).device
        state = read_checkpoint(self.last, map_location=device)
        model.load_state_dict(state["model_state"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        best = read_checkpoint(self.folder / "best.pt", map_location=device)["model_state"] if state["best_epoch"] > 0 else None
        return LoopState(state["epoch"] + 1, list(state["history"]), state["best_epoch"], state["best_score"], best)

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, epoch: int, loop: LoopState, best_changed: bool) -> None:
        if self.folder is None:
            return
        if best_changed and loop.best_state is not None:
            save_checkpoint(self.folder / "best.pt", {"model_state": loop.best_state, "meta": {**self.meta, "epoch": loop.best_epoch}})
        save_checkpoint(self.last, {"model_state": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                    "epoch": epoch, "history": loop.history, "best_epoch": loop.best_epoch,
                                    "best_score": loop.best_score, "meta": self.meta})

    def nonfinite_error(self, what: str, value: float, epoch: int, step: int) -> FloatingPointError:
        where = f"; the last good checkpoint is {self.last} (epoch {epoch})" if self.exists() else "; no checkpoint was written yet"
        return FloatingPointError(f"{what} loss became {value} at step {step + 1} of epoch {epoch + 1}{where}. "
                                  "Lower the learning rate (or check the data for NaNs).")


class SweepProgress:
    """Partial results of a sweep (MRC over modules, interpolation over alphas, evaluation over
    batches), saved atomically after each item so a killed sweep resumes where it stopped.

    ``settings`` identify the sweep; a progress file written with other settings is an error
    rather than silently mixed in.
    """

    def __init__(self, path: str | Path | None, settings: dict[str, Any]):
        self.path = Path(path) if path is not None else None
        self.settings = {k: str(v) for k, v in settings.items()}

    def load(self) -> dict[str, Any]:
        if self.path is None or not self.path.is_file():
            return {}
        saved = read_checkpoint(self.path)
        if saved.get("settings") != self.settings:
            diff = sorted(k for k in set(saved.get("settings", {})) | set(self.settings)
                          if saved.get("settings", {}).get(k) != self.settings.get(k))
            raise ValueError(f"{self.path} holds progress of a run with other settings ({', '.join(diff)}); "
                             "delete it, or resume with the same settings")
        return dict(saved["state"])

    def save(self, state: dict[str, Any]) -> None:
        if self.path is not None:
            save_checkpoint(self.path, {"settings": self.settings, "state": state})
