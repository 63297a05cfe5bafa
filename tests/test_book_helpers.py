"""The book's helpers (riftlab.book): configuration, glue, and load-or-compute caching of every step.

Tiny synthetic configurations keep these to seconds on a CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import riftlab
from riftlab import PROFILES, RiftConfig, book, interpolate, interpolation_curve, Batches

TINY = dict(dataset="synthetic-cifar10", synthetic_sizes=(400, 100), val_size=100, train_subset=160, val_subset=60, test_subset=60,
            width=4, batch_size=32, eval_batch_size=64, at_epochs=2, at_attack_steps=1, at_attack_step=4 / 255, eval_steps=2,
            mrc_examples=32, mrc_passes=1, ft_epochs=2, ft_lr=0.01, alphas=(0.0, 0.5, 1.0))


def tiny_config(**overrides) -> RiftConfig:
    return book.chapter_config("book", **{**TINY, **overrides})


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Artifacts of one tiny run, computed once for the module (the AT model, MRC, one fine-tuning)."""
    folder = tmp_path_factory.mktemp("artifacts")
    # book.setup changes process-wide settings: restore them for the other test modules
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RIFTLAB_ARTIFACTS", str(folder))
            cfg = tiny_config()
            device = book.setup(cfg.seed, "cpu")
            assert torch.get_num_threads() == 1
            splits = book.load_data(cfg)
            models = book.trained_models(cfg, splits, device, train_eval_size=40)
            yield {"cfg": cfg, "device": device, "splits": splits, "models": models, "dir": folder}
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("RIFTLAB_ARTIFACTS", str(tmp_path))
    return tmp_path


def _forbid(monkeypatch, name):
    """Make ``name``, as riftlab.book's cached steps (riftlab.book.chapters) call it, fail if called: a cached result must
    not recompute."""
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} was called although its result is cached")
    monkeypatch.setattr(book.chapters, name, fail)


# ----------------------------------------------------------------------------------------------
# configuration


def test_book_profile_is_the_offline_fashion_mnist_profile():
    cfg = book.chapter_config("book")
    assert cfg.dataset == "fashion-mnist" and cfg.width == PROFILES["book"]["width"]
    assert cfg.progress is False
    assert cfg.eps == pytest.approx(riftlab.dataset_info("fashion-mnist").eps)
    assert 0 < cfg.at_attack_step <= cfg.eps  # the training attack's step fits the dataset's ball
    assert cfg.train_subset and cfg.val_subset and cfg.test_subset  # small subsets, not the full sets


def test_chapter_config_none_keeps_the_profile_and_values_win():
    cfg = book.chapter_config("book", dataset=None, width=None, at_epochs=2, seed=3, model_name="preact_resnet18")
    assert cfg.dataset == PROFILES["book"]["dataset"] and cfg.width == PROFILES["book"]["width"]
    assert (cfg.at_epochs, cfg.seed, cfg.model) == (2, 3, "preact_resnet18")


def test_chapter_config_paper_profile_is_the_default_recipe():
    cfg = book.chapter_config("paper", dataset="cifar10", download=True, width=None, train_subset=None)
    default = RiftConfig(dataset="cifar10", download=True, progress=False).resolved()
    assert cfg == default
    assert cfg.eps == pytest.approx(8 / 255) and cfg.at_epochs == 110 and cfg.width is None and cfg.train_subset is None


def test_chapter_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown profile 'gpu'"):
        book.chapter_config("gpu")
    with pytest.raises(ValueError, match="unknown setting 'epochs'"):
        book.chapter_config("book", epochs=3)


def test_config_summary_lists_the_settings():
    cfg = tiny_config()
    table = book.config_summary(cfg, book.load_data(cfg))
    assert table.loc["images (train / val / test)", "value"] == "160 / 60 / 60"
    assert "PGD-1" in table.loc["adversarial training", "value"]


def test_class_names():
    assert book.class_names("fashion-mnist")[9] == "Ankle boot"
    assert book.class_names("synthetic-cifar10")[0] == "airplane"
    assert book.class_names("cifar100", 100)[42] == "42"


