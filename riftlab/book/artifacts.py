"""The artifacts folder: where chapters keep what they compute, and the keys that name it.

The folder is ``$RIFTLAB_ARTIFACTS``, else ``artifacts/`` at the repository root. Each result is
one stage of riftlab's run engine, named by the fingerprint of everything that determines it;
:func:`code_version` and :func:`state_hash` are the parts of those keys that stand for the code
and for a model's weights.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .. import __version__
from ..checkpoint import read_checkpoint
from ..engine.runner import RunDir, Stage, StageContext, fingerprint, plain, state_digest


def artifact_dir() -> Path:
    """Where chapters keep what they compute: ``$RIFTLAB_ARTIFACTS``, else ``artifacts/`` at the repository root."""
    env = os.environ.get("RIFTLAB_ARTIFACTS")
    if env:
        return Path(env)
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").is_file() or (folder / "pyproject.toml").is_file():
            return folder / "artifacts"
    return here / "artifacts"


def artifact_path(name: str, params: dict[str, Any]) -> Path:
    """The file that holds ``name`` computed with ``params``: different parameters never share a file."""
    return artifact_dir() / f"{name}-{fingerprint(params)[:12]}.pt"


def load_or_compute(name: str, params: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Return the saved result of ``compute()`` for these ``params``, computing and saving it if absent.

    One stage of the artifacts folder, kept by riftlab's run engine (:mod:`riftlab.engine.runner`)
    like any run directory: named by the fingerprint of ``params``, recorded in its ``riftlab.lock``,
    written atomically. ``compute`` returns a dict of tensors, numbers, strings and lists/dicts of
    them (what ``torch.load(weights_only=True)`` accepts).
    """
    path = artifact_path(name, params)

    def stage(ctx: StageContext) -> dict[str, Any]:
        ctx.save_checkpoint(path.name, {"result": compute(), "params": plain(params)})
        return {}

    RunDir(path.parent, resume=True).run(Stage(path.stem, params, stage, outputs=(path.name,)))
    return read_checkpoint(path)["result"]


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """A short hash of riftlab's own source files.

    Part of every cache key, so that artifacts computed by another version of the code (a changed
    training loop, attack or default) are never reused: editing riftlab invalidates the cache.
    """
    h = hashlib.sha1(__version__.encode())
    package = Path(__file__).resolve().parents[1]  # riftlab/, this file being riftlab/book/artifacts.py
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def state_hash(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A short hash of a model's weights and buffers (names, dtypes, shapes and bytes).

    Two models hash alike exactly when their state dicts are bit-identical, so results computed
    from a model can be cached under its hash (:func:`riftlab.engine.runner.state_digest`).
    """
    return state_digest(model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state)
