"""A notebook's own plumbing: where it runs (Colab or not), reproducible setup, and its numbers into the prose.

:func:`setup` seeds every generator and fixes the thread count so that a chapter gives the same
outputs on every run; :func:`glue`, :func:`round_floats` and :func:`direction` make the numbers and
the words about them that the prose quotes stable and faithful to the numbers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from .._util import seed_everything
from ..compute import resolve_device


def on_colab() -> bool:
    """Whether this runs in a Google Colab notebook."""
    import sys

    return "google.colab" in sys.modules


def run_root(path: str | os.PathLike | None = None) -> Path | None:
    """Where run directories and the artifacts cache go: ``path`` when given; on Colab with Google Drive
    mounted (``/content/drive/MyDrive``), ``MyDrive/riftlab``, so that a disconnected session resumes from
    what it saved; else None (the repository's ``artifacts/`` and ``runs/``)."""
    if path is not None:
        return Path(path)
    drive = Path("/content/drive/MyDrive")
    if on_colab() and drive.is_dir():
        return drive / "riftlab"
    return None


def environment() -> str:
    """One line on where this runs (Colab or not, the GPU if any): the first cell prints it on Colab."""
    where = "Colab" if on_colab() else "local"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (Runtime > Change runtime type > T4 GPU)"
    return f"riftlab {__version__}, torch {torch.__version__}, {where}, {gpu}"


def setup(seed: int = 0, device: str = "auto", threads: int | None = 1, root: str | os.PathLike | None = None) -> torch.device:
    """Seed every generator, ask for deterministic algorithms and return the device to use.

    ``root`` (see :func:`run_root`) puts the artifacts cache there (``<root>/artifacts``): on
    Colab, Google Drive when it is mounted.

    On CPU the thread count is fixed (default 1) so that results do not depend on the machine's
    core count (parallel reductions add in another order with another thread count); one thread
    also keeps a shared 2-core machine usable: with two threads competing with another busy
    process, PyTorch's OpenMP threads slow down several-fold. On a GPU, cuDNN is put in
    deterministic mode.
    """
    seed_everything(seed)
    folder = run_root(root)
    if folder is not None:
        os.environ["RIFTLAB_ARTIFACTS"] = str(folder / "artifacts")
    dev = resolve_device(device)
    if dev.type == "cpu" and threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return dev


def _plain(value: Any, digits: int) -> Any:
    """numpy / torch scalars become Python numbers; floats are rounded to ``digits``."""
    if isinstance(value, (torch.Tensor, np.generic)) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float):
        return round(float(value), digits)
    return value


def glue(name: str, value: Any, display: bool = False, digits: int = 2) -> None:
    """Make ``value`` available to the book's prose as ``{glue:text}`name```.

    Numbers are converted to plain Python numbers and floats are rounded to ``digits`` decimals,
    so the prose and the stored outputs are stable. With myst-nb installed this is
    ``myst_nb.glue``; without it (e.g. on Colab) the value is printed when ``display`` is true.

    Returns None on purpose: a cell ending in a ``glue(...)`` call then has no result to show. (A
    trailing semicolon is not enough: nbval executes cells without storing history, and IPython
    then shows the result anyway.)
    """
    value = _plain(value, digits)
    try:
        from myst_nb import glue as _glue
    except ImportError:
        if display:
            print(f"{name}: {value}")
        return None
    _glue(name, value, display=display)
    return None


def round_floats(obj: Any, digits: int = 2) -> Any:
    """Round every float inside nested dicts/lists, for stable printed outputs."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(round_floats(v, digits) for v in obj)
    return obj


def direction(before: float, after: float, up: str = "rises", down: str = "falls", same: str = "stays level") -> str:
    """The verb a sentence about ``before`` -> ``after`` must use, from the numbers themselves (rounded as they are shown,
    to one decimal): prose glues it instead of stating a direction the numbers might contradict."""
    a, b = round(float(before), 1), round(float(after), 1)
    return up if b > a else down if b < a else same
