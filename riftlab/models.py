"""Models built by name from a registry.

Every model takes images in [0, 1] and normalises them itself (a parameter-free first layer), so
attack budgets are always in pixel units. Parameter names match the reference RiFT checkpoints
(kuangliu-style ResNets, TRADES-style WideResNet), so ``load_checkpoint`` can read them directly.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["build_model", "list_models", "register_model", "Normalize", "weight_modules", "conv_bn_pairs"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model constructor to the registry under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_MODELS)


def check_model_name(name: str) -> str:
    """``name`` itself when it is registered, else a ValueError listing the valid names."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return name


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    width: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models` (``resnet18``, ``resnet34``, ``preact_resnet18``, ``wrn34_10``).
        num_classes: number of output logits.
        in_channels: image channels (3 for CIFAR, 1 for Fashion-MNIST).
        image_size: input height = width in pixels; sets the classifier's input size the way the
            reference code does (a 64x64 input gives a 2x2 grid before the classifier).
        width: channels of the first stage (ResNets, default 64) or widen factor (WRN, default 10);
            small values give fast CPU variants with identical module names.
        mean, std: per-channel normalisation applied inside the model (defaults: 0 and 1).
    """
    model = _MODELS[check_model_name(name)](num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width)
    channels = in_channels
    model.normalize = Normalize(mean if mean is not None else [0.0] * channels, std if std is not None else [1.0] * channels)
    model.riftlab_config = {
        "model": name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": image_size,
        "width": width,
        "mean": list(model.normalize.mean.flatten().tolist()),
        "std": list(model.normalize.std.flatten().tolist()),
    }
    return model


def weight_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs whose weights RiFT ranks: every Conv2d and Linear, in registration
    order (forward order for the plain ResNets; a pre-activation shortcut is listed after its block's convs)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, bn)`` module names of ``model`` where the BatchNorm2d takes that Conv2d's output and nothing else reads
    it: the pairs :func:`riftlab.compute.fold_batchnorm` may fold. Listed per block type (:data:`_CONV_BN`, each entry
    beside the line of ``forward`` that makes it a pair), in ``named_modules`` order; a module of another type
    (a RobustBench architecture, a test's own net) contributes none."""
    pairs = []
    for prefix, module in model.named_modules():
        for conv, bn in _CONV_BN.get(type(module), lambda m: [])(module):
            pairs.append((f"{prefix}.{conv}" if prefix else conv, f"{prefix}.{bn}" if prefix else bn))
    return pairs


class Normalize(nn.Module):
    """(x - mean) / std per channel. Buffers are not persistent, so state dicts stay reference-compatible."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _final_grid(image_size: int, downsamplings: int, pool: int) -> int:
    """Side of the feature grid after the reference code's ``avg_pool2d(out, pool)``.

    The reference nets pool with a fixed kernel (4 for ResNet, 8 for WRN), so a 64x64 input leaves a
    2x2 grid; inputs whose last map is smaller than the kernel (Fashion-MNIST) pool globally.
    """
    side = image_size
    for _ in range(downsamplings):
        side = (side + 1) // 2
    return max(side // pool, 1)


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class _ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, no max-pool, four stages, names as in the reference code."""

    def __init__(self, block: type, num_blocks: Sequence[int], num_classes: int, in_channels: int, image_size: int, width: int, preact: bool):
        super().__init__()
        self.preact = preact
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        if not preact:
            self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, width * 2, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, width * 4, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, width * 8, num_blocks[3], 2)
        self.grid = _final_grid(image_size, 3, 4)
        self.linear = nn.Linear(width * 8 * self.grid**2, num_classes)
        del self.in_planes

    def _make_layer(self, block: type, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        if not self.preact:
            out = F.relu(self.bn1(out))
        # The reference pre-activation net has no final BN-ReLU before pooling; kept for checkpoint parity.
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, self.grid)
        return self.linear(out.flatten(1))


class _WideBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, first: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        # The first block of a stage always has a projection, so that small widths (where the
        # channel count may not change) keep the reference module names.
        self.equal_in_out = in_planes == out_planes and not first
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The reference block feeds the pre-activated input to the shortcut when the shape changes.
        shortcut = x if self.equal_in_out else self.convShortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return shortcut + out


class _NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[_WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, first=i == 0)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class _WideResNet(nn.Module):
    """TRADES/RiFT-style WideResNet (``block1.layer.3.conv2``...). The reference's unused
    ``sub_block1`` is left out; ``load_checkpoint`` drops its tensors."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        self.block1 = _NetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = _NetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = _NetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.grid = _final_grid(image_size, 2, 8)
        self.fc = nn.Linear(ch[3] * self.grid**2, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, self.grid)
        return self.fc(out.flatten(1))


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int | None = None) -> nn.Module:
    return _ResNet(_BasicBlock, [2, 2, 2, 2], num_classes, in_channels, image_size, width or 64, preact=False)


@register_model("resnet34")
def resnet34(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int | None = None) -> nn.Module:
    return _ResNet(_BasicBlock, [3, 4, 6, 3], num_classes, in_channels, image_size, width or 64, preact=False)


@register_model("preact_resnet18")
def preact_resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int | None = None) -> nn.Module:
    return _ResNet(_PreActBlock, [2, 2, 2, 2], num_classes, in_channels, image_size, width or 64, preact=True)


@register_model("wrn34_10")
def wrn34_10(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int | None = None) -> nn.Module:
    return _WideResNet(34, width or 10, num_classes, in_channels, image_size)


# Which BatchNorm takes which convolution's output alone, per block type (conv_bn_pairs). Each pair is read off the
# block's forward; a BatchNorm in front of a convolution (pre-activation: BN, ReLU, conv) is not a pair, since the ReLU
# between them does not commute with the affine map.
_CONV_BN: dict[type, Callable[[nn.Module], list[tuple[str, str]]]] = {
    # _ResNet.forward: relu(bn1(conv1(normalize(x)))), without bn1 in the pre-activation net
    _ResNet: lambda m: [] if m.preact else [("conv1", "bn1")],
    # _BasicBlock.forward: bn1(conv1(x)), bn2(conv2(.)) and the projection shortcut Sequential(conv, bn)
    _BasicBlock: lambda m: [("conv1", "bn1"), ("conv2", "bn2")] + ([("shortcut.0", "shortcut.1")] if len(m.shortcut) else []),
    # _PreActBlock.forward: bn1 precedes conv1 (not a pair); conv1's output goes to bn2 alone
    _PreActBlock: lambda m: [("conv1", "bn2")],
    # _WideBlock.forward: bn1 precedes conv1 and convShortcut (not a pair); bn2(conv1(.))
    _WideBlock: lambda m: [("conv1", "bn2")],
    # _WideResNet.forward: the stem's output goes to block1's first block alone, which reads it only through its bn1
    # (the first block of a stage has a projection shortcut, fed from relu(bn1(x))). In the pre-activation ResNet the
    # stem's output also reaches an identity shortcut: no pair there.
    _WideResNet: lambda m: [("conv1", "block1.layer.0.bn1")],
}
