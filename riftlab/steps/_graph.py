"""PGD adversarial training's batch step as one capture-safe function, and the epoch that replays it as a CUDA graph.

:func:`pgd_at_step` is the step that :func:`riftlab.steps._loop.train_epoch` takes for PGD-AT (random start,
``steps`` signed-gradient steps with BatchNorm in eval mode, the cross-entropy on the adversarial batch in train
mode, the gradient, SGD with momentum and weight decay), written so that it can be recorded once and replayed
(see :mod:`riftlab.graphs`): the random start comes in as a buffer of uniform draws, made outside by the same
generator and in the same order as the eager attack's, so both paths meet the same starts; the learning rate
is a tensor read at each replay, so the schedule is not baked in; the SGD update is torch's (dampening 0, no
Nesterov) on the optimiser's own momentum buffers; the loss, accuracy and first non-finite step are summed on
the device. :class:`GraphedPGDTraining` runs an epoch of it: on CUDA each batch is one graph replay (after
two eager batches of each shape, the warm-up a capture needs), on the CPU each batch runs eagerly.

The last, shorter batch of an epoch (45000 images in batches of 128 leave 72) runs the same step at its own
shape: eagerly in the first two epochs, then as a graph of its own. It is neither padded nor dropped: padding it
to the full shape would change train-mode BatchNorm's batch statistics (the padded rows would enter the mean and
variance) unless BatchNorm itself were masked, and dropping it would train on other images than the eager epoch
does. So the graphed epoch is the eager epoch, batch for batch.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._progress import Bar
from ..attacks import _ascend, start_from_uniform
from ..compute import autocast
from ..graphs import ShapeGraphs

__all__ = ["pgd_at_step", "sgd_update", "GraphedPGDTraining"]

# Slots of the tally tensor that pgd_at_step adds to: summed loss (times batch size), correct predictions,
# the index of the first step whose loss was not finite (-1 while none) and the number of steps taken.
LOSS, CORRECT, FIRST_BAD, STEPS = range(4)


def sgd_update(params: list[torch.Tensor], grads: list[torch.Tensor], momenta: list[torch.Tensor], lr: torch.Tensor,
               momentum: float, weight_decay: float) -> None:
    """torch.optim.SGD's update (dampening 0, no Nesterov), in place, with the learning rate a 0-d tensor.

    A momentum buffer that starts at zero gives torch's first step (buffer = gradient) exactly. The update is
    ``p += -1 * lr * buf`` (``addcmul``), which rounds as torch's ``p.add_(buf, alpha=-lr)`` does.

    Args:
        params, grads, momenta: lists of matching tensors (fp32, on one device); ``momenta`` unused when momentum is 0.
        lr: the learning rate, a 0-d tensor on the params' device (so that a CUDA graph reads its current value).
    """
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        torch._foreach_mul_(momenta, momentum)
        torch._foreach_add_(momenta, grads)
        grads = momenta
    torch._foreach_addcmul_(params, grads, [lr] * len(params), value=-1)


def pgd_at_step(model: nn.Module, params: list[torch.Tensor], momenta: list[torch.Tensor], lr: torch.Tensor, tally: torch.Tensor,
                x: torch.Tensor, y: torch.Tensor, uniform: torch.Tensor | None, eps: float, step: float, steps: int,
                momentum: float, weight_decay: float) -> None:
    """One PGD-AT batch step, capture-safe: attack, loss, gradient and SGD update; results written in place.

    The same computation as :func:`riftlab.steps._loop.train_epoch` with :func:`riftlab.steps.losses.at_objective`
    ``("pgd", ...)``: the attack from the start ``uniform`` picks in the eps ball (:func:`riftlab.attacks.pgd`'s),
    BatchNorm in eval mode while attacking, the mean cross-entropy on the adversarial batch with ``model`` in its
    own (train) mode, all under :func:`riftlab.compute.autocast`; then the gradient of every tensor in ``params``
    and :func:`sgd_update`. ``steps = 0`` is standard training on ``x`` itself.

    Args:
        model: maps images in [0, 1], (N, C, H, W), to logits (N, K); in train mode.
        params: the trained tensors (the optimiser's), updated in place; ``momenta`` their momentum buffers.
        lr: learning rate, 0-d tensor. tally: float (4,) tensor on the device, added to in place (slots
            ``LOSS``, ``CORRECT``, ``FIRST_BAD``, ``STEPS``).
        x: clean images in [0, 1], (N, C, H, W). y: labels, (N,).
        uniform: draws in [0, 1) shaped like ``x`` for the random start (None when ``steps`` is 0 or ``eps`` is 0).
        eps, step, steps: the l_inf radius, step size (pixel units) and number of PGD steps.
        momentum, weight_decay: SGD's.
    """
    with autocast(x.device):  # as train_epoch: the attack and the forward pass inside one autocast region
        if steps > 0:
            start = start_from_uniform(x, uniform, eps) if eps > 0 else x.clone()
            x_in = _ascend(model, x, y, start, eps, step, steps)
        else:
            x_in = x
        logits = model(x_in).float()
        loss = F.cross_entropy(logits, y)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        sgd_update(params, list(grads), momenta, lr, momentum, weight_decay)
        loss = loss.detach()
        tally[LOSS] += loss * y.shape[0]
        tally[CORRECT] += (logits.detach().argmax(1) == y).sum()
        tally[FIRST_BAD] = torch.where((tally[FIRST_BAD] < 0) & ~torch.isfinite(loss), tally[STEPS], tally[FIRST_BAD])
        tally[STEPS] += 1


def sgd_settings(opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], float, float]:
    """The trained tensors, momentum and weight decay of a one-group ``torch.optim.SGD`` that :func:`sgd_update` can take over."""
    if not isinstance(opt, torch.optim.SGD) or len(opt.param_groups) != 1:
        raise ValueError("the graphed PGD-AT step takes over a torch.optim.SGD with one parameter group; "
                         f"got {type(opt).__name__} with {len(opt.param_groups)} group(s)")
    group = opt.param_groups[0]
    unsupported = [k for k in ("nesterov", "maximize") if group.get(k)] + (["dampening"] if group.get("dampening", 0) != 0 else [])
    if unsupported:
        raise ValueError(f"the graphed PGD-AT step does not do SGD's {', '.join(unsupported)}; train eagerly for them")
    return list(group["params"]), float(group["momentum"]), float(group["weight_decay"])


class GraphedPGDTraining:
    """Epochs of :func:`pgd_at_step` over ``opt``'s weights: one CUDA graph replay per batch on CUDA, eager elsewhere.

    Takes over ``opt`` (a one-group ``torch.optim.SGD``): its momentum buffers are the ones updated (created at
    zero when the optimiser has not stepped yet, which is torch's first step exactly), and its learning rate is
    read at the start of every epoch, so a scheduler stepping ``opt`` between epochs works as with ``opt.step``;
    ``opt.state_dict()`` stays the checkpoint of the update. Load a resumed state into ``opt`` before building this
    (the graph records the buffers' addresses).
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, eps: float, step: float, steps: int, warmup: int = 2):
        self.model, self.opt = model, opt
        self.params, self.momentum, self.weight_decay = sgd_settings(opt)
        device = self.params[0].device
        self.momenta: list[torch.Tensor] = []
        if self.momentum != 0:
            for p in self.params:
                state = opt.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.momenta.append(state["momentum_buffer"])
        self.eps, self.step, self.steps = eps, step, steps
        self.lr = torch.zeros((), device=device)
        self.tally = torch.zeros(4, device=device)
        self.draws = steps > 0 and eps > 0  # pgd draws a start only then
        self.graphs = ShapeGraphs(self._step, warmup=warmup)

    def _step(self, x: torch.Tensor, y: torch.Tensor, *uniform: torch.Tensor) -> None:
        pgd_at_step(self.model, self.params, self.momenta, self.lr, self.tally, x, y, uniform[0] if uniform else None,
                    self.eps, self.step, self.steps, self.momentum, self.weight_decay)

    def epoch(self, batches, generator: torch.Generator | None = None, bar: Bar | None = None) -> dict[str, float]:
        """One epoch over ``batches`` (``(x, y)`` pairs, the model in train mode); ``generator`` draws the random starts.

        Returns what :func:`riftlab.steps._loop.train_epoch` returns: mean loss, accuracy (percent) on the
        adversarial inputs and ``first_bad_step`` (-1 if every loss was finite); one host sync, at the end.
        """
        self.lr.fill_(float(self.opt.param_groups[0]["lr"]))
        self.tally.zero_()
        self.tally[FIRST_BAD] = -1
        seen = 0
        figures = lambda: {"loss": self.tally[LOSS] / max(seen, 1), "acc": 100 * self.tally[CORRECT] / max(seen, 1)}  # noqa: E731
        for x, y in batches:
            if self.draws:
                self.graphs(x, y, torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator))
            else:
                self.graphs(x, y)
            seen += len(y)
            if bar is not None:
                bar.update(len(y), figures)
        self.opt._opt_called = True  # the epoch stepped opt's weights (the flag opt.step sets, read by lr schedulers)
        loss_sum, correct, first_bad, _ = self.tally.tolist()
        n = max(seen, 1)
        return {"loss": loss_sum / n, "acc": 100.0 * correct / n, "first_bad_step": int(first_bad)}


def graphed_training_or_none(model: nn.Module, opt: torch.optim.Optimizer, method: str, eps: float, step: float, steps: int,
                             compile: bool, distributed_run: bool, fp16_scaler: bool) -> GraphedPGDTraining | None:
    """The graphed epoch runner for this run, or None (eager) with one line saying why when graphs cannot cover it."""
    why = ("TRADES and MART train eagerly (the graphed step is PGD-AT's)" if method != "pgd" else
           "torch.compile already compiles the step" if compile else
           "several processes (torchrun) train eagerly" if distributed_run else
           "fp16's gradient scaler checks for overflow on the host" if fp16_scaler else None)
    if why is not None:
        print(f"riftlab: CUDA graphs are on but this training runs eagerly: {why}", file=sys.stderr)
        return None
    return GraphedPGDTraining(model, opt, eps, step, steps)
