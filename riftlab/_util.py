"""Small shared helpers: devices, seeds, progress bars, state snapshots."""

from __future__ import annotations

import random
from typing import Iterable, TypeVar

import numpy as np
import torch
import torch.nn as nn

T = TypeVar("T")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present; a device that does not exist is an error, not a fallback."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"invalid device {device!r}: {err}. Use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress(iterable: Iterable[T], enabled: bool, **kwargs) -> Iterable[T]:
    """A tqdm bar over ``iterable`` when ``enabled`` (only on rank 0 under torchrun)."""
    from .distributed import is_main

    if not enabled or not is_main():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state dict (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def milestones_for(epochs: int, paper_epochs: int, paper_milestones: tuple[int, ...]) -> list[int]:
    """Scale the paper's learning-rate milestones to a shorter schedule."""
    if epochs == paper_epochs:
        return list(paper_milestones)
    return sorted({max(1, round(m * epochs / paper_epochs)) for m in paper_milestones if round(m * epochs / paper_epochs) < epochs})


def relative_distance(weight: torch.Tensor, reference: torch.Tensor) -> float:
    """||weight - reference|| / ||reference|| (l2 over the whole tensor): how far a weight moved, in units of its norm."""
    reference = reference.detach()
    return float((weight.detach().to(reference.device) - reference).norm() / reference.norm().clamp_min(1e-30))
