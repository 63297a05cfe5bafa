import pytest
import torch

from riftlab import Batches, MemoryState, adversarial_train
from riftlab.engine.runner import FileState

from conftest import make_model


def _run(splits, epochs, seed=0, eval_every=1, state=None):
    model = make_model(splits, width=4)
    train = Batches(splits.train.subset(256), 64, shuffle=True, augment=True, seed=seed)
    val = Batches(splits.val.subset(128), 128)
    return adversarial_train(model, train, val, epochs=epochs, lr=0.05, milestones=[2], attack_steps=2, step=4 / 255,
                             eval_steps=2, eval_every=eval_every, seed=seed, state=state)


def test_resumed_run_is_bit_identical_to_uninterrupted(tiny_splits, tmp_path):
    full = _run(tiny_splits, epochs=3)
    progress = FileState(tmp_path / "at.pt")  # what the run engine hands the step
    _run(tiny_splits, epochs=1, state=progress)  # "crashes" after epoch 1
    resumed = _run(tiny_splits, epochs=3, state=progress)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.history == resumed.history and full.best_epoch == resumed.best_epoch
    saved = progress.load()
    assert saved["next_epoch"] == 3 and len(saved["history"]) == 3
    # Piecewise in memory: the same run again, epoch by epoch.
    memory = MemoryState()
    for epochs in (1, 2, 3):
        piecewise = _run(tiny_splits, epochs=epochs, state=memory)
    assert all(torch.equal(a[k], piecewise.model.state_dict()[k]) for k in a) and memory.saves == 3


def test_best_validation_checkpoint_is_kept_and_loaded(tiny_splits):
    state = MemoryState()
    result = _run(tiny_splits, epochs=3, state=state)
    robust = [h["val_robust_acc"] for h in result.history]
    assert result.best_epoch == 1 + max(range(3), key=lambda i: (robust[i], -i))
    saved = state.load()
    assert saved["best_epoch"] == result.best_epoch
    assert all(torch.equal(v, saved["best_state"][k]) for k, v in result.model.state_dict().items())
    assert {"train_loss", "train_robust_acc", "val_clean_acc", "val_robust_acc", "lr"} <= set(result.history[0])
    # The lr of each epoch is the one it trained with: 0.05 in epoch 1 and 2, x0.1 after the milestone at epoch 2.
    assert [h["lr"] for h in result.history] == pytest.approx([0.05, 0.05, 0.005])


def test_validating_every_second_epoch_picks_the_best_of_those(tiny_splits):
    every = _run(tiny_splits, epochs=3)
    state = MemoryState()
    sparse = _run(tiny_splits, epochs=3, eval_every=2, state=state)
    # Validation does not touch the training: the same weights, epoch after epoch.
    assert [h["train_loss"] for h in sparse.history] == [h["train_loss"] for h in every.history]
    assert ["val_robust_acc" in h for h in sparse.history] == [False, True, True]  # epoch 2, and the last
    assert [h["val_robust_acc"] for h in sparse.history[1:]] == [h["val_robust_acc"] for h in every.history[1:]]
    assert sparse.best_epoch == 2 + max(range(2), key=lambda i: (sparse.history[1 + i]["val_robust_acc"], -i))
    assert state.load()["best_epoch"] == sparse.best_epoch


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
    assert list(history["lr"]) == pytest.approx([0.1, 0.01, 0.001])  # the lr each epoch trained with (drops after epochs 1 and 2)
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
        adversarial_train(model, train, None, epochs=2, lr=1e30, attack_steps=0, state=FileState(tmp_path / "at.pt"))


def test_learning_rate_warm_up_ramps_then_follows_the_milestones(tiny_splits):
    """warmup_epochs (the throughput profile's large batch): lr * (e + 1) / w in the first w epochs, then the milestones'
    drops; the schedule's state survives a resume, and the setting is checked like the others."""
    from riftlab import PROFILES, RiftConfig
    from riftlab.engine.rules import SettingError

    def run(epochs, state=None):
        model = make_model(tiny_splits, width=4)
        train = Batches(tiny_splits.train.subset(64), 64, shuffle=True, seed=0)
        return adversarial_train(model, train, None, epochs=epochs, lr=0.4, milestones=[3], attack_steps=0, warmup_epochs=2, state=state)

    full = run(4)
    assert [h["lr"] for h in full.history] == pytest.approx([0.2, 0.4, 0.4, 0.04])
    state = MemoryState()
    run(3, state)  # stops after epoch 3; the resumed run takes over its schedule
    assert [h["lr"] for h in run(4, state).history] == pytest.approx([0.2, 0.4, 0.4, 0.04])
    with pytest.raises(ValueError, match=r"warmup_epochs must be in \[0, epochs\) = \[0, 4\), got 4"):
        adversarial_train(make_model(tiny_splits), Batches(tiny_splits.train.subset(64), 64), None, epochs=4, warmup_epochs=4)
    with pytest.raises(SettingError, match="at_warmup_epochs"):
        RiftConfig(at_epochs=5, at_warmup_epochs=5).resolved()
    throughput = RiftConfig(**PROFILES["throughput"]).resolved()
    assert (throughput.batch_size, throughput.at_lr, throughput.at_warmup_epochs, throughput.cuda_graphs) == (512, 0.4, 5, True)
