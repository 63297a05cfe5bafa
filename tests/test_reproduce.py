"""`riftlab reproduce --table 1`: the paper's protocol end to end, on tiny runs."""

import json

import numpy as np
import pandas as pd
import pytest

from riftlab.cli import main
from riftlab.evaluation.corruptions import CORRUPTIONS
from riftlab.paper import TABLE1
from riftlab.engine.reproduce import format_table1, reproduce_table1

from test_data import CIFAR_N_TEST, write_cifar10

TINY = dict(width=4, at_epochs=1, at_attack_steps=1, train_subset=256, val_subset=128, test_subset=128, synthetic_sizes=(600, 200),
            val_size=200, mrc_examples=64, mrc_passes=1, ft_epochs=1, eval_steps=2, eval_restarts=2, alphas=(0.0, 0.5, 1.0),
            progress=False)


def test_table1_row_from_synthetic_data_over_two_seeds(tmp_path):
    table = reproduce_table1("resnet18", "synthetic-cifar10", tmp_path, profile="demo", seeds=(0, 1), ood_examples=64,
                             severities=(1, 5), autoattack_examples=6, log=lambda *a: None, **TINY)
    assert list(table["method"]) == ["AT", "AT+RiFT"]  # the paper has no row for generated data
    per_seed = pd.read_csv(tmp_path / "table1-seeds.csv")
    assert sorted(per_seed["seed"].unique()) == [0, 1]
    for method, rows in per_seed.groupby("method"):
        row = table.set_index("method").loc[method]
        for metric in ("std", "ood", "adv"):
            assert row[metric] == pytest.approx(rows[metric].mean())
            assert row[f"{metric}_sd"] == pytest.approx(rows[metric].std(ddof=1))
    for seed in (0, 1):
        results = json.loads((tmp_path / f"seed-{seed}" / "results.json").read_text())
        at = per_seed[(per_seed["seed"] == seed) & (per_seed["method"] == "AT")].iloc[0]
        assert at["std"] == results["test"]["at"]["clean_acc"] and at["adv"] == results["test"]["at"]["robust_acc"]
        assert results["test"]["at"]["restarts"] == 2  # robust accuracy is the worst of the configured restarts
        ood = pd.read_csv(tmp_path / f"seed-{seed}" / "ood-rift.csv")
        assert list(ood["corruption"].unique()) == list(CORRUPTIONS) and sorted(ood["severity"].unique()) == [1, 5]
        assert at["ood"] == pytest.approx(pd.read_csv(tmp_path / f"seed-{seed}" / "ood-at.csv")["accuracy"].mean())
    # AutoAttack on the first 6 test images is never above PGD on the same images (AutoAttack is the stronger attack)
    assert (per_seed["aa"] <= per_seed["adv_aa_subset"] + 1e-9).all() and (per_seed["aa_examples"] == 6).all()
    # RiFT's gain over AT: the mean of the per-seed paired differences, with the Student-t interval over the two seeds.
    rift = table[table["source"].str.startswith("riftlab") & (table["method"] == "AT+RiFT")].iloc[0]
    seeds = per_seed[per_seed["method"] == "AT+RiFT"]
    for metric, kind in (("std", "clean"), ("adv", "robust")):
        assert rift[f"{metric}_gain"] == pytest.approx(seeds[f"{kind}_diff"].mean())
        assert rift[f"{metric}_gain_low"] <= rift[f"{metric}_gain"] <= rift[f"{metric}_gain_high"]
    for seed in (0, 1):
        results = json.loads((tmp_path / f"seed-{seed}" / "results.json").read_text())
        row = seeds[seeds["seed"] == seed].iloc[0]
        assert row["clean_diff"] == pytest.approx(results["test"]["difference"]["clean"]["diff"])
    assert rift["gain_interval"] == "Student-t over 2 seeds"
    text = format_table1(table)
    assert "AT+RiFT - AT: Std" in text and "Student-t over 2 seeds" in text
    assert "AutoAttack" in text
    assert "no ResNet18 row on synthetic-cifar10" in text and "on the fly" in text


def _write_cifar10_c(root, clean_root):
    """A CIFAR-10-C folder in the published layout whose severities are the clean test images, darkened."""
    import pickle

    with open(clean_root / "cifar-10-batches-py" / "test_batch", "rb") as fh:
        batch = pickle.load(fh, encoding="latin1")
    images = np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    folder = root / "CIFAR-10-C"
    folder.mkdir(parents=True)
    for name in CORRUPTIONS:
        np.save(folder / f"{name}.npy", np.concatenate([(images * (1 - 0.15 * s)).astype(np.uint8) for s in range(5)]))
    np.save(folder / "labels.npy", np.tile(np.asarray(batch["labels"], np.int64), 5))
    return root


def test_cli_reproduces_a_cifar10_row_beside_the_paper_from_real_format_files(tmp_path, capsys):
    write_cifar10(tmp_path / "cifar")
    c_dir = _write_cifar10_c(tmp_path / "c", tmp_path / "cifar")
    out = tmp_path / "out"
    args = ["reproduce", "--table", "1", "--model", "resnet18", "--dataset", "cifar10", "--profile", "demo", "--width", "4",
            "--at-epochs", "1", "--data-root", str(tmp_path / "cifar"), "--ood-dir", str(c_dir), "--device", "cpu",
            "--no-progress", "--out", str(out)]
    # the demo profile holds out 1000 validation images; the fixture has 100 training images
    assert main(args) == 2
    assert "val_size must be in [0, 100)" in capsys.readouterr().err
    assert not (out / "seed-0").exists()  # a bad setting writes nothing
    assert main([*args, "--val-size", "20"]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out / "table1.csv")
    paper = table[table["source"].str.startswith("paper")].set_index("method")
    for method in ("AT", "AT+RiFT"):
        assert tuple(paper.loc[method, ["std", "ood", "adv"]]) == TABLE1[("resnet18", method)]["cifar10"]
        assert f"{TABLE1[('resnet18', method)]['cifar10'][0]:13.2f}" in printed
    ours = table[table["source"].str.startswith("riftlab")].set_index("method")
    ood = pd.read_csv(out / "seed-0" / "ood-at.csv")
    assert len(ood) == 15 * 5 and ood["accuracy"].between(0, 100).all()
    assert ours.loc["AT", "ood"] == pytest.approx(ood["accuracy"].mean())
    summary = json.loads((out / "seed-0" / "ood.json").read_text())
    assert summary["source"] == "published" and summary["protocol"] == "standard-15"
    assert json.loads((out / "table1.json").read_text())["ood_source"] == "published"
    assert json.loads((out / "seed-0" / "results.json").read_text())["test"]["at"]["n"] == CIFAR_N_TEST
