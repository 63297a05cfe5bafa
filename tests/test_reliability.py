"""Runs that survive kills, checkpoints that cannot hurt, inputs that fail clearly."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from riftlab import (Batches, CheckpointError, RiftConfig, adversarial_set, build_model, evaluate, finetune_module,
                     interpolation_curve, load_checkpoint, module_robust_criticality, save_checkpoint)
from riftlab.checkpoint import read_checkpoint

from conftest import REPO, riftlab_command, riftlab_commands

# A tiny AT run as a subprocess: killed with SIGKILL mid-way, then resumed.
TRAIN_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from riftlab import Batches, adversarial_train, build_model, load_dataset
splits = load_dataset("synthetic-cifar10", synthetic_sizes=(700, 100), val_size=100)
torch.manual_seed(0)
model = build_model("resnet18", 10, 3, 32, 4)
train = Batches(splits.train, 50, shuffle=True, augment=True, seed=3)
val = Batches(splits.val, 100)
adversarial_train(model, train, val, epochs=int(sys.argv[2]), lr=0.05, milestones=[4], attack_steps=2, step=4 / 255,
                  eval_steps=2, seed=3, out_dir=sys.argv[1])
print("finished")
"""


def _train(out, epochs=6):
    return subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(out), str(epochs)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkilled_training_resumes_to_the_same_weights(tmp_path):
    full, victim = _train(tmp_path / "full"), _train(tmp_path / "killed")  # side by side: one thread each
    last = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 600
    while not last.is_file() or read_checkpoint(last)["epoch"] < 1:  # let it finish two epochs, then kill mid-epoch
        assert time.time() < deadline and victim.poll() is None
        time.sleep(0.2)
    time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = read_checkpoint(last)["epoch"]
    assert killed_at < 5, "the run finished before it could be killed; the test proves nothing"
    assert not list((tmp_path / "killed").glob("*.tmp"))  # atomic writes leave no debris
    assert full.wait(timeout=600) == 0, full.stderr.read()
    resumed = _train(tmp_path / "killed")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    a, b = read_checkpoint(tmp_path / "full" / "last.pt"), read_checkpoint(last)
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    assert a["history"] == b["history"]
    best_a, best_b = read_checkpoint(tmp_path / "full" / "best.pt"), read_checkpoint(tmp_path / "killed" / "best.pt")
    assert all(torch.equal(best_a["model_state"][k], best_b["model_state"][k]) for k in best_a["model_state"])


def test_finetuning_resumes_to_the_same_weights(at_model, tiny_splits, tmp_path):
    train = Batches(tiny_splits.train.subset(256), 64, shuffle=True, augment=True, seed=0)
    val = Batches(tiny_splits.val, 250)
    full = finetune_module(at_model, "layer2.1.conv2", train, val, epochs=3, lr=0.01, milestones=[2], out_dir=tmp_path / "a")
    finetune_module(at_model, "layer2.1.conv2", train, val, epochs=1, lr=0.01, milestones=[2], out_dir=tmp_path / "b")
    resumed = finetune_module(at_model, "layer2.1.conv2", train, val, epochs=3, lr=0.01, milestones=[2], out_dir=tmp_path / "b")
    assert full.history == resumed.history and full.best_epoch == resumed.best_epoch
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in full.model.state_dict().items())


