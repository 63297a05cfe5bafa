"""CUDA graphs: a step of many small kernels replayed with one launch.

On one H200 a PGD step of ResNet-18 costs about the same time at batch 128 as at batch 512: the GPU
waits for Python and for kernel launches, not for arithmetic. A CUDA graph records the kernels of
one call once and replays them all with one launch. What a function must be to be recorded
(*capture-safe*):

* fixed shapes: one graph per shape of its inputs (:class:`ShapeGraphs` keeps one per shape);
* no host synchronisation: no ``.item()``, ``float(t)``, ``bool(t)``, ``nonzero()`` or printing of a
  tensor, and so no Python branch on a tensor's value (branches on Python numbers are fine: they
  are decided once, at capture);
* no random draws inside: the draws are made outside, into an input buffer (a replay would repeat
  the recorded draws otherwise);
* results only in its return value or written in place into tensors that outlive the graph (the
  weights, the optimiser's momentum, a running tally): a replay reads and writes the addresses it
  recorded.

``torch.compile(fn, fullgraph=True)`` refuses the first three (a graph break is an error), which is
how the capture-safe functions are tested on the CPU (``tests/test_graphs.py``).

Whether riftlab uses graphs is one process-wide setting, off by default (the eager path is the
reference): :func:`set_cuda_graphs` (``--cuda-graphs`` on the command line, ``cuda_graphs`` in a
:class:`~riftlab.RiftConfig`). It covers adversarial training's and fine-tuning's batch step
(:mod:`riftlab.steps._graph`), every PGD attack (:func:`riftlab.attacks.pgd`, evaluation's bucketed
attacks in :func:`riftlab.evaluation.robust.evaluate`, MRC's adversarial set) and MRC's ascent, one
pass over the adversarial set per replay. On the CPU the same functions run eagerly.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch
import torch.nn as nn

__all__ = ["set_cuda_graphs", "cuda_graphs_enabled", "use_cuda_graphs", "ShapeGraphs", "graphed_for"]

_enabled = False


def set_cuda_graphs(enabled: bool) -> None:
    """Turn CUDA graphs on or off for the whole process (off by default; see the module docstring)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise ValueError(f"set_cuda_graphs takes True or False, got {enabled!r}")
    _enabled = enabled


def cuda_graphs_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def use_cuda_graphs(enabled: bool = True) -> Iterator[None]:
    """Run a block with CUDA graphs on (or off) and restore the previous setting afterwards."""
    previous = _enabled
    set_cuda_graphs(enabled)
    try:
        yield
    finally:
        set_cuda_graphs(previous)


def _key(inputs: Sequence[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in inputs)


class ShapeGraphs:
    """``fn(*inputs)`` through one CUDA graph per shape (and layout and dtype) of its inputs.

    For each new shape, the first ``warmup`` calls run ``fn`` eagerly on a side stream (cudnn's
    autotuning, cuBLAS workspaces and autograd's set-up happen there, as capture requires); the
    next call copies its inputs into static buffers, records ``fn`` on them and replays the
    recording; every later call of that shape copies its inputs in and replays. The warm-up calls
    do the same work as a replay, so a training step warmed up is a training step taken.

    ``fn`` must be capture-safe (see the module docstring) and take and return tensors only
    (None, one tensor or a tuple of them). It may write in place into tensors it closes over
    (weights, optimiser state): those must keep their storage for as long as the graphs live.
    The graphs of one instance share one memory pool, which is safe because they replay one at a
    time on one stream and their outputs are copied out at once: each call returns fresh tensors.

    Off CUDA, or with ``enabled=False``, every call runs ``fn`` eagerly.
    """

    def __init__(self, fn: Callable[..., Any], warmup: int = 2, enabled: bool = True):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (capture needs eager calls first), got {warmup}")
        self.fn, self.warmup, self.enabled = fn, warmup, enabled
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], Any]] = {}
        self.calls: dict[tuple, int] = {}
        self.replays = 0
        self._pool = None
        self._stream: torch.cuda.Stream | None = None  # the warm-up's side stream, one per instance

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if not (self.enabled and inputs and inputs[0].is_cuda):
            return self.fn(*inputs)
        key = _key(inputs)
        recorded = self.graphs.get(key)
        if recorded is None:
            seen = self.calls.get(key, 0)
            self.calls[key] = seen + 1
            if seen < self.warmup:
                return self._side_stream(inputs)
            recorded = self._capture(key, inputs)
        graph, static, out = recorded
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        graph.replay()
        self.replays += 1
        return _fresh(out)

    def _side_stream(self, inputs: Sequence[torch.Tensor]) -> Any:
        device = inputs[0].device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        self._stream.wait_stream(torch.cuda.current_stream(device))  # the inputs were made on the current stream
        with torch.cuda.stream(self._stream):
            out = self.fn(*inputs)
        torch.cuda.current_stream(device).wait_stream(self._stream)  # and the results are used there
        return out

    def _capture(self, key: tuple, inputs: Sequence[torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], Any]:
        static = [t.clone() for t in inputs]  # clone keeps the layout (channels_last stays channels_last)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.fn(*static)
        if self._pool is None:
            self._pool = graph.pool()
        self.graphs[key] = (graph, static, out)
        return self.graphs[key]


def _fresh(out: Any) -> Any:
    if out is None:
        return None
    if isinstance(out, torch.Tensor):
        return out.clone()
    return tuple(t.clone() for t in out)


# Per model: (where its tensors live, {(fn, settings, precision): ShapeGraphs}). Weak: the graphs go with the model.
_MODEL_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], dict[tuple, ShapeGraphs]]]" = weakref.WeakKeyDictionary()


def graphed_for(model: nn.Module, fn: Callable[..., Any], settings: tuple[Hashable, ...] = ()) -> Callable[..., Any]:
    """``inputs -> fn(model, *inputs, *settings)``: through CUDA graphs kept with ``model`` when graphs are on and ``model``
    is on CUDA (not compiled, one process), else eagerly.

    The graphs (a :class:`ShapeGraphs` per ``fn`` and ``settings`` and precision, one graph per input shape, captured
    at the second call of a shape) are reused by later calls for as long as ``model`` lives and its parameters and
    buffers keep their storage: weights changed in place (``load_state_dict``, an optimiser) are read at every
    replay; a model whose tensors moved (``.to()``) gets new graphs. ``fn`` must be capture-safe and leave
    ``model``'s tensors unchanged (an attack, an evaluation).
    """
    from .compute import get_precision, is_compiled
    from .distributed import active

    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    if not (_enabled and tensors and tensors[0].is_cuda) or is_compiled(model) or active():
        return lambda *inputs: fn(model, *inputs, *settings)
    where = tuple(t.data_ptr() for t in tensors)
    entry = _MODEL_GRAPHS.get(model)
    if entry is None or entry[0] != where:
        entry = _MODEL_GRAPHS[model] = (where, {})
    key = (fn, settings, get_precision())
    if key not in entry[1]:
        ref = weakref.ref(model)  # the graphs must not keep the model alive (they are its weak dictionary's values)
        entry[1][key] = ShapeGraphs(lambda *inputs: fn(ref(), *inputs, *settings), warmup=1)
    return entry[1][key]
