"""The whole RiFT pipeline on a generated dataset, as `riftlab demo` runs it (5.3 minutes on the 2-core CPU
this project is built on, which runs the guide's width-16 yardstick 2.3 to 2.5x slower than its 1,500 images/s).

The assertions are the pipeline's invariants, which hold on any machine and torch build: the choice
is the rule applied to the validation curve, every reported difference is the difference of the
reported accuracies, its interval contains it, its counts of images gained and lost add up, and
the saved per-image results reproduce the numbers. Whether RiFT gains anything at this size is
not asserted: a win of a few images in 1000 depends on the seed, the CPU and the torch build. The
claim of a gain rests on the scale study's committed results (benchmarks/scale_study.py).
"""

import json

import pandas as pd
import pytest

from riftlab import PROFILES, RiftConfig, run_rift, select_alpha
from riftlab.checkpoint import read_checkpoint


@pytest.mark.slow
def test_demo_pipeline_selects_on_validation_and_reports_paired_differences(tmp_path):
    cfg = RiftConfig(**{**PROFILES["demo"], "progress": False})
    results = run_rift(cfg, tmp_path, log=lambda *_: None)

    # The choice is the selection rule applied to the validation curve.
    curve = pd.read_csv(tmp_path / "interpolation.csv")
    assert list(curve["alpha"]) == list(cfg.alphas)
    choice = select_alpha(curve, cfg.threshold)
    assert results["alpha"] == choice["alpha"]
    val = results["validation"]
    assert val["at"]["clean_acc"] == curve["clean_acc"].iloc[0] and val["at"]["robust_acc"] == curve["robust_acc"].iloc[0]
    chosen = curve.set_index("alpha").loc[results["alpha"]]
    assert (val["rift"]["clean_acc"], val["rift"]["robust_acc"]) == (chosen["clean_acc"], chosen["robust_acc"])
    assert val["rift"]["robust_acc"] >= val["at"]["robust_acc"] - cfg.threshold - 1e-9  # the rule's float tolerance
    assert val["rift"]["clean_acc"] >= val["at"]["clean_acc"]  # alpha 0 is kept when nothing gains
    base = curve.set_index("alpha").loc[0.0]
    assert [base[c] for c in ("clean_change", "robust_change")] == [0, 0]  # alpha 0 is the AT model itself
    assert base["clean_change_low"] == -base["clean_change_high"] < 0  # and its interval is what the images leave open
    for kind in ("clean", "robust"):
        d = val["difference"][kind]
        assert d["diff"] == pytest.approx(val["rift"][f"{kind}_acc"] - val["at"][f"{kind}_acc"], abs=1e-9)
        assert d["ci_low"] <= d["diff"] <= d["ci_high"] and d["n"] == 1000
        assert (curve[f"{kind}_change_low"] <= curve[f"{kind}_change"] + 1e-12).all()
        assert (curve[f"{kind}_change"] <= curve[f"{kind}_change_high"] + 1e-12).all()

    # Test: AT and AT+RiFT on the same images and random starts; the difference and its interval.
    test = results["test"]
    masks = read_checkpoint(tmp_path / "test_correct.pt")
    for kind in ("clean", "robust"):
        d = test["difference"][kind]
        assert d["diff"] == pytest.approx(test["rift"][f"{kind}_acc"] - test["at"][f"{kind}_acc"], abs=1e-9)
        assert d["diff"] == pytest.approx(100.0 * (d["gained"] - d["lost"]) / 1000, abs=1e-9)
        assert d["ci_low"] <= d["diff"] <= d["ci_high"]
        for key in ("at", "rift"):
            assert 100.0 * float(masks[key][kind].float().mean()) == pytest.approx(test[key][f"{kind}_acc"])
        if results["alpha"] == 0.0:  # the same model twice: not one image differs
            assert (d["gained"], d["lost"], d["diff"]) == (0, 0, 0.0)
            assert d["ci_low"] == pytest.approx(-d["ci_high"]) and 0 < d["ci_high"] < 1  # what 1000 images cannot rule out
    assert test["at"]["seed"] == test["rift"]["seed"] == cfg.seed + 1

    # AT learned a robust model on this data (chance is 10%).
    assert results["test"]["at"]["robust_acc"] > 15

    # Test numbers are reported beside the validation ones, with the attack recorded.
    for key in ("at", "rift"):
        assert {"clean_acc", "robust_acc", "eps", "step", "steps", "restarts", "seed", "n"} <= set(results["test"][key])
        assert results["test"][key]["n"] == 1000

    # The run directory holds everything, and the module fine-tuned is the least critical one.
    mrc = pd.read_csv(tmp_path / "mrc.csv")
    assert results["module"] == mrc["module"].iloc[0]
    assert mrc["mrc"].iloc[-1] > 3 * mrc["mrc"].iloc[0]
    # How far fine-tuning moved the module, from the saved AT and fine-tuned weights.
    at_w = read_checkpoint(tmp_path / "at.pt")["model_state"][f"{results['module']}.weight"]
    ft_w = read_checkpoint(tmp_path / "ft.pt")["model_state"][f"{results['module']}.weight"]
    assert results["finetune_relative_change"] == pytest.approx(float((ft_w - at_w).norm() / at_w.norm()), rel=1e-5)
    assert results["finetune_relative_change"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["alpha"] == results["alpha"] and saved["dataset"]["synthetic"] is True
    for name in ("at.pt", "ft.pt", "rift.pt", "finetune.csv", "at_history.csv", "riftlab.lock", "test_correct.pt"):
        assert (tmp_path / name).is_file()
