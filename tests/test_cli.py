"""The `riftlab` command, in process (fast) and as a real subprocess (exit codes, no tracebacks)."""

import json

import pandas as pd
import pytest

from conftest import riftlab_command, riftlab_commands
from riftlab.checkpoint import read_checkpoint
from riftlab.cli import main

# A generated set of 2000 images (the default, 60000, takes ~10 s to generate in every command).
DATA = ["--synthetic-sizes", "1500,500", "--val-size", "250", "--train-subset", "256", "--val-subset", "128", "--test-subset", "128"]
TINY = ["--dataset", "synthetic-cifar10", "--model", "resnet18", "--width", "4", *DATA, "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def chained_run(tmp_path_factory):
    """train-at -> mrc -> finetune -> interpolate -> evaluate, each reading the previous step's files."""
    out = tmp_path_factory.mktemp("run")
    o = ["--out", str(out)]
    # Data settings are not stored in the checkpoints: every step repeats them.
    assert main(["train-at", *TINY, *o, "--epochs", "2", "--attack-steps", "1"]) == 0
    assert main(["mrc", *o, "--no-progress", "--examples", "128", "--passes", "1", *DATA]) == 0
    assert main(["finetune", *o, "--no-progress", "--epochs", "1", *DATA]) == 0
    assert main(["interpolate", *o, "--no-progress", *DATA]) == 0
    assert main(["evaluate", *o, "--checkpoint", str(out / "rift.pt"), "--no-progress", "--restarts", "1", "--steps", "3", *DATA]) == 0
    return out


def test_steps_chain_through_the_run_directory(chained_run):
    out = chained_run
    for name in ("at.pt", "at/last.pt", "at/best.pt", "at_history.csv", "mrc.csv", "ft.pt", "finetune.csv",
                 "interpolation.csv", "rift.pt", "alpha.json", "evaluate-rift-test.json"):
        assert (out / name).is_file(), name
    mrc = pd.read_csv(out / "mrc.csv")
    ft = read_checkpoint(out / "ft.pt")
    assert ft["meta"]["module"] == mrc["module"].iloc[0]  # fine-tuned the least critical module
    assert ft["meta"]["model"] == "resnet18" and ft["meta"]["width"] == 4 and ft["meta"]["dataset"] == "synthetic-cifar10"
    curve = pd.read_csv(out / "interpolation.csv")
    assert list(curve["alpha"]) == [round(0.1 * i, 1) for i in range(11)]
    alpha = json.loads((out / "alpha.json").read_text())
    assert read_checkpoint(out / "rift.pt")["meta"]["alpha"] == alpha["alpha"]
    result = json.loads((out / "evaluate-rift-test.json").read_text())
    assert result["steps"] == 3 and result["restarts"] == 1 and result["n"] == 128
    assert 0 <= result["robust_acc"] <= result["clean_acc"] <= 100


def test_finetune_unknown_module_is_a_clear_error(chained_run, capsys):
    code = main(["finetune", "--out", str(chained_run), "--module", "layer2.1.conv9", "--no-progress", "--epochs", "1", *DATA])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown module 'layer2.1.conv9'; valid modules: conv1, layer1.0.conv1" in err


def test_user_errors_exit_2_without_traceback(tmp_path):
    cases = [
        (["train-at", "--dataset", "imagenet-x", "--out", str(tmp_path)], "unknown dataset 'imagenet-x'; valid datasets:"),
        (["train-at", "--dataset", "synthetic-cifar10", "--model", "vgg", "--out", str(tmp_path)], "unknown model 'vgg'; valid models:"),
        (["mrc", "--out", str(tmp_path / "empty")], "at.pt not found; pass --checkpoint or run `riftlab train-at` first"),
        (["train-at", "--dataset", "cifar10", "--data-root", str(tmp_path / "nothing"), "--out", str(tmp_path)],
         "riftlab download cifar10"),
        (["train-at", "--dataset", "synthetic-cifar10", "--eps", "3", "--out", str(tmp_path)], "eps must be in [0, 1]"),
        (["train-at", "--dataset", "synthetic-cifar10", "--device", "cuda:7", "--out", str(tmp_path)], "cuda"),
        (["train-at", "--dataset", "synthetic-cifar10", "--synthetic-sizes", "2000", "--out", str(tmp_path)],
         "expected TRAIN,TEST image counts such as 2000,500"),
        (["train-at", "--dataset", "synthetic-cifar10", "--synthetic-sizes", "2000,500", "--out", str(tmp_path)],
         "val_size must be in [0, 2000)"),
    ]
    for (args, message), proc in zip(cases, riftlab_commands(*(args for args, _ in cases))):
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_rift_refuses_to_overwrite_a_finished_run(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    proc = riftlab_command("rift", "--dataset", "synthetic-cifar10", "--out", str(tmp_path))
    assert proc.returncode == 2 and "already holds a finished run" in proc.stderr and "--overwrite" in proc.stderr
    assert (tmp_path / "results.json").read_text() == "{}"


def test_list_and_version():
    proc, version = riftlab_commands(["list"], ["--version"])
    assert proc.returncode == 0 and "resnet18" in proc.stdout and "fashion-mnist" in proc.stdout
    assert version.stdout.startswith("riftlab ")


def test_same_seed_gives_identical_weights_from_the_command_line(tmp_path):
    """Every command seeds the model's initialisation from --seed (train-at once did not)."""
    import torch

    args = [*TINY, "--epochs", "1", "--attack-steps", "1", "--train-subset", "128", "--seed", "7"]
    assert main(["train-at", *args, "--out", str(tmp_path / "a")]) == 0
    assert main(["train-at", *args, "--out", str(tmp_path / "b")]) == 0
    a = read_checkpoint(tmp_path / "a" / "at.pt")["model_state"]
    b = read_checkpoint(tmp_path / "b" / "at.pt")["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)
