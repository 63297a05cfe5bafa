"""Runs that survive kills, checkpoints that cannot hurt, inputs that fail clearly."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from riftlab import (Batches, CheckpointError, RiftConfig, adversarial_set, build_model, evaluate, finetune_module,
                     interpolation_curve, load_checkpoint, module_robust_criticality, save_checkpoint)
from riftlab.checkpoint import read_checkpoint
from riftlab.engine.runner import FileState

from conftest import REPO, KillAfter, riftlab_command, riftlab_commands

# A tiny AT run of the command line, as a subprocess: killed with SIGKILL mid-way, then resumed.
TRAIN = ["train-at", "--dataset", "synthetic-cifar10", "--synthetic-sizes", "700,100", "--val-size", "100", "--width", "4",
         "--epochs", "6", "--milestones", "4", "--attack-steps", "2", "--attack-step", str(4 / 255), "--eval-steps", "2",
         "--batch-size", "50", "--lr", "0.05", "--seed", "3", "--device", "cpu", "--no-progress"]


def _train(out, *extra):
    return subprocess.Popen([sys.executable, "-m", "riftlab", *TRAIN, "--out", str(out), *extra], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkilled_training_resumes_to_the_same_weights(tmp_path):
    full, victim = _train(tmp_path / "full"), _train(tmp_path / "killed")  # side by side: one thread each
    progress = tmp_path / "killed" / "progress" / "at.pt"
    deadline = time.time() + 600
    while not progress.is_file() or read_checkpoint(progress)["progress"]["next_epoch"] < 2:  # two epochs done, then kill mid-epoch
        assert time.time() < deadline and victim.poll() is None, victim.stderr.read() if victim.poll() is not None else "timeout"
        time.sleep(0.2)
    time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = read_checkpoint(progress)["progress"]["next_epoch"]
    assert killed_at < 6 and not (tmp_path / "killed" / "at.pt").exists(), "the run finished before it could be killed"
    assert not list((tmp_path / "killed").rglob("*.tmp"))  # atomic writes leave no debris
    assert full.wait(timeout=600) == 0, full.stderr.read()
    refused = _train(tmp_path / "killed")
    assert refused.wait(timeout=120) == 2 and "unfinished stage at" in refused.stderr.read()
    resumed = _train(tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    a, b = read_checkpoint(tmp_path / "full" / "at.pt"), read_checkpoint(tmp_path / "killed" / "at.pt")
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    assert (tmp_path / "full" / "at_history.csv").read_text() == (tmp_path / "killed" / "at_history.csv").read_text()
    assert not progress.exists()  # a finished stage's progress is cleared


def test_finetuning_resumes_to_the_same_weights(at_model, tiny_splits, tmp_path):
    train = Batches(tiny_splits.train.subset(256), 64, shuffle=True, augment=True, seed=0)
    val = Batches(tiny_splits.val, 250)
    full = finetune_module(at_model, "layer2.1.conv2", train, val, epochs=3, lr=0.01, milestones=[2])
    progress = FileState(tmp_path / "ft.pt")
    finetune_module(at_model, "layer2.1.conv2", train, val, epochs=1, lr=0.01, milestones=[2], state=progress)
    resumed = finetune_module(at_model, "layer2.1.conv2", train, val, epochs=3, lr=0.01, milestones=[2], state=progress)
    assert full.history == resumed.history and full.best_epoch == resumed.best_epoch
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in full.model.state_dict().items())
    assert [h["lr"] for h in full.history] == pytest.approx([0.01, 0.01, 0.01, 0.001])  # epoch 0 (the start), then as trained


def test_sweeps_resume_from_partial_progress(at_model, tiny_splits, tmp_path):
    adv = adversarial_set(at_model, Batches(tiny_splits.train.subset(128), 64), 8 / 255, 2 / 255, 3)
    mods = ["conv1", "layer1.0.conv1", "linear"]
    whole = module_robust_criticality(at_model, adv, passes=1, modules=mods)
    killed = KillAfter(1)  # after the first module
    with pytest.raises(KeyboardInterrupt):
        module_robust_criticality(at_model, adv, passes=1, modules=mods, state=killed)
    assert len(killed.load()["rows"]) == 1
    assert module_robust_criticality(at_model, adv, passes=1, modules=mods, state=killed).equals(whole)

    val = Batches(tiny_splits.val, 125)
    theta = at_model.state_dict()
    other = {k: (v * 0.9 if v.is_floating_point() else v) for k, v in theta.items()}
    curve = interpolation_curve(at_model, theta, other, val, 8 / 255, 2 / 255, 2, alphas=(0.0, 0.5, 1.0))
    killed = KillAfter(1)
    with pytest.raises(KeyboardInterrupt):
        interpolation_curve(at_model, theta, other, val, 8 / 255, 2 / 255, 2, alphas=(0.0, 0.5, 1.0), state=killed)
    assert len(killed.load()["rows"]) == 1
    assert interpolation_curve(at_model, theta, other, val, 8 / 255, 2 / 255, 2, alphas=(0.0, 0.5, 1.0), state=killed).equals(curve)


def test_evaluation_resumes_from_a_genuinely_partial_file(at_model, tiny_splits, tmp_path):
    """Killed after batch 1 of 3 (counts, per-image results and the attack's generator as they were then): the resumed
    evaluation equals the uninterrupted one, random starts included."""
    val = Batches(tiny_splits.val, 84)  # 250 images: batches of 84, 84, 82
    whole = evaluate(at_model, val, 8 / 255, 2 / 255, 3, restarts=2, seed=5, per_image=True)

    class KillAfterFirstBatch(FileState):
        def save(self, progress):
            super().save(progress)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(at_model, val, 8 / 255, 2 / 255, 3, restarts=2, seed=5, per_image=True, state=KillAfterFirstBatch(tmp_path / "e.pt"))
    saved = FileState(tmp_path / "e.pt").load()
    assert saved["batches"] == 1 and saved["total"] == 84 and len(saved["robust_masks"]) == 1
    resumed = evaluate(at_model, val, 8 / 255, 2 / 255, 3, restarts=2, seed=5, per_image=True, state=FileState(tmp_path / "e.pt"))
    assert {k: v for k, v in resumed.items() if not k.endswith("_correct")} == {k: v for k, v in whole.items() if not k.endswith("_correct")}
    assert torch.equal(resumed["robust_correct"], whole["robust_correct"]) and torch.equal(resumed["clean_correct"], whole["clean_correct"])
    # Progress saved with settings that differ is refused by name, never mixed in.
    guarded = FileState(tmp_path / "g.pt", settings={"seed": 5, "steps": 3})
    guarded.save({"batches": 1})
    with pytest.raises(ValueError, match="steps=3, not steps=4"):
        FileState(tmp_path / "g.pt", settings={"seed": 5, "steps": 4}).load()


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
    cases = [(dict(width="8"), "width must be an integer >= 1 (first-stage channels or widen factor), got '8'"),
             (dict(eps=2.0), "eps must be a number in [0, 1]"),
             (dict(train_subset=0), "train_subset must be an integer >= 1"), (dict(alphas=(0.5, 1.0)), "include 0"),
             (dict(alphas=(0.0, 1.5)), "alphas must be numbers that lie in [0, 1]"), (dict(at_epochs=2.5), "at_epochs must be an integer"),
             (dict(synthetic_sizes=(0, 10)), "synthetic_sizes must be two image counts >= 1"), (dict(model="vgg"), "model must be one of")]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as info:
            RiftConfig(dataset="synthetic-cifar10", **kwargs).resolved()
        assert message in str(info.value), (kwargs, str(info.value))


def test_run_directory_protects_finished_and_unfinished_work(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # An unfinished AT stage, as a killed `riftlab rift --dataset cifar10 ...` leaves it.
    from riftlab.cli import build_parser, config_from_args
    from riftlab.engine.pipeline import RiftRun

    no_data = ["--dataset", "cifar10", "--data-root", str(tmp_path / "no-data"), "--out", str(out)]
    stage = RiftRun(config_from_args(build_parser().parse_args(["rift", *no_data])), out).at_stage()
    record = {"status": "started", "started": "earlier", "params": stage.params, "inputs": {}}
    (out / "riftlab.lock").write_text(json.dumps({"riftlab_lock": 1, "stages": {"at": record}}))
    (out / "progress").mkdir()
    (out / "progress" / "at.pt").write_bytes(b"progress")
    # The refusals come before the data loads: CIFAR10 files that do not exist are never asked for.
    rift, train, other = riftlab_commands(["rift", *no_data], ["train-at", *no_data], ["rift", *no_data, "--at-epochs", "20", "--resume"])
    assert rift.returncode == 2 and "holds an unfinished stage at" in rift.stderr and "pass --resume" in rift.stderr
    assert train.returncode == 2 and "pass --resume to continue it or --overwrite" in train.stderr
    assert other.returncode == 2 and "cannot reuse stage at" in other.stderr and "at_epochs: 110 there, 20 now" in other.stderr
    assert (out / "progress" / "at.pt").read_bytes() == b"progress"  # nothing was removed
    # A file the stage would write, with no record of who wrote it, is refused too.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "at.pt").write_bytes(b"someone else's")
    proc = riftlab_command("rift", "--dataset", "cifar10", "--data-root", str(tmp_path / "no-data"), "--out", str(foreign))
    assert proc.returncode == 2 and "has no record of the stage at" in proc.stderr and "--overwrite" in proc.stderr
    assert (foreign / "at.pt").read_bytes() == b"someone else's"


def test_empty_subset_and_bad_inputs_exit_cleanly(tmp_path):
    tiny = tmp_path / "tiny"
    (tiny / "tiny-imagenet-200").mkdir(parents=True)
    (tiny / "tiny-imagenet-200" / "wnids.txt").write_text("n01443537\n")
    cases = [
        (["train-at", "--dataset", "synthetic-cifar10", "--train-subset", "0"], "--train-subset must be an integer >= 1, got 0"),
        (["train-at", "--dataset", "tinyimagenet", "--data-root", str(tiny)], "val_annotations.txt"),
        (["train-at", "--dataset", "fashion-mnist", "--data-root", str(tmp_path / "empty")], "train-images-idx3-ubyte.gz"),
        (["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--dataset", "synthetic-cifar10"], "does not exist"),
        (["train-at", "--dataset", "synthetic-cifar10", "--step", "0"], "--step must be a number in (0, 1] (pixel units), got 0.0"),
        (["interpolate", "--out", str(tmp_path / "x"), "--threshold", "-1"], "--threshold must be a finite number >= 0"),
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
            "--val-subset", "100", "--test-subset", "100", "--epochs", "8", "--attack-steps", "1", "--batch-size", "50",
            "--device", "cpu", "--no-progress", "--out", str(out)]
    # A shell that starts pytest in the background makes it ignore SIGINT, and a Python started with
    # SIGINT ignored never raises KeyboardInterrupt: give the child the default disposition back.
    proc = subprocess.Popen([sys.executable, "-m", "riftlab", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    progress = out / "progress" / "at.pt"
    deadline = time.time() + 300
    while not progress.is_file():
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    epochs_done = read_checkpoint(progress)["progress"]["next_epoch"]
    assert epochs_done < 8 and not (out / "at.pt").exists()  # stopped mid-run, nothing claims to be finished
    refused = riftlab_command(*args)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    longer = [a if a != "8" else "9" for a in args]  # another schedule is another run: refused by name
    mixed = riftlab_command(*longer, "--resume")
    assert mixed.returncode == 2 and "at_epochs: 8 there, 9 now" in mixed.stderr
    resumed = riftlab_command(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "at.pt").is_file() and len(pd.read_csv(out / "at_history.csv")) == 8
