"""Module robust criticality (MRC): how much can one module's weights hurt robustness?

For module i with weight W_i (every Conv2d and Linear of the net),

    MRC(i) = max_{||dW||_2 <= eps * ||W_i||_2}  L_adv(W + dW) - L_adv(W)

where L_adv is the mean cross-entropy on a *fixed* set of adversarial examples crafted once
against the unperturbed model. The maximum is approximated by projected, normalised gradient
ascent on W_i alone; the ball is enforced after every step, and the reported value is the loss
at the final iterate (not the best seen along the way).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from .._progress import bar
from .._util import relative_distance
from ..attacks import eval_mode, pgd
from ..compute import autocast, autocast_dtype, loss_scale
from ..graphs import ShapeGraphs, cuda_graphs_enabled
from ..models import weight_modules
from ..resume import StepState, ensure_state

__all__ = ["module_robust_criticality", "adversarial_set"]

Batch = tuple[torch.Tensor, torch.Tensor]


def adversarial_set(model: nn.Module, batches: Iterable[Batch], eps: float, step: float, steps: int = 10, seed: int = 0,
                    progress: bool = False) -> list[Batch]:
    """Craft PGD adversarial examples against ``model`` once and keep them (as a list of batches).

    RiFT builds this set from *training* data: the test split is only ever reported. A batch that
    does not fit in GPU memory is attacked in halves (the halves draw their own random starts).
    """
    out: list[Batch] = []
    gen = None
    total = getattr(batches, "num_examples", None) or 0
    with bar(total, "crafting MRC's adversarial set", progress and total > 0) as live:
        for x, y in batches:
            if gen is None:
                gen = torch.Generator(device=x.device).manual_seed(seed)
            out.append((_attack_in_halves(model, x, y, eps, step, steps, gen), y))
            live.update(len(y))
    return out


def _attack_in_halves(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int,
                      gen: torch.Generator) -> torch.Tensor:
    try:
        return pgd(model, x, y, eps, step, steps, generator=gen)
    except torch.cuda.OutOfMemoryError:
        if len(y) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(y) // 2
        return torch.cat([_attack_in_halves(model, x[:half], y[:half], eps, step, steps, gen),
                          _attack_in_halves(model, x[half:], y[half:], eps, step, steps, gen)])


class _Rest:
    """The part of the network that a module's weight can change, fed from the fixed adversarial set's cached activations.

    MRC perturbs one weight while the adversarial set stays fixed, so every activation that does not
    depend on that weight (the frozen prefix, and branches such as a block's shortcut) is the same
    at every ascent step. The model is traced once with ``torch.fx``; for module ``name`` the graph
    is cut into the nodes that depend on it (run at every step) and the values entering them
    (computed once per batch and kept). The same operations run on the same values, so the losses
    and gradients are those of the whole network, bit for bit on the CPU. A model that cannot be
    traced, or a cache that does not fit in memory, falls back to the whole network.
    """

    def __init__(self, model: nn.Module | None):
        """``model`` to trace, or None: every step runs the whole network (``for_module`` returns it)."""
        self.graph_module: torch.fx.GraphModule | None = None
        self.model = model
        if model is not None:
            try:
                self.graph_module = torch.fx.symbolic_trace(model)
            except Exception:  # noqa: BLE001 - any untraceable model (RobustBench's, say): use the whole network
                self.graph_module = None

    def for_module(self, model: nn.Module, name: str, adv: Sequence[Batch], amp: bool) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """``forward(i, x)``: the logits of batch ``i`` of ``adv`` (whose images are ``x``) as the whole ``model`` computes them."""
        whole = lambda i, x: model(x)  # noqa: E731
        if self.graph_module is None:
            return whole
        nodes = list(self.graph_module.graph.nodes)
        start = next((n for n in nodes if n.op == "call_module" and n.target == name), None)
        if start is None:
            return whole
        changed: set[torch.fx.Node] = set()
        for node in nodes:
            if node is start or any(a in changed for a in node.all_input_nodes):
                changed.add(node)
        entering = [a for node in nodes if node in changed for a in node.all_input_nodes if a not in changed]
        entering = list(dict.fromkeys(entering))
        graph = torch.fx.Graph()
        env = {a: graph.placeholder(f"cached_{a.name}") for a in entering}
        for node in nodes:
            if node.op == "output":
                graph.output(torch.fx.map_arg(node.args[0], lambda a: env[a]))
            elif node in changed:
                env[node] = graph.node_copy(node, lambda a: env[a])
        rest = torch.fx.GraphModule(self.graph_module, graph)  # shares the model's modules: the perturbed weight is the model's
        try:
            cache = []
            with torch.no_grad(), (autocast(adv[0][0].device) if amp else contextlib.nullcontext()):
                for x, _ in adv:
                    values = _Capture(self.graph_module, entering).values(x)
                    cache.append([values[a] for a in entering])
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return whole
        return lambda i, x: rest(*cache[i])


class _Capture(torch.fx.Interpreter):
    """Runs the traced model once and keeps the values of some of its nodes."""

    def __init__(self, module: torch.fx.GraphModule, keep: Sequence[torch.fx.Node]):
        super().__init__(module)
        self.keep = set(keep)
        self.kept: dict[torch.fx.Node, Any] = {}

    def run_node(self, node: torch.fx.Node) -> Any:
        value = super().run_node(node)
        if node in self.keep:
            self.kept[node] = value
        return value

    def values(self, x: torch.Tensor) -> dict[torch.fx.Node, Any]:
        self.run(x)
        return self.kept


@torch.no_grad()
def _loss_and_accuracy(forward: Callable[[int, torch.Tensor], torch.Tensor], adv: Sequence[Batch]) -> tuple[float, float]:
    loss = torch.zeros((), device=adv[0][0].device)
    correct = torch.zeros((), device=adv[0][0].device)
    n = 0
    for i, (x, y) in enumerate(adv):
        logits = forward(i, x).float()  # fp32 even when the ascent runs in 16 bits: MRC is a small difference of two losses
        loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        n += len(y)
    return float(loss) / n, 100.0 * float(correct) / n


def module_robust_criticality(
    model: nn.Module,
    adv: Sequence[Batch],
    eps: float = 0.1,
    passes: int = 10,
    step_size: float | None = None,
    modules: Sequence[str] | None = None,
    state: StepState | None = None,
    progress: bool = False,
    reuse_activations: bool = True,
) -> pd.DataFrame:
    """MRC of every Conv2d / Linear weight, lowest (least robust-critical) first.

    The ascent runs under :func:`riftlab.compute.autocast` (bf16 on CUDA by default); the losses
    before and after it are measured in fp32, since MRC is a small difference of two losses.
    Under torchrun the modules are shared out across the ranks and every rank returns the table.

    The model is left exactly as it was: each weight is perturbed in place, one at a time, and
    restored from a copy of that weight alone (no copy of the whole model per module). The model
    runs in eval mode, so BatchNorm statistics are not touched.

    Args:
        model: the adversarially trained model.
        adv: fixed adversarial batches [(x_adv, y), ...], from :func:`adversarial_set`.
        eps: radius of the ball, relative to the weight's l2 (Frobenius) norm (paper: 0.1).
        passes: passes of gradient ascent over ``adv`` (paper: 10); one step per batch.
        step_size: length of each ascent step as a fraction of the ball's radius; by default
            2.5 / (number of steps), the usual l2-PGD choice, which can cross the ball and back.
        modules: names to evaluate (default: all Conv2d and Linear modules).
        state: receives the rows after each module (:mod:`riftlab.resume`); saved rows are not
            computed again (the adversarial set must be the same: it is, for the same seed).
        reuse_activations: run each ascent step through the part of the network the module can
            change only, from activations computed once (the default; the same values, see
            :class:`_Rest`); False runs the whole network at every step (to measure the difference).

    Returns:
        A DataFrame with one row per module: ``module``, ``mrc`` (increase of the mean adversarial
        cross-entropy), ``adv_loss`` and ``perturbed_adv_loss``, ``robust_acc`` and
        ``perturbed_robust_acc`` on ``adv`` (percent), ``robust_acc_drop`` (points), ``params``
        and ``relative_change`` (||dW|| / ||W|| reached), sorted by ``mrc``.
    """
    if not adv:
        raise ValueError("the adversarial set is empty")
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    if step_size is None:
        step_size = 2.5 / max(1, passes * len(adv))
    candidates = dict(weight_modules(model))
    names = list(candidates) if modules is None else list(modules)
    unknown = [n for n in names if n not in candidates]
    if unknown:
        raise ValueError(f"unknown module {unknown[0]!r}; valid modules: {', '.join(candidates)}")
    state = ensure_state(state)
    rows = list((state.load() or {}).get("rows", []))
    finished = {row["module"] for row in rows}
    todo = [n for n in names if n not in finished]
    # Under torchrun the modules are handed out round-robin; after each round the rows are gathered
    # (and saved by rank 0), so every rank ends with the whole table.
    world, rank = distributed.world_size(), distributed.rank()
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with eval_mode(model):
            rest = _Rest(model if reuse_activations else None)
            base_loss, base_acc = _loss_and_accuracy(lambda i, x: model(x), adv)
            steps_per_module = passes * len(adv)
            with bar(len(names), "MRC", progress, unit="module", initial=len(finished)) as live:
                for start in range(0, len(todo), world):
                    mine = todo[start + rank : start + rank + 1]
                    new_rows = [_module_row(model, rest, candidates[name], name, adv, eps, passes, step_size, base_loss, base_acc,
                                            progress and steps_per_module > 1) for name in mine]
                    for part in distributed.gather_objects(new_rows):
                        rows.extend(part)
                    live.update(min(world, len(todo) - start), lambda: {"last": rows[-1]["module"], "mrc": rows[-1]["mrc"]})
                    state.save({"rows": rows})
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return pd.DataFrame(rows).sort_values("mrc", kind="stable").reset_index(drop=True)


def _module_row(model: nn.Module, rest: _Rest, module: nn.Module, name: str, adv: Sequence[Batch], eps: float, passes: int,
                step_size: float, base_loss: float, base_acc: float, progress: bool) -> dict[str, float | str | int]:
    """Projected gradient ascent on ``module``'s weight alone, then its MRC row; the weight is restored.

    Each ascent step runs only the part of the network the weight can change (:class:`_Rest`). A
    batch that does not fit in GPU memory is split and its gradient summed over the parts: the step
    is the same (up to the order of a sum). With CUDA graphs on (:mod:`riftlab.graphs`) a pass over
    ``adv`` is one graph replay: the first pass runs eagerly, the second is recorded."""
    weight = module.weight
    original = weight.detach().clone()
    radius = eps * original.norm()
    device = adv[0][0].device
    amp = autocast_dtype(device) is not None
    forward = rest.for_module(model, name, adv, amp)
    exact = (lambda i, x: model(x)) if amp else forward  # the losses before and after, in fp32 (a cache of 16-bit activations would not be)
    scale = loss_scale(device)  # fp16: keep small gradients from underflowing (the step is normalised)
    try:
        weight.requires_grad_(True)
        one_pass = ShapeGraphs(lambda r: _ascent_pass(forward, model, adv, weight, original, r, step_size, scale, device), warmup=1,
                               enabled=cuda_graphs_enabled())
        with bar(passes * len(adv), f"MRC {name}", progress, unit="step", leave=False) as live:
            for _ in range(passes):
                one_pass(radius)
                live.update(len(adv))
        weight.requires_grad_(False)
        loss, acc = _loss_and_accuracy(exact, adv)
        reached = relative_distance(weight, original)
    finally:
        with torch.no_grad():
            weight.copy_(original)
        weight.requires_grad_(False)
    return {"module": name, "mrc": loss - base_loss, "adv_loss": base_loss, "perturbed_adv_loss": loss,
            "robust_acc": base_acc, "perturbed_robust_acc": acc, "robust_acc_drop": base_acc - acc,
            "params": weight.numel(), "relative_change": reached}


def _ascent_pass(forward: Callable[[int, torch.Tensor], torch.Tensor], model: nn.Module, adv: Sequence[Batch], weight: torch.Tensor,
                 original: torch.Tensor, radius: torch.Tensor, step_size: float, scale: float, device: torch.device) -> None:
    """One pass of normalised gradient ascent on ``weight`` over the batches of ``adv``, in place, each step projected back
    onto the l2 ball of ``radius`` (0-d tensor) around ``original``. Capture-safe: no host sync, no branch on a value."""
    for i, (x, y) in enumerate(adv):
        grad = _weight_gradient(forward, model, i, x, y, weight, scale, device)
        with torch.no_grad():
            weight.add_(grad * (step_size * radius / grad.norm().clamp_min(1e-12)))
            # Project back onto the ball after every step (the reference checks once per pass).
            delta = weight - original
            shrink = torch.clamp(radius / delta.norm().clamp_min(1e-30), max=1.0)
            weight.copy_(original + delta * shrink)


def _weight_gradient(forward: Callable[[int, torch.Tensor], torch.Tensor], model: nn.Module, i: int, x: torch.Tensor, y: torch.Tensor,
                     weight: torch.Tensor, scale: float, device: torch.device) -> torch.Tensor:
    """d mean-CE / d weight on batch ``i``; on a CUDA out-of-memory error, summed over halves of the batch."""
    try:
        with autocast(device):
            loss = F.cross_entropy(forward(i, x).float(), y)
        (grad,) = torch.autograd.grad(loss * scale if scale != 1.0 else loss, weight)
        return grad
    except torch.cuda.OutOfMemoryError:
        if len(y) == 1:
            raise
        torch.cuda.empty_cache()
        # The cached activations are per whole batch; halves go through the whole network instead.
        half, total = len(y) // 2, torch.zeros_like(weight)
        for part in (slice(0, half), slice(half, len(y))):
            with autocast(device):
                loss = F.cross_entropy(model(x[part]).float(), y[part], reduction="sum") / len(y)
            (grad,) = torch.autograd.grad(loss * scale if scale != 1.0 else loss, weight)
            total += grad
        return total
