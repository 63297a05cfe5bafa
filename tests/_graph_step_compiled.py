"""The capture-safe PGD-AT step under ``torch.compile(fullgraph=True)`` against eager, in a process of its own
(``tests/test_graphs.py`` runs it, as ``tests/_compiled_vs_eager.py`` for the same reason: inductor has crashed the
interpreter on the CPU under torch 2.14.1, so compiling stays out of the test process; one OpenMP thread).

``fullgraph=True`` makes any graph break an error: a host sync (``.item()``, ``float(t)``, ``nonzero``), a Python
branch on a tensor's value or an untraceable call would fail here, as it would fail a CUDA graph capture on a
GPU (a sync whose value only leaves the step, as a ``float()`` of its result, is not caught here: the dispatch-level
check in ``tests/test_graphs.py`` is). The backend is ``aot_eager`` by default (AOT autograd's one functional graph, run by eager kernels: seconds to
compile); ``inductor`` may be passed as the second argument (minutes on a 2-core CPU). Writes a JSON to
``sys.argv[1]``: the losses and tallies of both paths, the largest weight difference, and whether a step with one
Python branch on a tensor's value in it (what a skip-the-step-on-overflow update would need) was refused.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch._dynamo

from riftlab.steps._graph import pgd_at_step

from conftest import load_tiny_splits, make_model  # the caller puts tests/ on PYTHONPATH


def main(out: str, backend: str = "aot_eager") -> None:
    torch.set_num_threads(1)
    result: dict = {}
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):  # torch.autograd.grad inside a compiled region: newer torch only
        result["skipped"] = f"torch {torch.__version__} cannot trace torch.autograd.grad into one graph"
        _write(out, result)
    torch._dynamo.config.trace_autograd_ops = True
    splits = load_tiny_splits()
    x_all, y_all = splits.train.float()[:96], splits.train.labels[:96]
    gen = torch.Generator().manual_seed(0)
    uniforms = [torch.rand(32, 3, 32, 32, generator=gen) for _ in range(3)]
    base = make_model(splits, width=4, seed=2).train()
    runs = {}
    for mode in ("eager", "compiled"):
        model = copy.deepcopy(base)
        params = list(model.parameters())
        momenta = [torch.zeros_like(p) for p in params]
        lr, tally = torch.tensor(0.05), torch.tensor([0.0, 0.0, -1.0, 0.0])
        step = pgd_at_step if mode == "eager" else torch.compile(pgd_at_step, fullgraph=True, backend=backend, dynamic=False)
        losses = []
        for i in range(3):
            before = float(tally[0])
            step(model, params, momenta, lr, tally, x_all[32 * i: 32 * (i + 1)], y_all[32 * i: 32 * (i + 1)], uniforms[i],
                 8 / 255, 2 / 255, 2, 0.9, 5e-4)
            losses.append((float(tally[0]) - before) / 32)
            if i == 1:
                lr.fill_(0.005)  # a new learning rate reaches the compiled step through the tensor
        runs[mode] = {"losses": losses, "tally": tally.tolist(), "state": model.state_dict()}
    a, b = runs["eager"]["state"], runs["compiled"]["state"]
    result["weight_max_abs_diff"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    result["moved"] = max(float((a[k] - base.state_dict()[k]).abs().max()) for k in a if a[k].is_floating_point())
    result.update({mode: {"losses": r["losses"], "tally": r["tally"]} for mode, r in runs.items()})

    def with_a_branch(model, params, momenta, lr, tally, x, y, uniform):  # what the check must refuse
        pgd_at_step(model, params, momenta, lr, tally, x, y, uniform, 8 / 255, 2 / 255, 1, 0.9, 5e-4)
        if not torch.isfinite(tally[0]):
            tally.zero_()

    model = copy.deepcopy(base)
    params = list(model.parameters())
    try:
        torch.compile(with_a_branch, fullgraph=True, backend=backend, dynamic=False)(
            model, params, [torch.zeros_like(p) for p in params], torch.tensor(0.05), torch.zeros(4), x_all[:32], y_all[:32], uniforms[0])
        result["branch_refused"] = False
    except Exception as err:  # noqa: BLE001 - dynamo's Unsupported, whatever its class in this torch
        result["branch_refused"] = True
        result["branch_error"] = str(err).strip().splitlines()[0][:200]
    _write(out, result)


def _write(out: str, result: dict) -> None:
    with open(out, "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    os._exit(0)  # what was to be measured is written; skip the teardown of compiled kernels


if __name__ == "__main__":
    main(*sys.argv[1:])