def test_sweeps_resume_from_partial_progress(at_model, tiny_splits, tmp_path):
    adv = adversarial_set(at_model, Batches(tiny_splits.train.subset(128), 64), 8 / 255, 2 / 255, 3)
    mods = ["conv1", "layer1.0.conv1", "linear"]
    whole = module_robust_criticality(at_model, adv, passes=1, modules=mods)
    module_robust_criticality(at_model, adv, passes=1, modules=mods[:1], checkpoint_path=tmp_path / "m1.pt")
    # A progress file of another sweep (other modules) is refused, not mixed in.
    with pytest.raises(ValueError, match="other settings"):
        module_robust_criticality(at_model, adv, passes=1, modules=mods, checkpoint_path=tmp_path / "m1.pt")
    # Partial progress with the same settings: simulate a kill after one module.
    state = read_checkpoint(tmp_path / "m1.pt")
    full_settings = dict(state["settings"], modules=str(mods))
    save_checkpoint(tmp_path / "m2.pt", {"settings": full_settings, "state": state["state"]})
    resumed = module_robust_criticality(at_model, adv, passes=1, modules=mods, checkpoint_path=tmp_path / "m2.pt")
    assert resumed.equals(whole)

    val = Batches(tiny_splits.val, 125)
    theta = at_model.state_dict()
    other = {k: (v * 0.9 if v.is_floating_point() else v) for k, v in theta.items()}
    curve = interpolation_curve(at_model, theta, other, val, 8 / 255, 2 / 255, 2, alphas=(0.0, 0.5, 1.0))
    partial = interpolation_curve(at_model, theta, other, val, 8 / 255, 2 / 255, 2, alphas=(0.0, 0.5, 1.0),
                                  checkpoint_path=tmp_path / "i.pt")
    assert partial.equals(curve)
    saved = read_checkpoint(tmp_path / "i.pt")
    save_checkpoint(tmp_path / "i2.pt", {"settings": saved["settings"], "state": {"rows": saved["state"]["rows"][:1]}})
    assert interpolation_curve(at_model, theta, other, val, 8 / 255, 2 / 255, 2, alphas=(0.0, 0.5, 1.0),
                               checkpoint_path=tmp_path / "i2.pt").equals(curve)

    ev = evaluate(at_model, val, 8 / 255, 2 / 255, 3, restarts=2, seed=5)
    evaluate(at_model, val, 8 / 255, 2 / 255, 3, restarts=2, seed=5, checkpoint_path=tmp_path / "e.pt")
    saved = read_checkpoint(tmp_path / "e.pt")
    assert saved["state"]["batches"] == 2
    # Rewind to after batch 1 (counts and generator state as they were then) by re-running one batch.
    first = Batches(tiny_splits.val.subset(125, seed=0), 125)  # not the same data: only to check refusal below
    with pytest.raises(ValueError, match="other settings"):
        evaluate(at_model, first, 8 / 255, 2 / 255, 3, restarts=1, seed=5, checkpoint_path=tmp_path / "e.pt")
    assert evaluate(at_model, val, 8 / 255, 2 / 255, 3, restarts=2, seed=5, checkpoint_path=tmp_path / "e.pt") == ev