# ----------------------------------------------------------------------------------------------
# glue and caching primitives


def test_glue_rounds_and_converts_numbers(monkeypatch):
    myst_nb = pytest.importorskip("myst_nb")
    glued = {}
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display=True: glued.__setitem__(name, (value, display)))

    def value(v, **kw):
        assert book.glue("x", v, **kw) is None  # nothing for a notebook cell to display
        return glued["x"][0]

    assert value(12.34567) == 12.35 and glued["x"][1] is False
    assert value(np.float64(1.0 / 3.0), digits=1) == 0.3 and type(value(np.float32(2.5))) is float
    assert value(torch.tensor(7)) == 7 and value(np.int64(3)) == 3 and type(value(np.int64(3))) is int
    assert value("layer2.1.conv2") == "layer2.1.conv2"
    # the text myst-nb pastes into the prose ({glue:text}`x:.1f`) parses back to the number
    from myst_nb.core.variables import format_plain_text
    assert format_plain_text(repr(value(np.float64(67.94))), ".1f") == "67.9"


def test_load_or_compute_loads_the_second_time_and_keys_by_params(artifacts):
    calls = []

    def compute():
        calls.append(1)
        return {"value": torch.arange(3), "n": len(calls)}

    first = book.load_or_compute("thing", {"a": 1}, compute)
    second = book.load_or_compute("thing", {"a": 1}, compute)
    assert len(calls) == 1 and second["n"] == 1 and torch.equal(first["value"], second["value"])
    book.load_or_compute("thing", {"a": 2}, compute)
    assert len(calls) == 2
    assert book.artifact_path("thing", {"a": 1}) != book.artifact_path("thing", {"a": 2})
    assert sorted(p.parent for p in artifacts.glob("thing-*.pt")) == [artifacts, artifacts]  # RIFTLAB_ARTIFACTS honoured


def test_artifact_dir_defaults_to_the_repository(monkeypatch, tmp_path):
    monkeypatch.delenv("RIFTLAB_ARTIFACTS", raising=False)
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert book.artifact_dir() == tmp_path / "artifacts"


def test_code_version_is_part_of_every_key(shared):
    version = book.code_version()
    assert len(version) == 12 and version == book.code_version()
    saved = [riftlab.checkpoint.read_checkpoint(p)["params"] for p in shared["dir"].glob("*.pt")]
    assert saved and all(params["code"] == version for params in saved)


def test_state_hash_follows_the_weights():
    model = riftlab.build_model("resnet18", 10, 3, 32, 4)
    copy = riftlab.build_model("resnet18", 10, 3, 32, 4)
    copy.load_state_dict(model.state_dict())
    assert book.state_hash(model) == book.state_hash(copy) == book.state_hash(model.state_dict())
    with torch.no_grad():
        copy.linear.bias[0] += 1e-6
    assert book.state_hash(model) != book.state_hash(copy)


# ----------------------------------------------------------------------------------------------
# the cached steps


def test_trained_models(shared, monkeypatch):
    cfg, splits, device, models = shared["cfg"], shared["splits"], shared["device"], shared["models"]
    hist = models["at_history"]
    assert list(hist["epoch"]) == [1, 2]
    for col in ("train_attack_acc", "train_clean_acc", "train_robust_acc", "val_clean_acc", "val_robust_acc"):
        assert hist[col].between(0, 100).all(), col
    assert (hist["train_robust_acc"] <= hist["train_clean_acc"]).all() and (hist["val_robust_acc"] <= hist["val_clean_acc"]).all()
    assert "val_clean_acc" in models["standard_history"] and models["at_best_epoch"] in (1, 2)
    assert not models["at"].training and book.state_hash(models["at"]) != book.state_hash(models["standard"])
    assert len(list(shared["dir"].glob("models-*.pt"))) == 1

    # the second call loads: no training at all, the same weights
    _forbid(monkeypatch, "adversarial_train")
    again = book.trained_models(cfg, splits, device, train_eval_size=40)
    assert book.state_hash(again["at"]) == book.state_hash(models["at"])
    assert book.state_hash(again["standard"]) == book.state_hash(models["standard"])
    pd.testing.assert_frame_equal(again["at_history"], hist)
    monkeypatch.undo()

    # other parameters, another file
    other = tiny_config(seed=1, at_epochs=1)
    book.trained_models(other, splits, device, train_eval_size=40)
    assert len(list(shared["dir"].glob("models-*.pt"))) == 2


