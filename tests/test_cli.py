"""The `riftlab` command, in process (fast) and as a real subprocess (exit codes, no tracebacks)."""

import json

import pandas as pd
import pytest
import torch

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
    for name in ("at.pt", "at_history.csv", "mrc.csv", "ft.pt", "finetune.csv", "interpolation.csv", "rift.pt", "alpha.json",
                 "evaluate-rift-test.json", "riftlab.lock"):
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
    lock = json.loads((out / "riftlab.lock").read_text())["stages"]
    assert [lock[s]["status"] for s in ("at", "mrc", "finetune", "interpolate")] == ["done"] * 4
    assert lock["finetune"]["params"]["module"] == mrc["module"].iloc[0] and lock["finetune"]["inputs"]["mrc"] == lock["mrc"]["fingerprint"]


def test_finetune_unknown_module_is_a_clear_error(chained_run, capsys):
    code = main(["finetune", "--out", str(chained_run), "--module", "layer2.1.conv9", "--no-progress", "--epochs", "1", *DATA])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown module 'layer2.1.conv9'; valid modules: conv1, layer1.0.conv1" in err


# What `rift` needs to reuse the chained run's stages: the same settings as train-at, mrc and finetune used.
RIFT = ["rift", *TINY, "--at-epochs", "2", "--at-attack-steps", "1", "--mrc-examples", "128", "--mrc-passes", "1", "--ft-epochs", "1"]


def test_finetune_then_rift_goes_on_from_the_step_commands(chained_run, capsys):
    """`riftlab finetune` then `riftlab rift --resume` once failed with a KeyError on best_epoch."""
    out = chained_run
    lock = json.loads((out / "riftlab.lock").read_text())["stages"]
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("at.pt", "mrc.csv", "ft.pt")}
    capsys.readouterr()
    assert main([*RIFT, "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    for stage in ("at", "mrc", "finetune", "interpolate"):
        assert f"{stage}: done earlier, reusing it" in printed
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps  # reused, not redone
    results = json.loads((out / "results.json").read_text())
    assert results["finetune_best_epoch"] == lock["finetune"]["summary"]["best_epoch"] == read_checkpoint(out / "ft.pt")["meta"]["best_epoch"]
    assert results["module"] == lock["finetune"]["params"]["module"]


def test_evaluate_reproduces_the_runs_test_numbers_exactly(chained_run):
    """`riftlab evaluate rift.pt` once drew other random starts than the run's test evaluation (another seed convention)."""
    out = chained_run
    results = json.loads((out / "results.json").read_text())
    assert main(["evaluate", *TINY, "--checkpoint", str(out / "rift.pt"), "--out", str(out / "again")]) == 0
    again = json.loads((out / "again" / "evaluate-rift-test.json").read_text())
    for key in ("clean_acc", "robust_acc", "seed", "n", "steps", "restarts"):
        assert again[key] == results["test"]["rift"][key], key


def test_finetune_resumed_with_another_module_is_refused_by_name(tmp_path, capsys):
    """`finetune --module A`, then `finetune --module B --resume` once continued A's run and labelled it B."""
    out = ["--out", str(tmp_path)]
    assert main(["train-at", *TINY, *out, "--epochs", "1", "--attack-steps", "1"]) == 0
    ft = ["finetune", *out, "--no-progress", "--epochs", "1", *DATA]
    assert main([*ft, "--module", "layer1.0.conv1"]) == 0
    before = (tmp_path / "ft.pt").read_bytes()
    capsys.readouterr()
    assert main([*ft, "--module", "layer2.0.conv1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot reuse stage finetune" in err and "module: 'layer1.0.conv1' there, 'layer2.0.conv1' now" in err
    assert (tmp_path / "ft.pt").read_bytes() == before and read_checkpoint(tmp_path / "ft.pt")["meta"]["module"] == "layer1.0.conv1"
    assert main([*ft, "--module", "layer2.0.conv1", "--overwrite"]) == 0  # asked for: redone, and labelled by what it holds
    state = read_checkpoint(tmp_path / "ft.pt")
    at = read_checkpoint(tmp_path / "at.pt")["model_state"]
    changed = [k for k, v in state["model_state"].items() if not torch.equal(v, at[k])]
    assert state["meta"]["module"] == "layer2.0.conv1" and changed == ["layer2.0.conv1.weight"]


def test_user_errors_exit_2_without_traceback(tmp_path):
    cases = [
        (["train-at", "--dataset", "imagenet-x", "--out", str(tmp_path)], "--dataset must be one of cifar10, cifar100, fashion-mnist"),
        (["train-at", "--dataset", "synthetic-cifar10", "--model", "vgg", "--out", str(tmp_path)], "--model must be one of preact_resnet18, resnet18"),
        (["mrc", "--out", str(tmp_path / "empty")], "at.pt not found; pass --checkpoint or run `riftlab train-at` first"),
        (["train-at", "--dataset", "cifar10", "--data-root", str(tmp_path / "nothing"), "--out", str(tmp_path)],
         "riftlab download cifar10"),
        (["train-at", "--dataset", "synthetic-cifar10", "--eps", "3", "--out", str(tmp_path)], "--eps must be a number in [0, 1]"),
        (["train-at", "--dataset", "synthetic-cifar10", "--device", "cuda:7", "--out", str(tmp_path)], "cuda"),
        (["train-at", "--dataset", "synthetic-cifar10", "--synthetic-sizes", "2000", "--out", str(tmp_path)],
         "expected TRAIN,TEST image counts such as 2000,500"),
        (["train-at", "--dataset", "synthetic-cifar10", "--synthetic-sizes", "2000,500", "--out", str(tmp_path)],
         "--val-size must be in [1, 2000)"),
    ]
    for (args, message), proc in zip(cases, riftlab_commands(*(args for args, _ in cases))):
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_rift_refuses_results_it_has_no_record_of(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    proc = riftlab_command("rift", "--dataset", "synthetic-cifar10", "--out", str(tmp_path))
    assert proc.returncode == 2 and "no riftlab.lock records" in proc.stderr and "--overwrite" in proc.stderr
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
