import pytest
import torch

from riftlab import Batches, adversarial_train
from riftlab.checkpoint import read_checkpoint

from conftest import make_model


def _run(splits, out, epochs, seed=0):
    model = make_model(splits, width=4)
    train = Batches(splits.train.subset(256), 64, shuffle=True, augment=True, seed=seed)
    val = Batches(splits.val.subset(128), 128)
    return adversarial_train(model, train, val, epochs=epochs, lr=0.05, milestones=[2], attack_steps=2, step=4 / 255,
                             eval_steps=2, seed=seed, out_dir=out)


def test_resumed_run_is_bit_identical_to_uninterrupted(tiny_splits, tmp_path):
    full = _run(tiny_splits, tmp_path / "full", epochs=3)
    _run(tiny_splits, tmp_path / "resumed", epochs=1)  # "crashes" after epoch 1
    resumed = _run(tiny_splits, tmp_path / "resumed", epochs=3)
    a = read_checkpoint(tmp_path / "full" / "last.pt")
    b = read_checkpoint(tmp_path / "resumed" / "last.pt")
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    assert full.history == resumed.history and full.best_epoch == resumed.best_epoch
    assert b["epoch"] == 2 and len(b["history"]) == 3


def test_best_validation_checkpoint_is_kept_and_loaded(tiny_splits, tmp_path):
    result = _run(tiny_splits, tmp_path, epochs=3)
    robust = [h["val_robust_acc"] for h in result.history]
    assert result.best_epoch == 1 + max(range(3), key=lambda i: (robust[i], -i))
    best = read_checkpoint(tmp_path / "best.pt")
    assert best["meta"]["epoch"] == result.best_epoch
    assert all(torch.equal(v, best["model_state"][k]) for k, v in result.model.state_dict().items())
    assert {"train_loss", "train_robust_acc", "val_clean_acc", "val_robust_acc", "lr"} <= set(result.history[0])
    assert [h["lr"] for h in result.history] == pytest.approx([0.05, 0.005, 0.005])


def test_adversarial_training_beats_chance_and_trades_clean_for_robust(at_model, standard_model, tiny_splits):
    from riftlab import evaluate

    test = Batches(tiny_splits.test, 250)
    at = evaluate(at_model, test, 8 / 255, 2 / 255, 10)
    std = evaluate(standard_model, test, 8 / 255, 2 / 255, 10)
    assert at["robust_acc"] > std["robust_acc"] + 5
    assert at["robust_acc"] > 15  # chance is 10%


def test_nan_loss_stops_with_a_clear_message(tiny_splits, tmp_path):
    model = make_model(tiny_splits, width=4)
    train = Batches(tiny_splits.train.subset(128), 64, shuffle=True, seed=0)
    with pytest.raises(FloatingPointError, match="epoch 1.*Lower the learning rate"):
        adversarial_train(model, train, None, epochs=2, lr=1e30, attack_steps=0, out_dir=tmp_path)
