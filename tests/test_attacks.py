import torch
import torch.nn.functional as F

from riftlab import Batches, evaluate, pgd

EPS, STEP = 8 / 255, 2 / 255


def _batch(splits, n=128):
    return splits.test.images[:n].float() / 255, splits.test.labels[:n]


def test_pgd_stays_in_ball_and_image_range(standard_model, tiny_splits):
    x, y = _batch(tiny_splits)
    x_adv = pgd(standard_model, x, y, EPS, STEP, 10)
    assert x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > EPS / 2  # it actually moved


def test_pgd_increases_loss_and_more_steps_never_weaken(standard_model, tiny_splits):
    x, y = _batch(tiny_splits, 256)
    losses, accs = [], []
    for steps in (0, 1, 3, 10, 30):
        x_adv = pgd(standard_model, x, y, EPS, STEP, steps, random_start=False)
        with torch.no_grad():
            logits = standard_model(x_adv)
        losses.append(F.cross_entropy(logits, y).item())
        accs.append((logits.argmax(1) == y).float().mean().item())
    assert losses[-1] > losses[0] + 1.0
    assert all(b <= a for a, b in zip(accs, accs[1:])), accs


def test_eps_zero_gives_clean_accuracy(standard_model, tiny_splits):
    data = Batches(tiny_splits.test, 250)
    result = evaluate(standard_model, data, eps=0.0, step=STEP, steps=10)
    assert result["robust_acc"] == result["clean_acc"]


def test_trained_model_robust_below_clean(standard_model, tiny_splits):
    result = evaluate(standard_model, Batches(tiny_splits.test, 250), EPS, STEP, 10)
    assert result["clean_acc"] > 40  # it learned something (chance is 10%)
    assert result["robust_acc"] < result["clean_acc"] - 20


def test_more_restarts_never_raise_robust_accuracy(at_model, tiny_splits):
    data = Batches(tiny_splits.test, 250)
    one = evaluate(at_model, data, EPS, STEP, 5, restarts=1)
    three = evaluate(at_model, data, EPS, STEP, 5, restarts=3)
    assert three["robust_acc"] <= one["robust_acc"]
    assert three["clean_acc"] == one["clean_acc"]
    assert three["restarts"] == 3 and three["steps"] == 5 and three["step"] == STEP


def test_attack_uses_eval_batchnorm_and_leaves_model_untouched(standard_model, tiny_splits):
    x, y = _batch(tiny_splits, 64)
    standard_model.zero_grad(set_to_none=True)
    standard_model.train()
    before = {k: v.clone() for k, v in standard_model.state_dict().items()}
    try:
        x_adv = pgd(standard_model, x, y, EPS, STEP, 3)
        assert standard_model.training  # mode restored
        for k, v in standard_model.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed during the attack"
        assert all(p.grad is None for p in standard_model.parameters())
    finally:
        standard_model.eval()
    # eval-mode BN makes each example's attack independent of its batch mates
    single = pgd(standard_model, x[:1], y[:1], EPS, STEP, 3, random_start=False)
    batched = pgd(standard_model, x, y, EPS, STEP, 3, random_start=False)
    assert torch.allclose(single, batched[:1], atol=1e-6)
    assert x_adv.requires_grad is False


def test_pgd_rejects_negative_budget(standard_model, tiny_splits):
    x, y = _batch(tiny_splits, 4)
    import pytest

    with pytest.raises(ValueError, match="non-negative"):
        pgd(standard_model, x, y, -0.1, STEP, 3)


def test_each_image_meets_the_same_random_starts_whatever_came_before(standard_model, tiny_splits):
    # PGD-0 with a wide ball: robustness is decided by the random start alone. Batch 1 is scored with
    # wrong labels the second time, so fewer of its images are attacked; batch 2 must not notice.
    x, y = tiny_splits.val.images.float()[:128] / 255, tiny_splits.val.labels[:128]
    first, second = (x[:64], y[:64]), (x[64:], y[64:])
    wrong = (first[0], (first[1] + 1) % 10)
    kw = dict(eps=0.3, step=0.0, steps=0, seed=3)

    def robust_count(batches):
        result = evaluate(standard_model, batches, **kw)
        return round(result["robust_acc"] * result["n"] / 100)

    second_after_right = robust_count([first, second]) - robust_count([first])
    second_after_wrong = robust_count([wrong, second]) - robust_count([wrong])
    assert robust_count([first]) != robust_count([wrong])  # batch 1 really was attacked differently
    assert second_after_right == second_after_wrong
    clean_second = round(evaluate(standard_model, [second], **kw)["clean_acc"] * 64 / 100)
    assert 0 < second_after_right < clean_second  # the random starts decide some images
