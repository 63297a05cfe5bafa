import pandas as pd
import pytest
import torch

from riftlab import Batches, interpolate, interpolation_curve, select_alpha


def _states():
    torch.manual_seed(0)
    a = {"w": torch.randn(3, 4), "bn.num_batches_tracked": torch.tensor(5)}
    b = {"w": torch.randn(3, 4), "bn.num_batches_tracked": torch.tensor(9)}
    return a, b


def test_endpoints_are_exact_and_midpoint_is_the_mean():
    a, b = _states()
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    assert torch.allclose(interpolate(a, b, 0.5)["w"], (a["w"] + b["w"]) / 2)
    assert torch.allclose(interpolate(a, b, 0.3)["w"], 0.7 * a["w"] + 0.3 * b["w"])
    assert interpolate(a, b, 0.5)["bn.num_batches_tracked"] == 5  # integer buffers come from the AT model


def test_interpolate_validates_input():
    a, b = _states()
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        interpolate(a, b, 1.5)
    with pytest.raises(ValueError, match="differ"):
        interpolate(a, {"w": b["w"]}, 0.5)


def test_curve_endpoints_equal_the_two_models(at_model, tiny_splits):
    from riftlab import evaluate, finetune_module

    val = Batches(tiny_splits.val, 250)
    ft = finetune_module(at_model, "linear", Batches(tiny_splits.train.subset(256), 64, shuffle=True, seed=0), epochs=1, lr=0.05).model
    before = {k: v.clone() for k, v in at_model.state_dict().items()}
    curve = interpolation_curve(at_model, at_model.state_dict(), ft.state_dict(), val, 8 / 255, 2 / 255, 3, alphas=(0.0, 0.5, 1.0))
    assert list(curve["alpha"]) == [0.0, 0.5, 1.0]
    at = evaluate(at_model, val, 8 / 255, 2 / 255, 3, seed=0)
    ftr = evaluate(ft, val, 8 / 255, 2 / 255, 3, seed=0)
    assert curve["clean_acc"].iloc[0] == at["clean_acc"] and curve["robust_acc"].iloc[0] == at["robust_acc"]
    assert curve["clean_acc"].iloc[-1] == ftr["clean_acc"] and curve["robust_acc"].iloc[-1] == ftr["robust_acc"]
    assert all(torch.equal(v, before[k]) for k, v in at_model.state_dict().items())  # model restored


def _curve(rows):
    return pd.DataFrame(rows, columns=["alpha", "clean_acc", "robust_acc"])


def test_select_alpha_takes_largest_clean_gain_within_threshold():
    curve = _curve([(0.0, 80.0, 50.0), (0.3, 81.0, 50.0), (0.6, 82.0, 49.95), (0.8, 83.5, 49.8), (1.0, 85.0, 45.0)])
    choice = select_alpha(curve, threshold=0.1)
    assert choice["alpha"] == 0.6 and choice["clean_gain"] == pytest.approx(2.0)
    assert choice["robust_change"] == pytest.approx(-0.05)
    assert select_alpha(curve, threshold=0.2)["alpha"] == 0.8
    assert select_alpha(curve, threshold=10)["alpha"] == 1.0
    assert select_alpha(curve, threshold=0.0)["alpha"] == 0.3


def test_select_alpha_falls_back_to_the_at_model():
    curve = _curve([(0.0, 80.0, 50.0), (0.5, 79.0, 50.0), (1.0, 90.0, 40.0)])
    assert select_alpha(curve)["alpha"] == 0.0
    assert select_alpha(curve)["clean_gain"] == 0.0
    with pytest.raises(ValueError, match="alpha = 0"):
        select_alpha(_curve([(0.5, 80.0, 50.0)]))
