"""Small shared helpers: seeds, state snapshots, schedules, distances."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn as nn


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
