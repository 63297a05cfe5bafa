"""The whole RiFT pipeline on a generated dataset, as `riftlab demo` runs it (5.3 minutes on the 2-core CPU
this project is built on, which runs the guide's width-16 yardstick 2.3 to 2.5x slower than its 1,500 images/s).

RiFT must win here: the selection picks an alpha > 0 with a clean-accuracy gain on validation and
robust accuracy within the threshold (alpha = 0 always satisfies the rule, so that alone proves nothing).
"""

import json

import pandas as pd
import pytest

from riftlab import PROFILES, RiftConfig, run_rift, select_alpha
from riftlab.checkpoint import read_checkpoint


@pytest.mark.slow
def test_demo_pipeline_selects_on_validation_and_reports_test(tmp_path):
    cfg = RiftConfig(**{**PROFILES["demo"], "progress": False})
    results = run_rift(cfg, tmp_path, log=lambda *_: None)

    # The choice is the selection rule applied to the validation curve.
    curve = pd.read_csv(tmp_path / "interpolation.csv")
    assert list(curve["alpha"]) == list(cfg.alphas)
    choice = select_alpha(curve, cfg.threshold)
    assert results["alpha"] == choice["alpha"]
    val = results["validation"]
    assert val["at"]["clean_acc"] == curve["clean_acc"].iloc[0] and val["at"]["robust_acc"] == curve["robust_acc"].iloc[0]
    clean_gain = val["rift"]["clean_acc"] - val["at"]["clean_acc"]
    robust_change = val["rift"]["robust_acc"] - val["at"]["robust_acc"]
    assert results["alpha"] > 0 and clean_gain > 0 and robust_change >= -cfg.threshold - 1e-9  # the rule's float tolerance

    # AT learned a robust model on this data (chance is 10%).
    assert results["test"]["at"]["robust_acc"] > 15

    # Test numbers are reported beside the validation ones, with the attack recorded.
    for key in ("at", "rift"):
        assert {"clean_acc", "robust_acc", "eps", "step", "steps", "restarts", "n"} <= set(results["test"][key])
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
    for name in ("at.pt", "ft.pt", "rift.pt", "finetune.csv", "at_history.csv", "config.json"):
        assert (tmp_path / name).is_file()
