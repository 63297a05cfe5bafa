"""How riftlab computes on each device: bf16 autocast and channels_last on CUDA, fp32 on the CPU,
and optional ``torch.compile``.

Precision is one process-wide setting, like ``torch.backends.cudnn.benchmark``:

* ``"auto"`` (default): bf16 autocast on CUDA GPUs that support bf16, fp32 everywhere else.
* ``"fp32"``: fp32 everywhere (the reference code's arithmetic).
* ``"bf16"``: bf16 autocast on any device, the CPU included (slow there; useful to measure how
  much bf16 changes a result without a GPU).

Under autocast, convolutions and matrix products run in bf16 while weights, optimiser state,
inputs, input gradients and losses stay fp32 (``F.cross_entropy`` is autocast to fp32), so the
PGD step ``sign(grad)`` and the l_inf projection are exact fp32 operations. Every attack,
training step, MRC pass and evaluation in riftlab runs inside :func:`autocast`.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator

import torch
import torch.nn as nn

__all__ = ["PRECISIONS", "check_precision", "set_precision", "get_precision", "use_precision", "uses_bf16", "autocast", "to_device", "compiled"]

PRECISIONS = ("auto", "fp32", "bf16")
_precision = "auto"


def check_precision(precision: str) -> str:
    """``precision`` itself when it is one of :data:`PRECISIONS`, else a ValueError naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def set_precision(precision: str) -> None:
    """Set the process-wide precision: ``auto``, ``fp32`` or ``bf16`` (see the module docstring)."""
    global _precision
    _precision = check_precision(precision)


def get_precision() -> str:
    return _precision


@contextlib.contextmanager
def use_precision(precision: str) -> Iterator[None]:
    """Run a block with another precision and restore the previous setting afterwards."""
    previous = _precision
    set_precision(precision)
    try:
        yield
    finally:
        set_precision(previous)


def uses_bf16(device: torch.device | str) -> bool:
    """Whether computations on ``device`` run under bf16 autocast with the current setting."""
    device = torch.device(device)
    if _precision == "fp32":
        return False
    if _precision == "bf16":
        return device.type in ("cuda", "cpu")
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device | str) -> ContextManager:
    """bf16 autocast on ``device`` when :func:`uses_bf16` says so, otherwise a no-op."""
    device = torch.device(device)
    if uses_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move ``model`` to ``device``; on CUDA also to channels_last, the layout tensor cores want.

    The state dict keeps its names and values; the layout only changes strides, and checkpoints
    written from a channels_last model load into a contiguous one and back.
    """
    device = torch.device(device)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def batch_layout(x: torch.Tensor) -> torch.Tensor:
    """Image batches in the layout of :func:`to_device`'s models: channels_last on CUDA."""
    if x.is_cuda and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def compiled(model: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(model)`` when ``enabled``, else ``model`` itself.

    The compiled wrapper shares ``model``'s parameters and buffers: train and evaluate through the
    wrapper, save and load ``model`` (its state-dict names have no ``_orig_mod.`` prefix). The
    first batches are slow while it compiles (once for training mode, once for evaluation mode).
    It is meant for CUDA; on the CPU, inductor's C++ kernels crashed (double free) with two
    threads under torch 2.14.1 in our tests, and ran correctly with one.
    """
    if not enabled:
        return model
    return torch.compile(model)
