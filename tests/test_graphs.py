"""CUDA graphs (riftlab.graphs, riftlab.steps._graph): what can be checked without a GPU.

The capture-safe functions (PGD-AT's batch step, evaluation's attack) read nothing back to the host and compile into
one graph; the graphed training epoch, which runs that step eagerly on the CPU, is the eager epoch bit for bit
(short last batch, learning-rate drop and resume included). The graphs themselves are tested in ``test_cuda.py``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from riftlab import Batches, MemoryState, adversarial_train
from riftlab.compute import fold_batchnorm
from riftlab.evaluation.robust import survives_attack
from riftlab.graphs import ShapeGraphs, cuda_graphs_enabled, graphed_for, set_cuda_graphs, use_cuda_graphs
from riftlab.steps._graph import FIRST_BAD, STEPS, GraphedPGDTraining, pgd_at_step, sgd_settings, sgd_update
from riftlab.steps.criticality import _ascent_pass

from conftest import make_model

TESTS = Path(__file__).resolve().parent


class HostReads(TorchDispatchMode):
    """Records every operation that reads a tensor's values back to the host: on CUDA each is a sync, which a graph
    capture refuses (``.item()``, ``float()`` and ``bool()`` go through ``_local_scalar_dense``; the others have an
    output shape that depends on the values). ``tolist()`` reads the memory without an operation, unseen here."""

    READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "equal", "is_nonzero"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if name in self.READS or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _batch(splits, n=32):
    return splits.train.float()[:n], splits.train.labels[:n]


def test_host_reads_catches_what_a_capture_refuses():
    t = torch.randn(8)
    for fn in (lambda: float(t.sum()), lambda: t[t > 0], lambda: bool(t.any()), lambda: t.nonzero()):
        with HostReads() as reads:
            fn()
        assert reads.seen, "the check must see this host read"


def test_the_capture_safe_functions_read_nothing_back_to_the_host(tiny_splits):
    model = make_model(tiny_splits, width=4, seed=1).train()
    params = list(model.parameters())
    x, y = _batch(tiny_splits)
    uniform = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    tally = torch.tensor([0.0, 0.0, -1.0, 0.0])
    with HostReads() as reads:
        pgd_at_step(model, params, [torch.zeros_like(p) for p in params], torch.tensor(0.1), tally, x, y, uniform, 8 / 255, 2 / 255, 2,
                    0.9, 5e-4)
        survives_attack(model, x, y, uniform * 0.01 + x * 0.99, 8 / 255, 2 / 255, 2)
    assert reads.seen == []
    assert tally[STEPS] == 1 and tally[FIRST_BAD] == -1 and model.training
    model.eval()  # MRC's ascent: one pass over the adversarial set, on one weight
    for p in params:
        p.requires_grad_(False)
    weight = model.linear.weight.requires_grad_(True)
    original = weight.detach().clone()
    with HostReads() as reads:
        _ascent_pass(lambda i, x_: model(x_), model, [(x, y), (x, y)], weight, original, 0.1 * original.norm(), 0.5, 1.0, x.device)
    assert reads.seen == [] and not torch.equal(weight, original)


def test_the_folded_models_attack_reads_nothing_back_to_the_host(tiny_splits):
    """evaluate(..., fold_bn=True) attacks fold_batchnorm's copy through the same capture-safe survives_attack: its
    train-mode guard is a Python check of a flag, not of a tensor's value."""
    folded = fold_batchnorm(make_model(tiny_splits, width=4, seed=1).eval())
    x, y = _batch(tiny_splits)
    with HostReads() as reads:
        survives_attack(folded, x, y, x.clone(), 8 / 255, 2 / 255, 2)
    assert reads.seen == [] and folded.folded_batchnorms == 20


def test_sgd_update_is_torchs_sgd_bit_for_bit():
    torch.manual_seed(0)
    ours = [torch.randn(5, 3), torch.randn(7)]
    theirs = [p.clone().requires_grad_(True) for p in ours]
    opt = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, weight_decay=5e-4)
    momenta, lr = [torch.zeros_like(p) for p in ours], torch.tensor(0.1)
    for i in range(4):
        grads = [torch.randn_like(p) for p in ours]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
        sgd_update(ours, grads, momenta, lr, 0.9, 5e-4)
        if i == 1:
            opt.param_groups[0]["lr"] = 0.01
            lr.fill_(0.01)
    assert all(torch.equal(a, b.detach()) for a, b in zip(ours, theirs))
    assert all(torch.equal(m, opt.state[p]["momentum_buffer"]) for m, p in zip(momenta, theirs))


