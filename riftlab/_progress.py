"""Live progress: a bar per loop (batches, modules, alphas) with running figures, and one line per epoch.

Bars are drawn by tqdm on rank 0 only, and only when asked (``progress=True``: the ``riftlab``
command's default, off with ``--no-progress``; the book's notebooks keep them off so that papermill
and nbval see the same outputs every run). Running figures (loss, accuracy) are tensors on the
device: they are read (a host sync) only when the bar redraws, at most twice a second, never per step.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from . import distributed

__all__ = ["Bar", "bar"]


class Bar:
    """A progress bar over ``total`` units (images, modules, alphas), or nothing when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool, unit: str = "img", leave: bool = True, initial: int = 0):
        self.enabled = enabled and distributed.is_main()
        self._bar = None
        self._figures: Callable[[], dict[str, Any]] | None = None
        self._last = 0.0
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "img", leave=leave, initial=initial,
                             dynamic_ncols=True, mininterval=0.5)

    def update(self, n: int = 1, figures: Callable[[], dict[str, Any]] | None = None) -> None:
        """Advance by ``n``; ``figures()`` returns the running figures (tensors welcome), read only when the bar redraws."""
        if self._bar is None:
            return
        if figures is not None:
            self._figures = figures
        self._bar.update(n)
        now = time.monotonic()
        if self._figures is not None and now - self._last >= 0.5:
            self._last = now
            self._bar.set_postfix({k: _fmt(v) for k, v in self._figures().items()}, refresh=False)

    def write(self, line: str) -> None:
        """A log line above the bar (the one line per epoch)."""
        if self._bar is not None:
            self._bar.write(line)

    def close(self) -> None:
        if self._bar is not None:
            if self._figures is not None:
                self._bar.set_postfix({k: _fmt(v) for k, v in self._figures().items()}, refresh=False)
            self._bar.close()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fmt(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = float(value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def bar(total: int, desc: str, enabled: bool, unit: str = "img", leave: bool = True, initial: int = 0) -> Bar:
    return Bar(total, desc, enabled, unit, leave, initial)
