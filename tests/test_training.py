import pytest
import torch

from riftlab import Batches, adversarial_train
from riftlab.checkpoint import read_checkpoint

from conftest import make_model


def _run(splits, out, epochs, seed=0, eval_every=1):
    model = make_model(splits, width=4)
    train = Batches(splits.train.subset(256), 64, shuffle=True, augment=True, seed=seed)
    val = Batches(splits.val.subset(128), 128)
    return adversarial_train(model, train, val, epochs=epochs, lr=0.05, milestones=[2], attack_steps=2, step=4 / 255,
                             eval_steps=2, eval_every=eval_every, seed=seed, out_dir=out)


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


def test_validating_every_second_epoch_picks_the_best_of_those(tiny_splits, tmp_path):
    every = _run(tiny_splits, tmp_path / "every", epochs=3)
    sparse = _run(tiny_splits, tmp_path / "sparse", epochs=3, eval_every=2)
    # Validation does not touch the training: the same weights, epoch after epoch.
    assert [h["train_loss"] for h in sparse.history] == [h["train_loss"] for h in every.history]
    assert ["val_robust_acc" in h for h in sparse.history] == [False, True, True]  # epoch 2, and the last
    assert [h["val_robust_acc"] for h in sparse.history[1:]] == [h["val_robust_acc"] for h in every.history[1:]]
    assert sparse.best_epoch == 2 + max(range(2), key=lambda i: (sparse.history[1 + i]["val_robust_acc"], -i))
    assert read_checkpoint(tmp_path / "sparse" / "best.pt")["meta"]["epoch"] == sparse.best_epoch


def test_lr_milestones_from_the_config_and_the_command_line(tmp_path):
    from riftlab import RiftConfig
    from riftlab.cli import main

    assert RiftConfig(at_epochs=20).at_schedule() == [18, 19]  # the paper's 100 and 105 of 110, scaled
    assert RiftConfig(at_epochs=20, at_milestones=(15, 18)).resolved().at_schedule() == [15, 18]
    for bad in ((18, 15), (0,), (20,)):
        with pytest.raises(ValueError, match=r"at_milestones must be increasing epochs in \[1, at_epochs\)"):
            RiftConfig(at_epochs=20, at_milestones=bad).resolved()
    out = tmp_path / "run"
    assert main(["train-at", "--dataset", "synthetic-cifar10", "--synthetic-sizes", "1500,500", "--val-size", "250",
                 "--width", "4", "--train-subset", "128", "--val-subset", "64",
                 "--test-subset", "64", "--epochs", "3", "--milestones", "1,2", "--attack-steps", "1", "--eval-every", "2",
                 "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    import pandas as pd

    history = pd.read_csv(out / "at_history.csv")
    assert list(history["lr"]) == pytest.approx([0.01, 0.001, 0.001])  # lr after each epoch's scheduler step
    assert list(history["val_robust_acc"].isna()) == [True, False, False]


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
