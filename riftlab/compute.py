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
import copy
from typing import ContextManager, Iterator

import torch
import torch.nn as nn

__all__ = ["resolve_device", "PRECISIONS", "check_precision", "set_precision", "get_precision", "use_precision", "native_bf16",
           "autocast_dtype", "precision_name", "autocast", "loss_scale", "grad_scaler", "to_device", "compiled", "input_gradients_only",
           "fold_batchnorm"]


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


def fold_batchnorm(model: nn.Module, out: nn.Module | None = None) -> nn.Module:
    """An eval-only copy of ``model`` with every BatchNorm that follows a convolution folded into that convolution.

    In eval mode a BatchNorm2d is the per-channel affine map ``y = (x - mean) / sqrt(var + eps) * gamma + beta``; after
    a convolution it is the same convolution with its weight scaled by ``s = gamma / sqrt(var + eps)`` (per output
    channel) and a bias ``beta + (b - mean) * s``. The copy carries those weights (worked out in float64, stored in the
    weight's dtype and layout) and an ``nn.Identity`` where each folded BatchNorm was: one kernel and one pass over the
    activations fewer per pair, in every forward and backward of an attack. The pairs are
    :func:`riftlab.models.conv_bn_pairs`'s, listed per block type (ResNet-18: 20; a pre-activation ResNet-18: 8, the
    BatchNorms in front of a convolution stay); other modules are copied as they are. ``out.folded_batchnorms`` says
    how many were folded.

    The copy computes ``model``'s eval-mode function up to floating-point rounding (not bit for bit, hence an opt-in:
    ``fold_bn``, ``--fold-bn``), for evaluation only: its weights do not require gradients (input gradients still
    flow), and a forward pass in train mode is refused (the folded statistics would not be re-estimated). ``model``
    is not modified; a compiled model is folded from its eager module, into an eager copy.

    Args:
        model: the model to fold (any mode; the copy is in eval mode).
        out: an earlier result of ``fold_batchnorm`` for a model of the same architecture, refreshed in place with
            ``model``'s current weights and returned (its tensors keep their storage, so CUDA graphs recorded on it
            stay valid); None makes a new copy.
    """
    source = model.module if is_compiled(model) else model
    from .models import conv_bn_pairs

    pairs = conv_bn_pairs(source)
    if out is None:
        out = copy.deepcopy(source)
        for conv_name, bn_name in pairs:
            conv, bn = out.get_submodule(conv_name), out.get_submodule(bn_name)
            if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats:
                raise ValueError(f"internal: {conv_name} -> {bn_name} is listed as a conv -> BatchNorm pair, but they are "
                                 f"{type(conv).__name__} and {type(bn).__name__} (with running statistics)")
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device))
            parent, _, last = bn_name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, last, nn.Identity())
        out.requires_grad_(False)
        out.eval()
        out.register_forward_pre_hook(_refuse_train_mode)
        out.folded_batchnorms = len(pairs)
    elif getattr(out, "folded_batchnorms", None) != len(pairs):
        raise ValueError("out must be fold_batchnorm's copy of a model of the same architecture as model; "
                         "pass out=None to make a new copy")
    folded = {conv for conv, _ in pairs}
    tensors = {**dict(source.named_parameters()), **dict(source.named_buffers())}
    with torch.no_grad():
        for name, tensor in [*out.named_parameters(), *out.named_buffers()]:
            if name.rpartition(".")[0] not in folded:
                tensor.copy_(tensors[name])
        for conv_name, bn_name in pairs:
            conv, bn, target = source.get_submodule(conv_name), source.get_submodule(bn_name), out.get_submodule(conv_name)
            weight, bias = _folded_conv(conv, bn)
            target.weight.copy_(weight)  # copy_ keeps the copy's dtype, device and layout (channels_last on CUDA)
            target.bias.copy_(bias)
    return out


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of ``bn(conv(x))`` in eval mode as one convolution, in float64 on the CPU (the rounding of
    the fold itself stays far below fp32's; the CPU because not every device has float64)."""
    as64 = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    gamma = as64(bn.weight) if bn.weight is not None else torch.ones(bn.num_features, dtype=torch.float64)
    beta = as64(bn.bias) if bn.bias is not None else torch.zeros(bn.num_features, dtype=torch.float64)
    scale = gamma / torch.sqrt(as64(bn.running_var) + bn.eps)
    bias = as64(conv.bias) if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
    return as64(conv.weight) * scale.view(-1, 1, 1, 1), beta + (bias - as64(bn.running_mean)) * scale


def _refuse_train_mode(module: nn.Module, args: tuple) -> None:
    if module.training:
        raise RuntimeError("a BatchNorm-folded model (riftlab.compute.fold_batchnorm) computes in eval mode only: call .eval() on it, "
                           "or train the original model")
