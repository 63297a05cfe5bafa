"""The resume protocol: how a RiFT step hands its progress to whatever keeps runs.

Every long step (:func:`~riftlab.adversarial_train`, :func:`~riftlab.module_robust_criticality`,
:func:`~riftlab.finetune_module`, :func:`~riftlab.interpolation_curve`, :func:`~riftlab.evaluate`,
:func:`~riftlab.compare`, :func:`~riftlab.ood_accuracy`) takes an optional ``state``:

* at its start it calls ``state.load()`` and, if that returns saved progress, continues from it;
* at every boundary (an epoch, a module, an alpha, a batch) it calls ``state.save(progress)`` with a
  dict of tensors, numbers, strings and lists or dicts of them;
* work it delegates gets ``state.child(name)`` (the curve's evaluation of one alpha), which it
  ``clear()`` s once that work is folded into its own progress.

Resuming from saved progress ends with exactly the result of an uninterrupted call: every random
draw of a step is seeded from its settings and its position (epoch, batch), never from the
history of the process. The step neither knows nor cares where progress goes: riftlab's runner
(:mod:`riftlab.engine.runner`) keeps it in files of a run directory, :class:`MemoryState` in memory.
Plain Python callers pass nothing (``state=None``) and nothing is kept.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["StepState", "MemoryState", "ensure_state"]


@runtime_checkable
class StepState(Protocol):
    """Where a step keeps its progress (see the module docstring)."""

    def load(self) -> dict[str, Any] | None:
        """The last progress saved, or None when there is none."""

    def save(self, progress: dict[str, Any]) -> None:
        """Keep ``progress`` (replacing what was kept), so that a new call can continue from it."""

    def child(self, name: str) -> "StepState":
        """The state of a piece of work this step delegates (its own progress, under ``name``)."""

    def clear(self) -> None:
        """Forget the progress (and that of every child)."""


def _copy(obj: Any) -> Any:
    """A deep copy that detaches tensors, so kept progress never aliases live weights."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy(v) for v in obj)
    return obj


class MemoryState:
    """Progress kept in memory: call a step again with the same state and it continues.

    Useful to run a step piecewise (e.g. adversarial training epoch by epoch, measuring something
    between epochs) and in tests.
    """

    def __init__(self) -> None:
        self._progress: dict[str, Any] | None = None
        self._children: dict[str, MemoryState] = {}
        self.saves = 0  # how many times progress was saved (tests count boundaries with it)

    def load(self) -> dict[str, Any] | None:
        return _copy(self._progress)

    def save(self, progress: dict[str, Any]) -> None:
        self._progress = _copy(progress)
        self.saves += 1

    def child(self, name: str) -> "MemoryState":
        return self._children.setdefault(name, MemoryState())

    def clear(self) -> None:
        self._progress = None
        self._children.clear()


class _NoState:
    """What ``state=None`` means: nothing is kept."""

    def load(self) -> None:
        return None

    def save(self, progress: dict[str, Any]) -> None:
        pass

    def child(self, name: str) -> "_NoState":
        return self

    def clear(self) -> None:
        pass


def ensure_state(state: StepState | None) -> StepState:
    """``state`` itself, or a state that keeps nothing when it is None."""
    return _NoState() if state is None else state