def _train(splits, epochs, state=None, seed=0):
    model = make_model(splits, width=4, seed=seed)
    train = Batches(splits.train.subset(136), 64, shuffle=True, augment=True, seed=seed)  # 2 batches of 64 and one of 8
    result = adversarial_train(model, train, None, epochs=epochs, lr=0.05, milestones=[1], attack_steps=2, step=4 / 255, seed=seed,
                               state=state)
    return model, result


def test_graphed_epochs_are_the_eager_epochs_on_the_cpu(tiny_splits):
    """With graphs on, PGD-AT runs pgd_at_step (eagerly here): the same starts, losses, momentum and weights as the
    eager loop, over a short last batch and a learning-rate drop, and through a resume in the middle."""
    eager, eager_result = _train(tiny_splits, epochs=2)
    state = MemoryState()
    with use_cuda_graphs():
        _train(tiny_splits, epochs=1, state=state)  # stops after epoch 1: the resumed run must take over its momentum
        graphed, graphed_result = _train(tiny_splits, epochs=2, state=state)
    assert not cuda_graphs_enabled()
    a, b = eager.state_dict(), graphed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert graphed_result.history == eager_result.history
    assert [h["lr"] for h in graphed_result.history] == pytest.approx([0.05, 0.005])


def test_the_graphed_runner_takes_over_sgd_only(tiny_splits):
    model = make_model(tiny_splits, width=4)
    with pytest.raises(ValueError, match="torch.optim.SGD with one parameter group; got Adam"):
        GraphedPGDTraining(model, torch.optim.Adam(model.parameters()), 8 / 255, 2 / 255, 2)
    with pytest.raises(ValueError, match="does not do SGD's nesterov"):
        sgd_settings(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True))
    runner = GraphedPGDTraining(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 8 / 255, 2 / 255, 2)
    assert len(runner.momenta) == len(list(model.parameters())) and all(float(m.abs().sum()) == 0 for m in runner.momenta)


def test_graphs_setting_and_the_runs_it_cannot_cover(tiny_splits, capsys):
    with pytest.raises(ValueError, match="set_cuda_graphs takes True or False, got 1"):
        set_cuda_graphs(1)
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        ShapeGraphs(lambda x: x, warmup=0)
    calls = []
    graphs = ShapeGraphs(lambda x: calls.append(x) or x * 2)
    assert torch.equal(graphs(torch.ones(3)), torch.full((3,), 2.0)) and len(calls) == 1 and graphs.replays == 0  # CPU: eager
    model = make_model(tiny_splits, width=4)
    x, y = _batch(tiny_splits, 8)
    with use_cuda_graphs():
        assert torch.equal(graphed_for(model, survives_attack, (0.0, 2 / 255, 2))(x, y, x), survives_attack(model, x, y, x, 0.0, 2 / 255, 2))
        train = Batches(tiny_splits.train.subset(64), 64, seed=0)
        adversarial_train(model, train, None, epochs=1, attack_steps=1, method="trades")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA graphs are on but this training runs eagerly: TRADES and MART train eagerly" in err


@pytest.mark.slow
def test_the_step_compiles_to_one_graph_and_matches_eager(tmp_path):
    """torch.compile(fullgraph=True) of pgd_at_step: no graph break (no branch on a tensor's value, nothing
    untraceable), and three steps give eager's losses and weights. In a process of its own (see
    tests/_graph_step_compiled.py); about half a minute on a 2-core CPU."""
    out = tmp_path / "graph_step.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(TESTS / "_graph_step_compiled.py"), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and out.exists(), f"exit code {proc.returncode}:\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert result["branch_refused"], "fullgraph must refuse a Python branch on a tensor's value"
    assert result["moved"] > 1e-3  # the steps did train
    assert result["weight_max_abs_diff"] <= 1e-5 * max(1.0, result["moved"])
    assert result["compiled"]["losses"] == pytest.approx(result["eager"]["losses"], rel=1e-5)
    assert result["compiled"]["tally"] == pytest.approx(result["eager"]["tally"], rel=1e-5)
