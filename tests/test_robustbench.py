"""RobustBench models as starting points, loaded through robustbench.utils.load_model from a local file.

Sehwag2021Proxy_R18 is a ResNet-18 (CIFAR-10, Linf; the smallest architecture in the zoo, with the
paper's module names). Its weights cannot be downloaded here, so a randomly initialised state dict is
saved where RobustBench looks for it (model_dir/cifar10/Linf/<name>.pt) in the format it reads
(``{"state_dict": ...}``); load_model then reads that file and downloads nothing.
"""

import importlib.util
import json

import pytest
import torch

from riftlab import Batches, adversarial_set, finetune_module, load_dataset, module_robust_criticality, weight_modules
from riftlab.checkpoint import read_checkpoint
from riftlab.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("robustbench") is None,
                                reason="robustbench not installed (pip install 'riftlab[robustbench]')")

NAME = "Sehwag2021Proxy_R18"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from riftlab.zoo import build_robustbench_model, robustbench_model_path

    folder = tmp_path_factory.mktemp("robustbench-models")
    torch.manual_seed(0)
    path = robustbench_model_path(NAME, "cifar10", "Linf", folder)
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": build_robustbench_model(NAME).state_dict()}, path)
    return folder


@pytest.fixture(scope="module")
def splits():
    return load_dataset("synthetic-cifar10", synthetic_sizes=(64, 32), val_size=16)


def test_load_reads_the_local_file(model_dir):
    from riftlab.zoo import load_robustbench_model, robustbench_model_path

    model = load_robustbench_model(NAME, "cifar10", "Linf", model_dir)
    saved = torch.load(robustbench_model_path(NAME, "cifar10", "Linf", model_dir))["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())  # the file's weights, not a fresh init
    assert not model.training
    assert model.riftlab_config == {"model": f"robustbench:{NAME}", "robustbench": NAME, "threat_model": "Linf",
                                    "robustbench_dataset": "cifar10"}
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert "layer2.1.conv2" in dict(weight_modules(model))


def test_mrc_and_finetune_on_robustbench_module_names(model_dir, splits):
    from riftlab.zoo import load_robustbench_model

    model = load_robustbench_model(NAME, "cifar10", "Linf", model_dir)
    adv = adversarial_set(model, Batches(splits.train.subset(8), 8), 8 / 255, 2 / 255, steps=1)
    table = module_robust_criticality(model, adv, passes=1, modules=["layer2.1.conv2", "layer4.1.conv1"])
    assert sorted(table["module"]) == ["layer2.1.conv2", "layer4.1.conv1"] and table["mrc"].notna().all()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ft = finetune_module(model, "layer2.1.conv2", Batches(splits.train.subset(16), 8, shuffle=True), None, epochs=1, lr=0.01)
    after = ft.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["layer2.1.conv2.weight"]  # only that weight moved; BatchNorm statistics stay the AT model's


def test_cli_finetune_from_robustbench_then_interpolate_and_evaluate(model_dir, tmp_path, capsys):
    small = ["--dataset", "synthetic-cifar10", "--profile", "demo", "--train-subset", "16", "--val-subset", "8", "--test-subset", "8",
             "--batch-size", "8", "--device", "cpu", "--no-progress", "--out", str(tmp_path)]
    assert main(["finetune", *small, "--robustbench", NAME, "--model-dir", str(model_dir), "--module", "layer2.1.conv2", "--epochs", "1"]) == 0
    meta = read_checkpoint(tmp_path / "ft.pt")["meta"]
    assert meta["robustbench"] == NAME and meta["threat_model"] == "Linf" and meta["module"] == "layer2.1.conv2"
    # The run's `at` stage holds RobustBench's weights as they were read (at.pt), recorded as coming from there.
    assert read_checkpoint(tmp_path / "at.pt")["meta"]["source"].startswith(f"RobustBench {NAME}")
    # interpolate rebuilds the architecture from ft.pt's metadata and takes the AT weights from the run's at.pt
    # (eps 0 keeps the 11-point curve cheap: only the loading paths are under test here).
    assert main(["interpolate", *small, "--eps", "0"]) == 0
    assert read_checkpoint(tmp_path / "rift.pt")["meta"]["robustbench"] == NAME
    assert main(["evaluate", *small, "--checkpoint", str(tmp_path / "rift.pt"), "--steps", "1", "--restarts", "1"]) == 0
    result = json.loads((tmp_path / "evaluate-rift-test.json").read_text())
    assert result["n"] == 8 and 0 <= result["robust_acc"] <= result["clean_acc"]
    capsys.readouterr()


def test_robustbench_errors_are_one_line_user_errors(model_dir, tmp_path, capsys):
    base = ["--dataset", "synthetic-cifar10", "--profile", "demo", "--device", "cpu", "--no-progress", "--out", str(tmp_path),
            "--model-dir", str(model_dir)]
    assert main(["evaluate", *base, "--robustbench", "NoSuchModel2099"]) == 2
    assert "unknown RobustBench model 'NoSuchModel2099' for cifar10 / Linf; valid names:" in capsys.readouterr().err
    assert main(["evaluate", *base[:-2]]) == 2
    assert "pass --checkpoint PATH, or --robustbench NAME" in capsys.readouterr().err
    assert main(["mrc", *base, "--robustbench", NAME, "--dataset", "synthetic-tinyimagenet"]) == 2
    assert "RobustBench has no models for dataset 'synthetic-tinyimagenet'" in capsys.readouterr().err


def test_missing_robustbench_says_what_to_install(monkeypatch, tmp_path, capsys):
    import riftlab.zoo as zoo

    real = zoo.importlib.util.find_spec
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda name, *a: None if name == "robustbench" else real(name, *a))
    with pytest.raises(zoo.MissingDependencyError, match=r"pip install 'riftlab\[robustbench\]'"):
        zoo.build_robustbench_model(NAME)
    assert main(["mrc", "--robustbench", NAME, "--profile", "demo", "--out", str(tmp_path)]) == 2
    assert "riftlab[robustbench]" in capsys.readouterr().err


