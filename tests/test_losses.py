"""TRADES and MART: the losses against hand computations, their attack, and short training runs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from riftlab import Batches, adversarial_train, mart_loss, trades_loss
from riftlab.checkpoint import read_checkpoint
from riftlab.cli import build_parser, config_from_args, main
from riftlab.steps.losses import at_objective, trades_attack

from conftest import make_model

# Two examples, three classes. Example 0: the adversarial argmax is a wrong class (1); example 1:
# the adversarial argmax is the true class (2), so MART's runner-up is the best *other* class (1).
CLEAN = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
ADV = [[1.0, 2.0, 0.0], [0.0, 1.0, 1.5]]
LABELS = [0, 2]


def _softmax(rows):
    out = []
    for z in rows:
        e = [math.exp(v) for v in z]
        out.append([v / sum(e) for v in e])
    return np.array(out)


def _by_hand():
    """Every term of both losses, straight from the definitions."""
    p, q = _softmax(CLEAN), _softmax(ADV)
    ce_clean = -np.mean([math.log(p[i][y]) for i, y in enumerate(LABELS)])
    ce_adv = -np.mean([math.log(q[i][y]) for i, y in enumerate(LABELS)])
    kl = np.array([sum(p[i][k] * math.log(p[i][k] / q[i][k]) for k in range(3)) for i in range(2)])
    runner_up = [max(q[i][k] for k in range(3) if k != y) for i, y in enumerate(LABELS)]
    boost = -np.mean([math.log(1 - r) for r in runner_up])
    weighted_kl = np.mean([kl[i] * (1 - p[i][y]) for i, y in enumerate(LABELS)])
    return ce_clean, ce_adv, kl, boost, weighted_kl


def _tensors(dtype=torch.float32, grad=False):
    z = torch.tensor(CLEAN, dtype=dtype, requires_grad=grad)
    za = torch.tensor(ADV, dtype=dtype, requires_grad=grad)
    return z, za, torch.tensor(LABELS)


def test_trades_loss_matches_hand_computation():
    ce_clean, _, kl, _, _ = _by_hand()
    z, za, y = _tensors()
    assert trades_loss(z, za, y, beta=6.0).item() == pytest.approx(ce_clean + 6 * kl.mean(), rel=1e-6)
    assert trades_loss(z, za, y, beta=1.5).item() == pytest.approx(ce_clean + 1.5 * kl.mean(), rel=1e-6)
    assert trades_loss(z, za, y, beta=0.0).item() == pytest.approx(ce_clean, rel=1e-6)  # plain CE on x
    assert trades_loss(z, z, y, beta=6.0).item() == pytest.approx(ce_clean, rel=1e-6)  # no perturbation, no KL


def test_mart_loss_matches_hand_computation():
    _, ce_adv, _, boost, weighted_kl = _by_hand()
    z, za, y = _tensors()
    assert mart_loss(z, za, y, beta=6.0).item() == pytest.approx(ce_adv + boost + 6 * weighted_kl, rel=1e-6)
    assert mart_loss(z, za, y, beta=0.0).item() == pytest.approx(ce_adv + boost, rel=1e-6)  # boosted CE alone


def test_mart_boost_is_exact_for_confident_wrong_predictions():
    # p'_1 = e^20 / (e^20 + 2): -log(1 - p'_1) = log((e^20 + 2) / 2), about 19.3. The original code's
    # log(1.0001 - p) guard would cap it near -log(1e-4) = 9.2.
    za = torch.tensor([[0.0, 20.0, 0.0]])
    y = torch.tensor([0])
    ce = math.log(math.exp(20) + 2)  # -log p'_0
    expected = ce + math.log((math.exp(20) + 2) / 2)
    assert mart_loss(za, za, y, beta=6.0).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss", [trades_loss, mart_loss])
def test_gradients_are_correct_and_reach_both_inputs(loss):
    z, za, y = _tensors(torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b, y, beta=6.0), (z, za))
    loss(z, za, y, beta=6.0).backward()
    assert z.grad.abs().sum() > 0 and za.grad.abs().sum() > 0
    z.grad = za.grad = None
    trades_loss(z, za, y, beta=0.0).backward()
    assert za.grad is None or torch.all(za.grad == 0)  # beta = 0: the adversarial logits do not matter


@pytest.fixture(scope="module")
def small_batch(tiny_splits):
    x, y = next(iter(Batches(tiny_splits.train.subset(16), 16)))
    return x, y


def test_trades_attack_stays_in_the_ball_raises_kl_and_leaves_bn_alone(tiny_splits, small_batch):
    model = make_model(tiny_splits, width=4).train()
    x, _ = small_batch
    with torch.no_grad():  # give BatchNorm statistics something other than their initial values
        model(x)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    eps = 8 / 255
    gen = torch.Generator().manual_seed(0)
    x_adv = trades_attack(model, x, eps, 2 / 255, 5, generator=gen)
    assert model.training and all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    start = trades_attack(model, x, eps, 2 / 255, 0, generator=torch.Generator().manual_seed(0))
    assert 0 < (start - x).abs().max() <= 0.01  # the 0.001 * N(0, 1) start
    model.eval()
    with torch.no_grad():
        log_p = F.log_softmax(model(x), 1)
        kl = lambda xa: F.kl_div(F.log_softmax(model(xa), 1), log_p, reduction="sum", log_target=True).item()
        assert kl(x_adv) > 10 * kl(start)


@pytest.mark.parametrize("method", ["trades", "mart"])
def test_objective_trains_every_parameter(method, tiny_splits, small_batch):
    model = make_model(tiny_splits, width=4).train()
    x, y = small_batch
    loss, logits = at_objective(method, 8 / 255, 2 / 255, 2, beta=6.0, generator=torch.Generator().manual_seed(0))(model, x, y)
    assert logits.shape == (16, 10) and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("method", ["trades", "mart"])
def test_short_training_run_trains_with_the_method(method, tiny_splits):
    model = make_model(tiny_splits, width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = Batches(tiny_splits.train.subset(128), 64, shuffle=True, augment=True, seed=0)
    val = Batches(tiny_splits.val.subset(64), 64)
    result = adversarial_train(model, train, val, epochs=1, method=method, beta=3.0, lr=0.05, attack_steps=1, step=4 / 255, eval_steps=1)
    assert math.isfinite(result.history[0]["train_loss"]) and "train_robust_acc" in result.history[0]
    assert any(not torch.equal(v, before[k]) for k, v in result.model.state_dict().items())


def test_bad_method_or_beta_is_a_clear_error(tiny_splits):
    train = Batches(tiny_splits.train.subset(64), 64)
    model = make_model(tiny_splits, width=4)
    with pytest.raises(ValueError, match=r"unknown adversarial-training method 'awp'; choices: pgd, trades, mart"):
        adversarial_train(model, train, epochs=1, method="awp")
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        adversarial_train(model, train, epochs=1, method="trades", beta=-1.0)
    with pytest.raises(ValueError, match="attack_steps must be >= 1"):
        adversarial_train(model, train, epochs=1, method="mart", attack_steps=0)


def test_command_line_method_and_beta(tmp_path, capsys):
    tiny = ["--dataset", "synthetic-cifar10", "--width", "4", "--train-subset", "128", "--val-subset", "64", "--test-subset", "64",
            "--device", "cpu", "--no-progress", "--profile", "demo", "--epochs", "1", "--attack-steps", "1"]
    assert main(["train-at", *tiny, "--method", "mart", "--beta", "3", "--out", str(tmp_path)]) == 0
    meta = read_checkpoint(tmp_path / "at.pt")["meta"]
    assert meta["at_method"] == "mart" and meta["at_beta"] == 3.0
    # Resuming or reusing it with another method or beta is refused, by name (the run engine's fingerprint).
    capsys.readouterr()
    assert main(["train-at", *tiny, "--method", "mart", "--beta", "6", "--out", str(tmp_path), "--resume"]) == 2
    assert "at_beta: 3.0 there, 6.0 now" in capsys.readouterr().err
    assert main(["train-at", *tiny, "--method", "trades", "--beta", "3", "--out", str(tmp_path), "--resume"]) == 2
    assert "at_method: 'mart' there, 'trades' now" in capsys.readouterr().err
    # Later steps read the method from the checkpoint; `riftlab rift` takes the same options.
    assert config_from_args(build_parser().parse_args(["mrc", "--out", str(tmp_path)]), meta).at_method == "mart"
    cfg = config_from_args(build_parser().parse_args(["rift", "--dataset", "synthetic-cifar10", "--method", "trades", "--beta", "2"]))
    assert (cfg.at_method, cfg.at_beta) == ("trades", 2.0)
    capsys.readouterr()
    assert main(["train-at", *tiny, "--method", "awp", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "riftlab train-at: error: --method must be one of pgd, trades, mart, got 'awp'"
