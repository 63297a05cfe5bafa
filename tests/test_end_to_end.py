"""The whole RiFT pipeline on a generated dataset, as `riftlab demo` runs it (about 2 minutes on CPU)."""

import json

import pandas as pd
import pytest

from riftlab import PROFILES, RiftConfig, run_rift


@pytest.mark.slow
def test_demo_pipeline_wins_clean_accuracy_within_the_robustness_threshold(tmp_path):
    cfg = RiftConfig(**{**PROFILES["demo"], "progress": False})
    results = run_rift(cfg, tmp_path, log=lambda *_: None)

    # The selection happened on validation and picked a real interpolation, not the AT model.
    val = results["validation"]
    assert results["alpha"] > 0
    clean_gain = val["rift"]["clean_acc"] - val["at"]["clean_acc"]
    robust_change = val["rift"]["robust_acc"] - val["at"]["robust_acc"]
    assert clean_gain >= 0.5, f"validation clean gain {clean_gain:.2f} points"
    assert robust_change >= -cfg.threshold, f"validation robust change {robust_change:.2f} points"

    # AT shows the trade-off on this data: robust accuracy far above chance, clean well below 90%.
    at_test = results["test"]["at"]
    assert at_test["robust_acc"] > 20 and at_test["clean_acc"] < 85

    # Test numbers are reported beside the validation ones, with the attack recorded.
    for key in ("at", "rift"):
        assert {"clean_acc", "robust_acc", "eps", "step", "steps", "restarts", "n"} <= set(results["test"][key])
    assert results["test"]["rift"]["n"] == 1000

    # The run directory holds everything, and the module fine-tuned is the least critical one.
    mrc = pd.read_csv(tmp_path / "mrc.csv")
    assert results["module"] == mrc["module"].iloc[0]
    assert mrc["mrc"].iloc[-1] > 3 * mrc["mrc"].iloc[0]
    curve = pd.read_csv(tmp_path / "interpolation.csv")
    assert len(curve) == 11
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["alpha"] == results["alpha"] and saved["dataset"]["synthetic"] is True
    for name in ("at.pt", "ft.pt", "rift.pt", "finetune.csv", "at_history.csv"):
        assert (tmp_path / name).is_file()
