"""The reference code's fine-tuning protocol and its controls: settings, reflect-padded crops, BatchNorm
recalibration alone (every weight bit-identical), and a run that reports what choosing on test would give."""

import json

import pandas as pd
import pytest
import torch

from riftlab import Batches, RiftConfig, finetune_module, weight_modules
from riftlab.checkpoint import read_checkpoint
from riftlab.cli import build_parser, config_from_args
from riftlab.data import augment_batch
from riftlab.engine.ablation import ablate, variant_modules
from riftlab.engine.config import PROFILES, SettingError, protocol_settings
from riftlab.engine.pipeline import AtSource, RiftRun, finetune_batches, training_batches
from riftlab.engine.runner import StageMismatch
from riftlab.steps.interpolation import DEFAULT_ALPHAS

from conftest import make_model


def _cfg(*argv: str) -> RiftConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_the_reference_protocol_sets_what_the_reference_code_does_and_riftlabs_stays_the_default():
    ref = _cfg("rift", "--profile", "study", "--protocol", "reference")
    assert (ref.ft_protocol, ref.update_bn_stats, ref.alphas, ref.report_test_selection) == ("reference", True, DEFAULT_ALPHAS, True)
    assert (ref.ft_epochs, ref.ft_lr, ref.batch_size) == (10, 0.001, 128)  # the paper's schedule, as the reference code's
    quiet = _cfg("ablate", "--profile", "study", "--protocol", "reference", "--no-report-test-selection")  # the protocol, no test report
    assert (quiet.ft_protocol, quiet.update_bn_stats, quiet.report_test_selection) == ("reference", True, False)
    default = _cfg("rift", "--profile", "study")
    assert (default.ft_protocol, default.update_bn_stats, default.report_test_selection) == ("riftlab", False, False)
    assert default.alphas == PROFILES["study"]["alphas"] and not default.bn_recalibration_only
    with pytest.raises(SettingError, match=r"alphas must be \(0\.0, 0\.1, .*\) with ft_protocol 'reference', got \(0\.0, 0\.5, 1\.0\)"):
        _cfg("rift", "--profile", "study", "--protocol", "reference", "--alphas", "0,0.5,1")  # no longer the reference's
    with pytest.raises(SettingError, match="bn_recalibration_only .*frozen BatchNorm"):
        _cfg("finetune", "--bn-recalibration-only")
    control = _cfg("ablate", "--protocol", "reference", "--bn-recalibration-only", "--module", "layer2.1.conv2")
    assert control.bn_recalibration_only and control.update_bn_stats and control.ft_module == "layer2.1.conv2"
    assert _cfg("finetune", "--update-bn-stats", "--bn-recalibration-only").ft_protocol == "riftlab"
    assert _cfg("rift", "--report-test-selection", "--ft-lr", "0").ft_lr == 0.0  # a rate of 0 stays allowed


def test_reference_crops_mirror_the_border_where_riftlabs_pad_with_zeros(tiny_splits):
    x = 0.5 + 0.5 * torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # no pixel is 0
    zeros = augment_batch(x, 4, torch.Generator().manual_seed(1), "zeros")
    mirrored = augment_batch(x, 4, torch.Generator().manual_seed(1), "reflect")
    inside = zeros != 0
    assert (~inside).any() and (mirrored != 0).all()  # zero padding shows; mirrored padding repeats image pixels
    assert torch.equal(zeros[inside], mirrored[inside])  # the same crops and flips: only the padding differs
    cfg = RiftConfig(dataset="synthetic-cifar10", **protocol_settings("reference")).resolved()
    ft, at = finetune_batches(cfg, tiny_splits, "cpu"), training_batches(cfg, tiny_splits, "cpu")
    assert ft.crop_mode == "reflect" and at.crop_mode == "zeros"
    assert torch.equal(ft.images, at.images) and torch.equal(next(iter(ft))[1], next(iter(at))[1])  # AT's images, AT's order
    assert finetune_batches(RiftConfig(dataset="synthetic-cifar10").resolved(), tiny_splits, "cpu").crop_mode == "zeros"
    with pytest.raises(ValueError, match="crop_mode must be one of zeros, reflect"):
        Batches(tiny_splits.val, 64, crop_mode="edge")


def test_batchnorm_recalibration_alone_leaves_every_weight_bit_identical(tiny_splits):
    at_model = make_model(tiny_splits, width=4).eval()  # any network with BatchNorm will do: what matters is what moves
    train = Batches(tiny_splits.train.subset(256), 64, shuffle=True, augment=True, seed=0, crop_mode="reflect")
    val = Batches(tiny_splits.val, 250)
    before = {k: v.clone() for k, v in at_model.state_dict().items()}
    alone = finetune_module(at_model, "layer2.1.conv2", train, val, epochs=2, lr=0.01, update_bn_stats=True, train_weights=False,
                            keep_epochs=True)
    for name, p in alone.model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed"  # every weight and BatchNorm affine parameter, bit for bit
    after = alone.model.state_dict()
    moved = [k for k in after if k.endswith(("running_mean", "running_var")) and not torch.equal(after[k], before[k])]
    assert "bn1.running_mean" in moved and "layer4.1.bn2.running_var" in moved  # only the statistics moved, everywhere
    assert len(alone.history) == 3 and alone.history[1]["train_loss"] > 0  # epoch 0 (the start) and two passes
    assert len(alone.epoch_states) == 2 and not any(k.endswith("weight") for k in alone.epoch_states[0])
    kept = alone.epoch_states[alone.best_epoch - 1]
    assert all(torch.equal(kept[k], after[k]) for k in kept)  # the kept epoch is the one the model returned holds
    # The reference protocol trains the weight too, on the same schedule: the one weight and the statistics move.
    ref = finetune_module(at_model, "layer2.1.conv2", train, val, epochs=2, lr=0.01, update_bn_stats=True, keep_epochs=True)
    params = dict(ref.model.named_parameters())
    assert [n for n in params if not torch.equal(params[n], before[n])] == ["layer2.1.conv2.weight"]
    assert "layer2.1.conv2.weight" in ref.epoch_states[0]
    assert all(torch.equal(v, before[k]) for k, v in at_model.state_dict().items())  # the AT model is untouched
    with pytest.raises(ValueError, match="would change nothing"):
        finetune_module(at_model, "layer2.1.conv2", train, epochs=1, train_weights=False)