@pytest.mark.slow
def test_colab_path_chapter_7_from_a_robustbench_file_under_papermill(tmp_path):
    """What a Colab session does: chapter 7's template starts from a RobustBench model (here a file of random weights in
    RobustBench's layout, since nothing can be downloaded) and keeps its run under run_root (Google Drive there), where a
    second execution resumes instead of starting over."""
    papermill = pytest.importorskip("papermill")
    from riftlab.zoo import build_robustbench_model, robustbench_model_path

    name = "Addepalli2022Efficient_RN18"  # the template's default on a GPU with CIFAR-10
    models = tmp_path / "models"
    path = robustbench_model_path(name, "cifar10", "Linf", models)
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"state_dict": build_robustbench_model(name).state_dict()}, path)
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    params = dict(profile="chapter7", dataset="synthetic-cifar10", robustbench=name, model_dir=str(models), run_root=str(tmp_path / "drive"),
                  results_dir=str(tmp_path / "results"), train_subset=32, val_subset=16, test_subset=16, mrc_examples=16)
    for attempt in ("first", "again"):
        papermill.execute_notebook(str(root / "notebooks" / "06_rift_end_to_end.ipynb"), str(tmp_path / f"{attempt}.ipynb"),
                                   parameters=params, cwd=str(root / "notebooks"), kernel_name="python3", progress_bar=False)
    run = tmp_path / "drive" / "synthetic-cifar10-chapter7"
    lock = json.loads((run / "riftlab.lock").read_text())["stages"]
    assert lock["at"]["params"]["source"] == "robustbench" and lock["at"]["params"]["robustbench"] == name
    assert all(lock[s]["status"] == "done" for s in ("at", "mrc", "finetune", "interpolate", "test"))
    summary = json.loads((tmp_path / "results" / "synthetic-cifar10-chapter7.json").read_text())
    assert summary["difference"]["test"]["clean"]["ci_low"] <= summary["difference"]["test"]["clean"]["diff"]
    again = json.loads((tmp_path / "again.ipynb").read_text())
    printed = "".join("".join(o.get("text", "")) for c in again["cells"] for o in c.get("outputs", []))
    assert "interpolate: done earlier, reusing it" in printed  # the second session resumed from the run on "Drive"
