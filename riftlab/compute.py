"""How riftlab computes on each device: mixed precision by what the GPU has natively, channels_last
on CUDA, fp32 on the CPU, and optional ``torch.compile``.

Precision is one process-wide setting, like ``torch.backends.cudnn.benchmark``:

* ``"auto"`` (default): bf16 autocast on GPUs with native bf16 (compute capability 8.0 and up:
  A100, H100...); fp16 autocast on older GPUs (T4, V100), whose bf16 is only emulated, with a
  gradient scaler for training; fp32 on the CPU;
* ``"fp32"``: fp32 everywhere (the reference code's arithmetic);
* ``"bf16"`` / ``"fp16"``: that autocast on any device, the CPU included (slow there; useful to
  measure what a precision changes without a GPU).

Under autocast, convolutions and matrix products run in 16 bits while weights, optimiser state,
inputs, input gradients and losses stay fp32 (``F.cross_entropy`` is autocast to fp32), so the
PGD step ``sign(grad)`` and the l_inf projection are exact fp32 operations. In fp16, whose range is
narrow, training scales the loss (:func:`grad_scaler`) and attacks scale theirs
(:func:`loss_scale`) so that small gradients do not underflow to zero; a sign or a normalised
step does not depend on the scale. Every attack, training step, MRC pass and evaluation in riftlab
runs inside :func:`autocast`.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator

import torch
import torch.nn as nn

__all__ = ["resolve_device", "PRECISIONS", "check_precision", "set_precision", "get_precision", "use_precision", "native_bf16",
           "autocast_dtype", "precision_name", "autocast", "loss_scale", "grad_scaler", "to_device", "compiled", "input_gradients_only"]


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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_precision = "auto"


def check_precision(precision: str) -> str:
    """``precision`` itself when it is one of :data:`PRECISIONS`, else a ValueError naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def set_precision(precision: str) -> None:
    """Set the process-wide precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see the module docstring)."""
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


def native_bf16(device: torch.device | str) -> bool:
    """Whether the CUDA ``device`` computes bf16 in hardware (compute capability >= 8.0), not by emulation.

    ``torch.cuda.is_bf16_supported()`` alone is true on a T4 (capability 7.5) through emulation, which
    is slower than fp16 there."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of computations on ``device`` with the current setting (None: plain fp32)."""
    device = torch.device(device)
    if _precision == "fp32" or device.type not in ("cuda", "cpu"):
        return None
    if _precision == "bf16":
        return torch.bfloat16
    if _precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return None


def precision_name(device: torch.device | str) -> str:
    """``bf16``, ``fp16`` or ``fp32``: what computations on ``device`` effectively run in."""
    dtype = autocast_dtype(device)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def autocast(device: torch.device | str) -> ContextManager:
    """Autocast to :func:`autocast_dtype` on ``device``, or a no-op when that is fp32."""
    device = torch.device(device)
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def loss_scale(device: torch.device | str) -> float:
    """The factor an attack multiplies its loss by before taking gradients: 1024 under fp16 autocast (so that
    small input gradients do not underflow; the sign, or a normalised step, is unchanged), else 1."""
    return 1024.0 if autocast_dtype(device) == torch.float16 else 1.0


def grad_scaler(device: torch.device | str) -> "torch.amp.GradScaler | None":
    """A gradient scaler for training under fp16 autocast (None otherwise: bf16 and fp32 need none)."""
    device = torch.device(device)
    if autocast_dtype(device) != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


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
    first batches are slow while it compiles (once for training mode, once for evaluation mode, once
    for attacks, which run with the weights frozen so that the compiled backward computes the input
    gradient alone). If compiling fails, one line says so and the model runs eagerly.
    It is meant for CUDA; on the CPU, inductor's C++ kernels crashed (double free) with two
    threads under torch 2.14.1 in our tests, and ran correctly with one.
    """
    if not enabled:
        return model
    return _CompiledOrEager(model)


class _CompiledOrEager(nn.Module):
    """``torch.compile(model)``, falling back to ``model`` itself (with a one-line note) if compiling fails."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model
        object.__setattr__(self, "_compiled", torch.compile(model))  # not a submodule: the weights are `module`'s alone
        self.failed = False

    def forward(self, *args, **kwargs):
        if not self.failed:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - any compiler failure: run eagerly instead
                import sys

                self.failed = True
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                print(f"riftlab: torch.compile failed ({type(err).__name__}: {first[:200]}); running eagerly", file=sys.stderr)
        return self.module(*args, **kwargs)


def is_compiled(model: nn.Module) -> bool:
    return isinstance(model, _CompiledOrEager)


@contextlib.contextmanager
def input_gradients_only(model: nn.Module) -> Iterator[None]:
    """Freeze ``model``'s weights for the block when it is compiled: a compiled backward computes every
    gradient its graph was traced with, so an attack through it would also compute the weights' and throw
    them away. Eager autograd skips them by itself, so an eager model is left as it is (bit-identical)."""
    if not is_compiled(model):
        yield
        return
    flags = [(p, p.requires_grad) for p in model.module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
