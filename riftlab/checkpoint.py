"""Checkpoints: atomic writes, safe loads, and the reference code's formats."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from . import distributed

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "extract_state_dict", "checkpoint_problem", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unsafe, unreadable or for another model."""


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` with ``torch.save`` atomically: temporary file, fsync, rename.

    A crash mid-write leaves the previous checkpoint intact, never a truncated file. Under
    torchrun only rank 0 writes (every rank holds the same weights); the others return at once.
    """
    path = Path(path)
    if not distributed.is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would survive the rename
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(dict(payload), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """``None`` when ``path`` looks like a whole PyTorch checkpoint file, else what it is instead, in words.

    Reads the file's first bytes and, for PyTorch's zip format, its table of contents (at the end of the file, so a
    truncated copy has none): cheap, and before any data is loaded. Whether the contents load is for
    :func:`read_checkpoint` to find out."""
    try:
        return _checkpoint_problem(Path(path))
    except OSError as err:  # an ancestor that cannot be searched
        return f"it cannot be reached: {err.strerror}"


def _checkpoint_problem(path: Path) -> str | None:
    if path.is_dir():
        return "it is a directory, not a checkpoint file"
    if not path.exists():
        return "it does not exist"
    if not path.is_file():
        return "it is not a regular file"
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
    except OSError as err:
        return f"it cannot be read: {err.strerror or err}"
    if not magic:
        return "it is empty"
    if magic == b"PK":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "it is truncated or damaged: a zip archive, PyTorch's format, without its table of contents at the end"
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "it is a zip archive but not a PyTorch checkpoint (no data.pkl inside)"
        return None
    if magic[:1] != b"\x80":
        return "it is not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    return None


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, never code.

    A missing, empty, truncated or foreign file, or a directory, is a :class:`CheckpointError` that says which."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path}: {problem}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():  # a pickle cut short, not an unsafe one
            raise CheckpointError(f"checkpoint {path} is truncated or damaged ({str(err).splitlines()[0]})") from None
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than tensors and plain containers, "
            f"which could run code when unpickled ({str(err).splitlines()[0]}). "
            "Re-save it as a state dict (torch.save(model.state_dict(), path)) from a trusted source."
        ) from None
    except Exception as err:
        first = (str(err).splitlines() or [""])[0]
        raise CheckpointError(f"checkpoint {path} is truncated or damaged: it cannot be read ({type(err).__name__}: {first})") from None


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint in any of the reference formats.

    Accepts a bare state dict or one stored under ``net``, ``state_dict``, ``model`` or
    ``model_state`` (riftlab's own), with or without the ``module.`` prefix that
    ``DataParallel`` / ``DistributedDataParallel`` add.
    """
    if isinstance(obj, Mapping):
        for key in ("model_state", "state_dict", "net", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                return extract_state_dict(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    raise CheckpointError("no state dict found: expected a dict of tensors, possibly under 'net', 'state_dict' or 'model'")


def load_checkpoint(model: nn.Module, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load weights from ``path`` into ``model`` (in place) and return the checkpoint's metadata.

    Every tensor must match by name and shape; the first mismatch is named in the error. The
    reference WideResNet's unused ``sub_block1`` tensors are dropped.
    """
    obj = read_checkpoint(path, map_location)
    state = extract_state_dict(obj)
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith("sub_block1.") and k not in expected)}
    for name, tensor in expected.items():
        if name not in state:
            raise CheckpointError(f"{path}: tensor {name!r} of the model is missing from the checkpoint (is it for another model?)")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(state[name].shape)} in the checkpoint "
                                  f"but {tuple(tensor.shape)} in the model (another model, width or class count?)")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: checkpoint has tensors the model lacks, first {extra[0]!r} (is it for another model?)")
    meta = obj.get("meta", {}) if isinstance(obj, Mapping) else {}
    meta = dict(meta) if isinstance(meta, Mapping) else {}
    _check_meta(path, meta, getattr(model, "riftlab_config", {}))
    model.load_state_dict(state)
    return meta


def _check_meta(path: str | os.PathLike, meta: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """A riftlab checkpoint records its model and input normalisation; refuse a mismatch that the
    tensor shapes cannot reveal (another normalisation silently changes every logit)."""
    if meta.get("model") is not None and config.get("model") is not None and meta["model"] != config["model"]:
        raise CheckpointError(f"{path}: checkpoint is for model {meta['model']!r}, not {config['model']!r}")
    for key in ("mean", "std"):
        saved, ours = meta.get(key), config.get(key)
        if saved is not None and ours is not None:
            if len(saved) != len(ours) or any(abs(float(a) - float(b)) > 1e-6 for a, b in zip(saved, ours)):
                raise CheckpointError(f"{path}: checkpoint was trained with input normalisation {key}={list(saved)}, "
                                      f"but the model uses {key}={list(ours)} (another dataset?)")