def test_a_reference_run_reports_the_test_selected_result_beside_the_validation_one(tmp_path):
    base = dict(dataset="synthetic-cifar10", width=4, synthetic_sizes=(500, 100), val_size=100, test_subset=100, batch_size=64,
                eval_batch_size=100, at_epochs=1, at_attack_steps=1, ft_epochs=1, eval_steps=1, eval_restarts=1, progress=False,
                device="cpu", ft_module="layer2.1.conv2")
    quiet = lambda *a, **k: None  # noqa: E731
    run = tmp_path / "reference"
    results = RiftRun(RiftConfig(**base, **protocol_settings("reference")), run, log=quiet).run("test")["results"]
    chosen = results["test_selected"]
    assert results["config"]["ft_protocol"] == "reference" and results["finetune_best_epoch"] == chosen["epoch"] == 1
    assert chosen == json.loads((run / "test_selection.json").read_text()) and chosen["alphas"] == list(DEFAULT_ALPHAS)
    assert chosen["alpha"] in DEFAULT_ALPHAS and chosen["clean_gain"] >= 0  # alpha 0, the AT model, is always a candidate
    assert {"mean", "p95", "p_value"} <= set(chosen["null"]) and chosen["null"]["permutations"] == 200
    assert list(pd.read_csv(run / "interpolation.csv")["alpha"]) == list(DEFAULT_ALPHAS)  # validation on the 0.1 grid too
    # The test curve of the kept epoch is the test stage's own attack: at the alpha validation chose, the same images fall.
    curve, test = read_checkpoint(run / "test_selection_correct.pt"), read_checkpoint(run / "test_correct.pt")
    at_alpha = curve["alphas"].index(results["alpha"])
    for kind in ("clean", "robust"):
        assert torch.equal(curve[kind][0], test["at"][kind]) and torch.equal(curve[kind][at_alpha], test["rift"][kind])
    kept = read_checkpoint(run / "ft_epochs.pt")["epochs"]
    assert len(kept) == 1 and "layer2.1.conv2.weight" in kept[0] and "bn1.running_mean" in kept[0]
    # Another protocol on the same run directory is refused, naming the setting.
    with pytest.raises(StageMismatch, match=r"stage finetune .*ft_protocol: 'reference' there"):
        RiftRun(RiftConfig(**base), run, resume=True, log=quiet).check()
    # BatchNorm recalibration alone through the engine, from the same AT model: every parameter is AT's.
    alone = tmp_path / "bn-only"
    control = RiftConfig(**base, **protocol_settings("reference"), bn_recalibration_only=True)
    RiftRun(control, alone, at=AtSource("checkpoint", str(run / "at.pt")), log=quiet).run("finetune")
    at_state, ft_state = read_checkpoint(run / "at.pt")["model_state"], read_checkpoint(alone / "ft.pt")["model_state"]
    model = make_model_for(base)
    for name, _ in model.named_parameters():
        assert torch.equal(ft_state[name], at_state[name]), f"{name} changed"
    assert not torch.equal(ft_state["bn1.running_mean"], at_state["bn1.running_mean"])
    with pytest.raises(ValueError, match="imported fine-tuned model"):
        RiftRun(RiftConfig(**base, **protocol_settings("reference")), tmp_path / "imported", at=AtSource("checkpoint", str(run / "at.pt")),
                ft_from=str(run / "ft.pt"), log=quiet).check()


def make_model_for(base: dict) -> torch.nn.Module:
    from riftlab import build_model, dataset_info

    info = dataset_info(base["dataset"])
    return build_model("resnet18", info.num_classes, info.channels, info.image_size, base["width"], info.mean, info.std)


def test_the_papers_module_is_an_ablation_variant_and_the_reference_protocol_needs_its_crops(tiny_splits):
    model = make_model(tiny_splits, width=4).eval()
    names = [n for n, _ in weight_modules(model)]
    mrc = pd.DataFrame({"module": names, "mrc": [float(i) for i in range(len(names))]})
    assert variant_modules(model, mrc, "module", module="layer2.1.conv2") == ["layer2.1.conv2"]
    with pytest.raises(ValueError, match="'module' variant fine-tunes the module --module names"):
        variant_modules(model, mrc, "module")
    with pytest.raises(ValueError, match="unknown module 'layer2.1.conv9'"):
        variant_modules(model, mrc, "module", module="layer2.1.conv9")
    cfg = RiftConfig(dataset="synthetic-cifar10", ft_module="layer2.1.conv2", **protocol_settings("reference"))
    zero_padded = Batches(tiny_splits.train.subset(64), 64, shuffle=True, augment=True)
    evaluation = Batches(tiny_splits.val.subset(64), 64)
    with pytest.raises(ValueError, match="reflect-padded crops"):
        ablate(model, mrc, zero_padded, evaluation, evaluation, cfg, ["module"])
