"""Several processes (GPUs) through PyTorch's own engine: ``torchrun --nproc_per_node N -m riftlab ...``.

torchrun starts N copies of the command and sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``;
:func:`setup` joins them into one process group (NCCL on GPUs, gloo on the CPU). Then:

* adversarial training and fine-tuning wrap the model in ``DistributedDataParallel``: every
  global batch is split across the ranks (each rank takes its slice of the same shuffled,
  augmented batch), each rank's loss is weighted by its slice's share and gradients are averaged,
  so the update is that of the whole batch even when the slices are unequal; on CUDA every
  BatchNorm is synchronised (SyncBatchNorm), so batch statistics are the whole batch's too;
* evaluation splits every batch across the ranks and sums the counts;
* MRC hands the modules out round-robin, one module per rank at a time, and gathers the rows;
* only rank 0 writes files and prints; the others compute.

With one process every function here is a no-op, and riftlab runs exactly as without torchrun.
On the CPU (gloo, as in the tests) BatchNorm is not synchronised: PyTorch's SyncBatchNorm needs a
GPU, so batch statistics in training mode are per rank (per slice) there; with the default frozen
BatchNorm of fine-tuning this makes no difference.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .compute import resolve_device

__all__ = ["setup", "teardown", "rank", "world_size", "is_main", "barrier", "ddp", "for_training", "done_training", "unwrap",
           "all_reduce_sum", "gather_objects", "shard"]


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | torch.device = "auto") -> torch.device:
    """Join torchrun's process group (once) and return this rank's device.

    ``device``: ``auto`` or ``cuda`` gives each rank the GPU ``cuda:LOCAL_RANK`` when CUDA is
    available, ``cpu`` keeps every rank on the CPU (gloo backend, for tests). Without torchrun
    (``WORLD_SIZE`` unset or 1) nothing is initialised and ``device`` is resolved as usual.
    """

    if not launched():
        return resolve_device(device)
    wanted = str(device)
    if wanted.startswith("cuda:"):
        raise ValueError(f"under torchrun each rank takes its own GPU (cuda:LOCAL_RANK); pass --device cuda or auto, not {wanted}")
    if wanted != "cpu" and torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        dev = resolve_device("cpu" if wanted == "auto" else wanted)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return dev


def teardown() -> None:
    """Leave the process group after a successful command: wait for every rank, then destroy it.

    A gloo group left to Python's shutdown can abort one rank ("terminate called without an
    active exception") when the other rank has already closed its connections.
    """
    if active():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def ddp(model: nn.Module) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when several ranks run, else ``model``.

    The wrapper shares the parameters; train through it, save ``model`` itself.
    """
    if not active():
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def for_training(model: nn.Module, compile: bool = False) -> tuple[nn.Module, nn.Module]:
    """``(trainer, evaluator)`` for training ``model``: ``trainer`` runs the updates, ``evaluator`` the attacks
    and validation, both on ``model``'s own weights.

    With several ranks, ``trainer`` is ``DistributedDataParallel(model)`` and, on CUDA, every BatchNorm
    becomes a SyncBatchNorm (in place; the state dict keeps its names), so that batch statistics are
    those of the whole batch, as on one GPU. ``compile`` compiles ``trainer`` as ``compile(DDP(model))``
    (the order PyTorch's DDP optimiser needs to overlap communication with the backward pass) and
    ``evaluator`` as ``compile(model)``. Call :func:`done_training` on ``model`` afterwards.
    """
    from .compute import compiled

    if active() and next(model.parameters()).device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    trainer = compiled(ddp(model), compile)
    evaluator = compiled(model, compile) if active() else trainer  # one process: the same (compiled) model
    return trainer, evaluator


def done_training(model: nn.Module) -> nn.Module:
    """Turn :func:`for_training`'s SyncBatchNorms back into BatchNorm2d (same tensors), in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            bn.weight, bn.bias = child.weight, child.bias
            bn.running_mean, bn.running_var, bn.num_batches_tracked = child.running_mean, child.running_var, child.num_batches_tracked
            bn.train(child.training)
            setattr(model, name, bn)
        else:
            done_training(child)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (attacks run on it: they need no gradient synchronisation)."""
    from .compute import is_compiled

    if is_compiled(model) and isinstance(model.module, nn.parallel.DistributedDataParallel):
        return model.module.module  # compile(DDP(net)): attack the net itself
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place."""
    if active():
        for t in tensors:
            dist.all_reduce(t)


def all_reduce_max(t: torch.Tensor) -> None:
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` with one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(batches: Any) -> tuple[Any, bool]:
    """This rank's part of ``batches`` and whether it is a part (then counts must be summed).

    A :class:`riftlab.data.Batches` is split batch by batch across the ranks; any other iterable
    is returned whole (every rank then processes all of it).
    """
    from .data import Batches

    if active() and isinstance(batches, Batches):
        return batches.sharded(rank(), world_size()), True
    return batches, False