def test_epochwise_training_equals_one_run(shared):
    """The AT model trained one epoch at a time (to measure each epoch) is the one an uninterrupted run gives."""
    cfg, splits, device = shared["cfg"], shared["splits"], shared["device"]
    riftlab._util.seed_everything(cfg.seed)
    model = riftlab.engine.pipeline.build_for(cfg, splits)
    batches = book.loaders(cfg, splits, device)
    result = riftlab.adversarial_train(model, batches["train"], batches["val"], epochs=cfg.at_epochs, lr=cfg.at_lr,
                                       milestones=riftlab._util.milestones_for(cfg.at_epochs, 110, (100, 105)), eps=cfg.eps,
                                       step=cfg.at_attack_step, attack_steps=cfg.at_attack_steps, eval_steps=cfg.eval_steps, seed=cfg.seed)
    assert book.state_hash(model) == book.state_hash(shared["models"]["at"])
    assert [r["val_robust_acc"] for r in result.history] == list(shared["models"]["at_history"]["val_robust_acc"])


def test_evaluation_is_cached_by_weights(shared, monkeypatch):
    cfg, splits, device, at = shared["cfg"], shared["splits"], shared["device"], shared["models"]["at"]
    first = book.evaluation(cfg, at, "test", splits, device)
    assert first["n"] == 60 and first["restarts"] == cfg.eval_restarts and first["robust_acc"] <= first["clean_acc"]
    direct = riftlab.evaluate(at, Batches(splits.test, cfg.eval_batch_size), cfg.eps, cfg.step, cfg.eval_steps, cfg.eval_restarts,
                              seed=cfg.seed + 1)
    assert first == direct
    _forbid(monkeypatch, "evaluate")
    assert book.evaluation(cfg, at, "test", splits, device) == first
    with pytest.raises(AssertionError, match="cached"):  # another model is another entry
        book.evaluation(cfg, shared["models"]["standard"], "test", splits, device)
    with pytest.raises(ValueError, match="split"):
        book.evaluation(cfg, at, "train", splits, device)


def test_mrc_table(shared, monkeypatch):
    cfg, splits, device, at = shared["cfg"], shared["splits"], shared["device"], shared["models"]["at"]
    before = book.state_hash(at)
    table = book.mrc_table(cfg, at, splits, device)
    assert list(table["module"]) == sorted(table["module"], key=dict(zip(table["module"], table["mrc"])).get)
    assert set(table["module"]) == {n for n, _ in riftlab.weight_modules(at)}
    assert (table["relative_change"] <= cfg.mrc_eps + 1e-5).all() and book.state_hash(at) == before
    _forbid(monkeypatch, "module_robust_criticality")
    pd.testing.assert_frame_equal(book.mrc_table(cfg, at, splits, device), table)


def test_finetuned_one_module(shared, monkeypatch):
    cfg, splits, device, at = shared["cfg"], shared["splits"], shared["device"], shared["models"]["at"]
    before = book.state_hash(at)
    ft = book.finetuned(cfg, at, "layer2.1.conv2", splits, device)
    assert book.state_hash(at) == before  # the AT model is not touched
    a, b = at.state_dict(), ft["model"].state_dict()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed == ["layer2.1.conv2.weight"]  # only that weight; BatchNorm statistics stay frozen
    assert ft["trained_params"] == a["layer2.1.conv2.weight"].numel()
    assert list(ft["history"]["epoch"]) == [0, 1, 2] and ft["best_epoch"] in (1, 2)
    # the curve is the pipeline's (interpolation_curve over every alpha, with its paired intervals)
    full = interpolation_curve(at, a, b, Batches(splits.val, cfg.eval_batch_size), cfg.eps, cfg.step, cfg.eval_steps,
                               cfg.val_restarts, cfg.alphas, seed=cfg.seed)
    pd.testing.assert_frame_equal(ft["curve"], full)
    assert ft["choice"] == riftlab.select_alpha(full, cfg.threshold)
    _forbid(monkeypatch, "finetune_module")
    _forbid(monkeypatch, "choose_alpha")
    again = book.finetuned(cfg, at, "layer2.1.conv2", splits, device)
    assert book.state_hash(again["model"]) == book.state_hash(ft["model"]) and again["choice"] == ft["choice"]


