"""A model small enough for AutoAttack and the sanity checks on CPU in seconds (shared by test files).

``tiny_cnn`` (and ``tiny_cnn_rounded``, the same net behind a non-differentiable rounding) is
registered in riftlab's model registry, so ``build_model``, checkpoints and the CLI
(in-process) treat it like any riftlab model: images in [0, 1], normalisation inside.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from riftlab import Batches, adversarial_train, build_model
from riftlab.models import list_models, register_model

TINY = "tiny_cnn"
ROUNDED = "tiny_cnn_rounded"


class _TinyCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int, levels: int | None = None):
        super().__init__()
        self.levels = levels
        self.conv1 = nn.Conv2d(in_channels, width, 5, 1, 2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.levels is not None:  # gradient masking: rounding has a zero gradient everywhere
            x = torch.round(x * self.levels) / self.levels
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.fc(out.mean((2, 3)))


if TINY not in list_models():
    @register_model(TINY)
    def tiny_cnn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int | None = None) -> nn.Module:
        return _TinyCNN(num_classes, in_channels, width or 8)

    @register_model(ROUNDED)
    def tiny_cnn_rounded(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int | None = None) -> nn.Module:
        """tiny_cnn (same weights) that first rounds every pixel to one of 5 levels: a gradient-masked model."""
        return _TinyCNN(num_classes, in_channels, width or 8, levels=4)


def trained_tiny(splits, attack_steps: int = 0, epochs: int = 4, lr: float = 0.1, seed: int = 0) -> nn.Module:
    """A tiny_cnn trained on ``splits.train`` (standard training by default), in eval mode."""
    torch.manual_seed(seed)
    info = splits.info
    model = build_model(TINY, info.num_classes, info.channels, info.image_size, 8, info.mean, info.std)
    train = Batches(splits.train, 64, shuffle=True, augment=False, seed=seed)
    adversarial_train(model, train, None, epochs=epochs, lr=lr, attack_steps=attack_steps, step=4 / 255, milestones=[epochs - 1])
    return model.eval()
