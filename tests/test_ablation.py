"""The ablations of Tables 3-4: fine-tuning several modules, the table of variants, its CLI and resume."""

import copy
import dataclasses

import pandas as pd
import pytest
import torch

from riftlab import (Batches, RiftConfig, adversarial_set, adversarial_train, evaluate, finetune_module,
                     module_robust_criticality, save_checkpoint, select_alpha, weight_modules)
from riftlab.engine.ablation import PAPER_VARIANTS, ablate
from riftlab.cli import main

from conftest import make_model

CFG = RiftConfig(dataset="synthetic-cifar10", ft_epochs=2, ft_lr=0.05, alphas=(0.0, 0.25, 0.5, 0.75, 1.0), threshold=0.5,
                 eval_steps=2, eval_restarts=1, progress=False).resolved()


@pytest.fixture(scope="module")
def setup(tiny_splits):
    """A quickly adversarially trained resnet18 (width 4), its MRC table (rows shuffled), and batches."""
    model = make_model(tiny_splits, width=4)
    train = Batches(tiny_splits.train.subset(512), 64, shuffle=True, augment=True, seed=0)
    adversarial_train(model, train, None, epochs=4, lr=0.05, attack_steps=1, step=8 / 255, milestones=[3])
    model.eval()
    adv = adversarial_set(model, Batches(tiny_splits.train.subset(64, seed=1), 64), 8 / 255, 2 / 255, 2)
    mrc = module_robust_criticality(model, adv, passes=1).sample(frac=1.0, random_state=0)  # ablate must sort it itself
    return {"model": model, "mrc": mrc, "train": Batches(tiny_splits.train.subset(256), 64, shuffle=True, augment=True, seed=0),
            "val": Batches(tiny_splits.val.subset(128), 128), "test": Batches(tiny_splits.test.subset(128), 128)}