def test_finetuned_all_layers_and_errors(shared):
    cfg, splits, device, at = shared["cfg"], shared["splits"], shared["device"], shared["models"]["at"]
    ft = book.finetuned(cfg, at, book.ALL_LAYERS, splits, device)
    a, b = at.state_dict(), ft["model"].state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert "conv1.weight" in changed and "linear.weight" in changed and "bn1.running_mean" in changed
    assert ft["trained_params"] == sum(p.numel() for p in at.parameters())
    assert ft["history"]["epoch"].tolist() == [0, 1, 2] and math.isnan(ft["history"]["train_loss"].iloc[0])
    assert ft["curve"]["alpha"].tolist() == list(cfg.alphas)
    with pytest.raises(ValueError, match="unknown module 'conv'"):
        book.finetuned(cfg, at, "conv", splits, device)


def test_rift_assembles_the_cached_steps(shared):
    cfg, splits, device = shared["cfg"], shared["splits"], shared["device"]
    out = book.rift(cfg, splits, device)
    assert out["module"] == out["mrc"]["module"].iloc[0]
    assert out["alpha"] == out["choice"]["alpha"] == out["finetuned"]["choice"]["alpha"]
    expected = interpolate(out["at"].state_dict(), out["finetuned"]["model"].state_dict(), out["alpha"])
    assert book.state_hash(out["rift"]) == book.state_hash(expected)
    fixed = book.rift(tiny_config(ft_module="linear"), splits, device)
    assert fixed["module"] == "linear"


def test_direction_follows_the_numbers_as_shown():
    assert book.direction(77.4, 77.0) == "falls" and book.direction(77.0, 77.4) == "rises"
    assert book.direction(77.41, 77.44) == "stays level"  # both shown as 77.4
    assert book.direction(1, 2, up="gains", down="loses") == "gains"


def _curve_run(points, alpha):
    """A run as the study stores it: (alpha, clean change, robust change) points with symmetric intervals of +-0.3."""
    curve = [{"alpha": 0.0, "clean_change": 0.0, "clean_change_low": 0.0, "clean_change_high": 0.0, "robust_change": 0.0,
              "robust_change_low": 0.0, "robust_change_high": 0.0}]
    for a, clean, robust in points:
        curve.append({"alpha": a, "clean_change": clean, "clean_change_low": clean - 0.3, "clean_change_high": clean + 0.3,
                      "robust_change": robust, "robust_change_low": robust - 0.3, "robust_change_high": robust + 0.3})
    return {"width": 64, "train": 55000, "seed": 0, "module": "layer3.0.shortcut.0", "mrc": {"least_params": 32768},
            "curve": curve, "alpha": alpha}