def test_evaluation_halves_batches_that_run_out_of_memory(at_model, tiny_splits):
    """On a GPU, a batch that does not fit is split; here a model raises CUDA's OOM error above 64 images."""

    class Picky(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.largest = 0

        def forward(self, x):
            if len(x) > 64:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            self.largest = max(self.largest, len(x))
            return self.inner(x)

    picky = Picky(at_model)
    ref = evaluate(at_model, Batches(tiny_splits.val, 50), 8 / 255, 2 / 255, 2)
    got = evaluate(picky, Batches(tiny_splits.val, 250), 8 / 255, 2 / 255, 2)
    assert got["clean_acc"] == ref["clean_acc"] and got["n"] == 250
    assert abs(got["robust_acc"] - ref["robust_acc"]) <= 2.0  # same attack, different random starts
    assert picky.largest <= 64


def test_checkpoint_metadata_mismatch_is_refused(tmp_path):
    model = build_model("resnet18", 10, 3, 32, 4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    save_checkpoint(tmp_path / "m.pt", {"model_state": model.state_dict(), "meta": {**model.riftlab_config, "seed": 3}})
    other_norm = build_model("resnet18", 10, 3, 32, 4)
    with pytest.raises(CheckpointError, match=r"normalisation mean=\[0.5, 0.5, 0.5\]"):
        load_checkpoint(other_norm, tmp_path / "m.pt")
    same = build_model("resnet18", 10, 3, 32, 4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert load_checkpoint(same, tmp_path / "m.pt")["seed"] == 3
    preact = build_model("preact_resnet18", 10, 3, 32, 4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    with pytest.raises(CheckpointError):
        load_checkpoint(preact, tmp_path / "m.pt")


def test_config_rejects_wrong_types_and_ranges():
    cases = [(dict(width="8"), "width must be int or None, got '8'"), (dict(eps=2.0), "eps must be in [0, 1]"),
             (dict(train_subset=0), "train_subset must be >= 1"), (dict(alphas=(0.5, 1.0)), "include 0"),
             (dict(alphas=(0.0, 1.5)), "alphas must lie in [0, 1]"), (dict(at_epochs=2.5), "at_epochs must be int"),
             (dict(synthetic_sizes=(0, 10)), "synthetic_sizes must be two image counts >= 1"), (dict(model="vgg"), "unknown model 'vgg'")]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as info:
            RiftConfig(dataset="synthetic-cifar10", **kwargs).resolved()
        assert message in str(info.value), (kwargs, str(info.value))


def test_run_directory_protects_finished_and_unfinished_work(tmp_path):
    out = tmp_path / "run"
    (out / "at").mkdir(parents=True)
    (out / "at" / "last.pt").write_bytes(b"")
    # The refusals come before the data loads: CIFAR10 files that do not exist are never asked for.
    no_data = ["--dataset", "cifar10", "--data-root", str(tmp_path / "no-data"), "--out", str(out)]
    rift, train = riftlab_commands(["rift", *no_data], ["train-at", *no_data])
    assert rift.returncode == 2 and "holds an unfinished run; pass --resume" in rift.stderr
    assert train.returncode == 2 and "pass --resume to continue it or --overwrite" in train.stderr
    (out / "config.json").write_text(json.dumps({"dataset": "synthetic-cifar100"}))
    proc = riftlab_command("rift", *no_data, "--resume")
    assert proc.returncode == 2 and "started with other settings" in proc.stderr and "dataset" in proc.stderr
    assert (out / "at" / "last.pt").is_file()  # nothing was removed


def test_empty_subset_and_bad_inputs_exit_cleanly(tmp_path):
    tiny = tmp_path / "tiny"
    (tiny / "tiny-imagenet-200").mkdir(parents=True)
    (tiny / "tiny-imagenet-200" / "wnids.txt").write_text("n01443537\n")
    cases = [
        (["train-at", "--dataset", "synthetic-cifar10", "--train-subset", "0"], "train_subset must be >= 1"),
        (["train-at", "--dataset", "tinyimagenet", "--data-root", str(tiny)], "val_annotations.txt"),
        (["train-at", "--dataset", "fashion-mnist", "--data-root", str(tmp_path / "empty")], "train-images-idx3-ubyte.gz"),
        (["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--dataset", "synthetic-cifar10"], "does not exist"),
        (["train-at", "--dataset", "synthetic-cifar10", "--step", "0"], "step must be in (0, 1]"),
        (["interpolate", "--out", str(tmp_path / "x"), "--threshold", "-1"], "not found"),
    ]
    for (args, message), proc in zip(cases, riftlab_commands(*([*args, "--out", str(tmp_path / "out")] for args, _ in cases))):
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "at.pt").exists()


def test_ctrl_c_stops_cleanly_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["train-at", "--dataset", "synthetic-cifar10", "--synthetic-sizes", "1500,500", "--val-size", "250",
            "--model", "resnet18", "--width", "4", "--train-subset", "300",
            "--val-subset", "100", "--test-subset", "100", "--epochs", "40", "--attack-steps", "1", "--batch-size", "50",
            "--device", "cpu", "--no-progress", "--out", str(out)]
    # A shell that starts pytest in the background makes it ignore SIGINT, and a Python started with
    # SIGINT ignored never raises KeyboardInterrupt: give the child the default disposition back.
    proc = subprocess.Popen([sys.executable, "-m", "riftlab", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    last = out / "at" / "last.pt"
    deadline = time.time() + 300
    while not last.is_file():
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    epochs_done = read_checkpoint(last)["epoch"]
    assert epochs_done < 39 and not (out / "at.pt").exists()  # stopped mid-run, nothing claims to be finished
    refused = riftlab_command(*args)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    shorter = [a if a != "40" else str(epochs_done + 3) for a in args]  # resume and finish a few epochs later
    resumed = riftlab_command(*shorter, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert read_checkpoint(last)["epoch"] == epochs_done + 2 and (out / "at.pt").is_file()