@pytest.fixture(scope="module")
def table(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    frame = ablate(setup["model"], setup["mrc"], setup["train"], setup["val"], setup["test"], CFG, k=3, out_dir=out, log=lambda _: None)
    return frame, out


def test_finetuning_a_list_changes_exactly_those_weights(setup):
    model = setup["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["layer1.0.conv1", "layer3.1.conv2", "linear"]
    result = finetune_module(model, names, setup["train"], epochs=1, lr=0.05)
    after = result.model.state_dict()
    assert [k for k in after if not torch.equal(after[k], before[k])] == [f"{n}.weight" for n in names]  # BN statistics too
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input model is untouched
    assert result.modules == names and result.module == "layer1.0.conv1+layer3.1.conv2+linear"
    assert finetune_module(model, "linear", setup["train"], epochs=1).modules == ["linear"]
    with pytest.raises(ValueError, match="distinct names"):
        finetune_module(model, ["linear", "linear"], setup["train"], epochs=1)
    with pytest.raises(ValueError, match="distinct names"):
        finetune_module(model, [], setup["train"], epochs=1)
    with pytest.raises(ValueError, match="unknown module 'layer9.conv1'"):
        finetune_module(model, ["linear", "layer9.conv1"], setup["train"], epochs=1)


def test_every_variant_fine_tunes_the_right_modules_and_follows_the_rule(setup, table):
    frame, out = table
    assert list(frame.columns)[:9] == ["variant", "modules", "n_modules", "params", "alpha", "val_clean_acc", "val_robust_acc",
                                       "test_clean_acc", "test_robust_acc"]
    assert list(frame["variant"]) == list(PAPER_VARIANTS)
    rows = frame.set_index("variant")
    ranked = setup["mrc"].sort_values("mrc")["module"].tolist()
    names = [n for n, _ in weight_modules(setup["model"])]
    assert rows.loc["at", "modules"] == "" and rows.loc["at", "alpha"] == 0.0
    assert rows.loc["all", "modules"] == "+".join(names) and rows.loc["all", "n_modules"] == len(names) == 21
    assert rows.loc["last", "modules"] == "linear"
    assert rows.loc["most", "modules"] == ranked[-1]
    assert rows.loc["least", "modules"] == rows.loc["no-interp", "modules"] == ranked[0]
    assert rows.loc["topk", "modules"] == "+".join(ranked[:3])
    modules = dict(weight_modules(setup["model"]))
    threes = [
        n for n in ranked if isinstance(modules[n], torch.nn.Conv2d) and modules[n].kernel_size == (3, 3)]
    assert rows.loc["least3x3", "modules"] == threes[0] and rows.loc["least3x3", "params"] == modules[threes[0]].weight.numel()
    assert rows.loc["all", "params"] == sum(m.weight.numel() for m in modules.values())

    # Every change is measured against the AT row on the same images, with an interval around it.
    for split in ("val", "test"):
        for kind in ("clean", "robust"):
            change = frame[f"{split}_{kind}_acc"] - rows.loc["at", f"{split}_{kind}_acc"]
            assert (frame[f"{split}_{kind}_change"] - change).abs().max() < 1e-9
            assert ((frame[f"{split}_{kind}_ci_low"] <= frame[f"{split}_{kind}_change"] + 1e-12)
                    & (frame[f"{split}_{kind}_change"] <= frame[f"{split}_{kind}_ci_high"] + 1e-12)).all()
            n = len(setup["val"].labels) if split == "val" else len(setup["test"].labels)
            net = 100.0 * (frame[f"{split}_{kind}_gained"] - frame[f"{split}_{kind}_lost"]) / n
            assert (net - frame[f"{split}_{kind}_change"]).abs().max() < 1e-9
            assert rows.loc["at", [f"{split}_{kind}_change", f"{split}_{kind}_gained", f"{split}_{kind}_lost"]].tolist() == [0, 0, 0]
            # the AT model against itself: no image flips, and the interval still says what n images cannot rule out
            assert rows.loc["at", f"{split}_{kind}_ci_low"] == -rows.loc["at", f"{split}_{kind}_ci_high"] < 0

    at_val = (rows.loc["at", "val_clean_acc"], rows.loc["at", "val_robust_acc"])
    direct = evaluate(setup["model"], setup["val"], CFG.eps, CFG.step, CFG.eval_steps, CFG.val_restarts, seed=CFG.seed)
    assert at_val == (direct["clean_acc"], direct["robust_acc"])
    for variant in ("all", "last", "most", "topk", "least"):
        curve = pd.read_csv(out / "ablation" / variant / "interpolation.csv")
        assert list(curve["alpha"]) == list(CFG.alphas)
        assert tuple(curve.iloc[0][["clean_acc", "robust_acc"]]) == at_val  # alpha 0 is the AT model
        choice = select_alpha(curve, CFG.threshold)
        row = rows.loc[variant]
        assert row["alpha"] == choice["alpha"]
        assert (row["val_clean_acc"], row["val_robust_acc"]) == (choice["clean_acc"], choice["robust_acc"])
        assert row["val_clean_acc"] >= at_val[0] and row["val_robust_acc"] >= at_val[1] - CFG.threshold
        allowed = curve[curve["robust_acc"] >= at_val[1] - CFG.threshold]
        assert row["val_clean_acc"] == max(at_val[0], allowed["clean_acc"].max())
    # No interpolation: the fine-tuned model itself, i.e. the least variant's curve at alpha 1.
    least_curve = pd.read_csv(out / "ablation" / "least" / "interpolation.csv").set_index("alpha")
    assert rows.loc["no-interp", "alpha"] == 1.0
    assert rows.loc["no-interp", "val_clean_acc"] == least_curve.loc[1.0, "clean_acc"]
    assert rows.loc["no-interp", "val_robust_acc"] == least_curve.loc[1.0, "robust_acc"]
    if rows.loc["least", "alpha"] == 1.0:
        assert rows.loc["least", ["test_clean_acc", "test_robust_acc"]].tolist() == rows.loc["no-interp", ["test_clean_acc", "test_robust_acc"]].tolist()
    assert ((0 <= frame["test_robust_acc"]) & (frame["test_robust_acc"] <= frame["test_clean_acc"]) & (frame["test_clean_acc"] <= 100)).all()
    # The variants really differ: fine-tuning everything moves clean accuracy at alpha 1 somewhere.
    assert pd.read_csv(out / "ablation" / "all" / "interpolation.csv")["clean_acc"].nunique() > 1


def test_interrupted_ablation_resumes_to_the_same_table(setup, table, tmp_path):
    frame, _ = table
    args = (setup["model"], setup["mrc"], setup["train"], setup["val"], setup["test"], CFG)

    def interrupt_after_most(message):
        if message.startswith("most:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ablate(*args, out_dir=tmp_path, log=interrupt_after_most)
    work = tmp_path / "ablation"
    finished = {v: (work / v / "result.json").stat().st_mtime_ns for v in ("at", "all", "last", "most")}
    assert not (work / "topk").exists()
    ft_saved = (work / "finetune" / "most" / "ft.pt").stat().st_mtime_ns
    log = []
    resumed = ablate(*args, out_dir=tmp_path, log=log.append)
    pd.testing.assert_frame_equal(resumed, frame)
    assert {v: (work / v / "result.json").stat().st_mtime_ns for v in finished} == finished
    assert (work / "finetune" / "most" / "ft.pt").stat().st_mtime_ns == ft_saved  # not fine-tuned again
    reused = {m.split(":")[0] for m in log if "done earlier" in m}
    assert {"ablation/at", "ablation/all", "ablation/last", "ablation/most", "ablation/finetune/most"} <= reused
    assert "ablation/topk" not in reused
    # Saved work of other settings is refused by name, not mixed in.
    with pytest.raises(ValueError, match="ft_epochs: 2 there, 3 now"):
        ablate(*args[:-1], dataclasses.replace(CFG, ft_epochs=3), out_dir=tmp_path, log=log.append)
    # So is the work of another AT model (the weights' digest is in every fingerprint).
    other = copy.deepcopy(setup["model"])
    with torch.no_grad():
        other.linear.weight.mul_(1.01)
    with pytest.raises(ValueError, match="at_model"):
        ablate(other, *args[1:], out_dir=tmp_path, log=log.append)


def test_bad_variants_and_k_are_clear_errors(setup):
    args = (setup["model"], setup["mrc"], setup["train"], setup["val"], setup["test"], CFG)
    with pytest.raises(ValueError, match=r"unknown ablation variant 'first'; choices: at, all, last, most, topk, least, least3x3, no-interp"):
        ablate(*args, variants=["least", "first"])
    with pytest.raises(ValueError, match="k must be between 1 and the number of modules in the MRC table \\(21\\), got 0"):
        ablate(*args, variants=["topk"], k=0)
    with pytest.raises(ValueError, match="columns 'module' and 'mrc'"):
        ablate(setup["model"], setup["mrc"].rename(columns={"mrc": "score"}), *args[2:], variants=["least"])


def test_command_line_ablate_end_to_end_and_resume(setup, tmp_path, capsys):
    model = setup["model"]
    save_checkpoint(tmp_path / "at.pt", {"model_state": model.state_dict(), "meta": {**model.riftlab_config, "dataset": "synthetic-cifar10"}})
    setup["mrc"].to_csv(tmp_path / "mrc.csv", index=False)
    common = ["--out", str(tmp_path), "--profile", "demo", "--train-subset", "256", "--val-subset", "128", "--test-subset", "128",
              "--device", "cpu", "--no-progress", "--epochs", "1", "--alphas", "0,0.5,1", "--steps", "2", "--restarts", "1"]
    assert main(["ablate", *common, "--variants", "at,least,no-interp"]) == 0
    printed = capsys.readouterr().out
    first = pd.read_csv(tmp_path / "ablation.csv")
    assert list(first["variant"]) == ["at", "least", "no-interp"] and "no-interp" in printed and "ablation.csv" in printed
    assert first.loc[2, "alpha"] == 1.0 and first.loc[1, "modules"] == first.loc[2, "modules"] == setup["mrc"].sort_values("mrc")["module"].iloc[0]
    least_done = (tmp_path / "ablation" / "least" / "result.json").stat().st_mtime_ns

    # Another variant joins the finished ones: they are reused as they are, the new one runs.
    assert main(["ablate", *common, "--variants", "at,least,no-interp,last"]) == 0
    second = pd.read_csv(tmp_path / "ablation.csv")
    assert list(second["variant"]) == ["at", "least", "no-interp", "last"]
    pd.testing.assert_frame_equal(second.iloc[:3], first)
    assert (tmp_path / "ablation" / "least" / "result.json").stat().st_mtime_ns == least_done
    # Another setting under the same name is refused by name; under another --name it sits beside it.
    capsys.readouterr()
    assert main(["ablate", *common, "--variants", "least", "--lr", "0.01"]) == 2
    assert "ft_lr: 0.001 there, 0.01 now" in capsys.readouterr().err
    assert main(["ablate", *common, "--variants", "at,least", "--lr", "0.01", "--name", "lr0.01"]) == 0
    third = pd.read_csv(tmp_path / "lr0.01.csv")
    assert third.loc[0].equals(first.loc[0])  # the AT row: the same reference results, shared
    capsys.readouterr()
    assert main(["ablate", *common, "--variants", "least", "--name", "../elsewhere"]) == 2
    assert "--name must be a plain folder name" in capsys.readouterr().err

    capsys.readouterr()
    assert main(["ablate", *common, "--variants", "least,bogus"]) == 2
    assert "unknown ablation variant 'bogus'; choices: at, all" in capsys.readouterr().err
    (tmp_path / "mrc.csv").unlink()
    assert main(["ablate", *common]) == 2
    assert "mrc.csv not found; run `riftlab mrc` first" in capsys.readouterr().err