def test_curve_sentence_says_what_the_rule_had_and_took():
    # the best clean point broke the allowance, a smaller alpha was taken
    run = _curve_run([(0.5, 0.16, -0.02), (1.0, 0.34, -0.52)], alpha=0.5)
    text = book.study_curve_sentence(run, threshold=0.1)
    assert "+0.34 [+0.04, +0.64] points at alpha 1" in text and "more than the rule's 0.1-point allowance" in text
    assert text.endswith("The rule took alpha 0.5: clean +0.16 [-0.14, +0.46], robust -0.02 [-0.32, +0.28].")
    # the best point within the allowance: taken, no allowance claimed broken
    run = _curve_run([(0.5, 0.08, 0.08), (1.0, 0.02, -0.05)], alpha=0.5)
    text = book.study_curve_sentence(run, threshold=0.1)
    assert text.endswith(", and the rule took it.") and "allowance" not in text
    # nothing qualifies: alpha 0
    run = _curve_run([(0.5, 0.10, -0.20), (1.0, 0.30, -0.60)], alpha=0.0)
    assert book.study_curve_sentence(run, threshold=0.1).endswith("so the rule took alpha 0 (the AT model).")
    table = book.study_curve([run])
    assert list(table["alpha"]) == [0.5, 1.0] and list(table["chosen"]) == ["", ""]


def test_study_machines_names_each_machine_and_the_gpu_rows():
    def session(cpu, cores, torch_version, started, gpu=None):
        return {"machine": {"cpu": cpu, "cores": cores, "torch": torch_version, **({"gpu": gpu} if gpu else {})}, "started": started}

    study = {"provenance": {"runs": [session("AMD EPYC", 2, "2.14.1", "2026-12-02 01:00:00"), session("AMD EPYC", 2, "2.14.1", "2026-12-04 01:00:00"),
                                     session("Xeon", 16, "2.11.0", "2026-12-04 17:01:34", gpu="NVIDIA H200")],
                            "threads_per_job": 1, "summarized": "2026-12-04 19:00:00"},
             "trend": [{"width": 8, "train": 10000, "at": {"device": "cpu"}}, {"width": 64, "train": 55000, "at": {"device": "cuda"}}]}
    text = book.study_machines(study)
    assert text.startswith("Study jobs ran on AMD EPYC (2 cores, torch 2.14.1) from 2026-12-02; NVIDIA H200 (torch 2.11.0) from 2026-12-04")
    assert "the GPU ran the row width 64 on 55000 images, the CPUs every other" in text


def test_width_note_names_a_wider_model_only_where_it_is_weaker():
    def row(width, train, clean, robust):
        return {"width": width, "train": train, "test": {"at": {"clean_acc": clean, "robust_acc": robust}}}

    study = {"trend": [row(8, 10000, 80.0, 72.0), row(16, 10000, 83.0, 73.0), row(32, 10000, 78.0, 65.0), row(8, 55000, 85.0, 76.0),
                       row(64, 55000, 86.0, 78.0)]}
    note = book.study_width_note(study)
    assert "width 32 (78.00 / 65.00) below width 16 (83.00 / 73.00) on 10000 images" in note and "width 64" not in note
    study["trend"][2] = row(32, 10000, 84.0, 72.5)  # wider and better clean: not weaker on both
    assert book.study_width_note(study) == ""


def test_summary_sentence_says_when_every_seed_agrees_and_gives_no_zero_width_interval():
    """The committed headline kept alpha = 0 in every seed: the sentence says the seeds agree exactly instead of showing
    an interval over seeds of width 0, and gives the pooled paired interval, which is never [0, 0]."""
    import copy
    import json

    from riftlab import book
    from riftlab.evaluation.stats import over_seeds

    study = json.loads((Path(__file__).resolve().parents[1] / "results" / "scale_study" / "study.json").read_text())
    head = study["headline"]
    same = copy.deepcopy(study)
    for kind in ("clean", "robust"):
        same["headline"]["over_seeds"][kind] = over_seeds([0.0, 0.0, 0.0], [0, 1, 2])
    text = book.study_summary_sentence(same)
    assert "exactly +0.00 clean" in text and "seeds agree" in text and "[+0.00, +0.00]" not in text
    spread = copy.deepcopy(study)
    for kind in ("clean", "robust"):
        spread["headline"]["over_seeds"][kind] = over_seeds([0.1, -0.05, 0.02], [0, 1, 2])
    assert "95% interval over seeds [" in book.study_summary_sentence(spread)
    assert head["pooled"]["clean"]["ci_low"] < 0 < head["pooled"]["clean"]["ci_high"]
