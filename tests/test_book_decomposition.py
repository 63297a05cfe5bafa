"""The decomposition chapter's tables and sentences say what the study's decomposition block holds: the settings in
the book's order, the test-selected number beside its null, and an answer that calls a change a gain only where its
interval clears 0."""

import copy

import pytest

from riftlab import book
from riftlab.evaluation.stats import difference_from_counts, over_seeds


def _setting(name: str, clean: tuple[int, int], robust: tuple[int, int], gain_on_test: float | None = None) -> dict:
    n = 10000
    counts = {"clean": {"gained": clean[0], "lost": clean[1], "n": n}, "robust": {"gained": robust[0], "lost": robust[1], "n": n}}
    changes = {k: difference_from_counts(c["gained"], c["lost"], n) for k, c in counts.items()}
    curve = [{"alpha": a, **{f"{k}_change{s}": v for k in ("clean", "robust") for s, v in (("", 0.0), ("_low", -0.1), ("_high", 0.1))}}
             for a in (0.0, 0.5, 1.0)]
    curve[-1]["robust_change"], curve[-1]["robust_change_low"], curve[-1]["robust_change_high"] = -3.9, -4.5, -3.3
    chosen = None if gain_on_test is None else {"epoch": 3, "alpha": 0.1, "clean_gain": gain_on_test, "robust_change": 0.0,
                                                  "null": {"mean": 0.07, "p95": 0.21, "p_value": 0.4, "permutations": 200}}
    end = {k: {"diff": curve[-1][f"{k}_change"], "ci_low": curve[-1][f"{k}_change_low"], "ci_high": curve[-1][f"{k}_change_high"]}
           for k in ("clean", "robust")}
    return {"setting": name, "variant": "least", "modules": "layer1.0.conv2", "params": 576, "alpha": 0.5,
            "validation_selected": changes, "counts": counts, "end_point": end, "curve": curve, "test_selected": chosen}


def _study(reference_clean: tuple[int, int]) -> dict:
    runs = []
    for seed in (0, 1):
        settings = [_setting("reference", reference_clean, (10, 10), 0.12), _setting("bn-only", (3, 4), (5, 5), 0.0)]
        if seed == 0:
            settings += [_setting("reference-paper", (7, 7), (9, 9)), _setting("frozen-bn", (2, 2), (1, 1), 0.05)]
        rift = {k: difference_from_counts(4, 4, 10000) for k in ("clean", "robust")}
        runs.append({"name": f"w8-n10k-e40-s{seed}", "seed": seed, "at_epochs": 40, "module": "layer1.0.conv2", "alpha": 0.5,
                     "at": {"clean": 84.0, "robust": 72.0}, "rift": rift, "settings": settings,
                     "regime": {"epochs": 40, "train_robust": 76.0 + seed, "val_robust": 72.5, "val_clean": 84.5, "gap": 3.5 + seed}})
    pooled = []
    for name in ("reference", "bn-only"):
        mine = [s for r in runs for s in r["settings"] if s["setting"] == name]
        pooled.append({"setting": name, "seeds": [0, 1], **{k: {
            "over_seeds": over_seeds([s["validation_selected"][k]["diff"] for s in mine], [0, 1]),
            "pooled": difference_from_counts(sum(s["counts"][k]["gained"] for s in mine), sum(s["counts"][k]["lost"] for s in mine), 20000)}
            for k in ("clean", "robust")}})
    short = copy.deepcopy(runs[0])
    short.update(name="w8-n10k-s0", at_epochs=10, settings=[], regime={"epochs": 10, "train_robust": 74.0, "val_robust": 72.1,
                                                                           "val_clean": 80.4, "gap": 1.9})
    blocks = [{"name": "w8-n10k-s0", "at_epochs": 10, "runs": [short], "over_seeds": []},
              {"name": "w8-n10k-e40-s0", "at_epochs": 40, "runs": runs, "over_seeds": pooled}]
    return {"decomposition": blocks}


def test_the_tables_read_the_settings_in_the_books_order_with_the_test_selected_number_beside():
    study = _study((12, 10))
    assert [b["at_epochs"] for b in book.decomposition_blocks(study)] == [40, 10]  # the longest first
    table = book.decomposition_table(study, 40)
    assert list(table.index) == ["riftlab default", "authors' protocol", "authors' protocol, layer2.1.conv2", "BatchNorm recalibration alone"]
    assert table.loc["authors' protocol", "chosen on test: clean"] == "+0.12 (null 0.21)"
    assert table.loc["authors' protocol, layer2.1.conv2", "chosen on test: clean"] == "-"
    assert "module" not in table.columns  # the prose names it: the table fits the page
    assert table.loc["authors' protocol", "test clean"] == book.interval_text(difference_from_counts(12, 10, 10000))
    ends = book.decomposition_end_points(study, 40)
    assert ends.loc["BatchNorm recalibration alone", "alpha 1, val robust"] == "-3.90 [-4.50, -3.30]"
    regimes = book.decomposition_regimes(study)
    assert list(regimes["gap"]) == [3.5, 4.5, 1.9]
    assert "the train-validation robust gap 4.00 against 1.90" in book.decomposition_regime_sentence(study)
    over = book.decomposition_over_seeds(study, 40)
    assert over.loc["authors' protocol", "test clean, pooled"] == book.interval_text(difference_from_counts(24, 20, 20000))
    empty = book.decomposition_table(study, 10)  # riftlab's run alone on the shorter AT model: no setting yet
    assert len(empty) == 0 and list(empty.columns) == list(table.columns)
    with pytest.raises(ValueError, match="no decomposition at 20 AT epochs; it has \\[40, 10\\]"):
        book.decomposition_table(study, 20)


def test_the_answer_calls_nothing_a_gain_inside_the_noise_and_names_what_clears():
    quiet = book.decomposition_answer(_study((12, 10)))
    pooled = book.interval_text(difference_from_counts(24, 20, 20000))
    assert f"changes test accuracy by {pooled} clean" in quiet and "seeds 0, 1 pooled, 20000 paired test images" in quiet
    assert "none has a 95% interval that excludes 0" in quiet and "exclude 0:" not in quiet
    assert "would print a clean gain of +0.12 points (the mean over 2 seeds)" in quiet and "+0.07 on average" in quiet
    loud = book.decomposition_answer(_study((90, 10)))  # 80 more images right of 20000: the interval clears 0
    assert difference_from_counts(180, 20, 20000)["ci_low"] > 0
    assert "exclude 0: the authors' protocol, clean (a gain)" in loud and "none has" not in loud and "none is a gain" not in loud
    lossy = book.decomposition_answer(_study((10, 90)))
    assert "exclude 0: the authors' protocol, clean (a loss); none is a gain" in lossy
    assert book.decomposition_answer({}) == ""
    assert "After 10 epochs" not in quiet  # the shorter AT model has riftlab's run alone: nothing to report for it


def test_the_answer_gives_the_shorter_at_models_protocol_and_control_when_they_ran():
    study = _study((12, 10))
    short = study["decomposition"][0]["runs"][0]
    short["settings"] = [_setting("reference", (3, 5), (4, 40)), _setting("bn-only", (2, 2), (6, 6))]
    answer = book.decomposition_answer(study)
    assert difference_from_counts(4, 40, 10000)["ci_high"] < 0
    tail = answer[answer.index("After 10 epochs of AT"):]
    assert tail.startswith(f"After 10 epochs of AT, the authors' protocol gives {book.interval_text(difference_from_counts(3, 5, 10000))} clean")
    assert f"BatchNorm recalibration alone {book.interval_text(difference_from_counts(2, 2, 10000))}" in tail
    assert "(seed 0, 10000 test images); excluding 0: the authors' protocol, robust (a loss); before" in tail
    assert ("; before interpolation, its fine-tuned model (alpha 1) changes validation accuracy by +0.00 [-0.10, +0.10] clean and "
            "-3.90 [-4.50, -3.30] robust, BatchNorm recalibration alone by +0.00 [-0.10, +0.10] and -3.90 [-4.50, -3.30] (seed 0).") in tail


def test_the_readme_gives_the_committed_decomposition_numbers():
    """The README's decomposition paragraph quotes the committed study: the authors' protocol and its BatchNorm control,
    pooled over the seeds that ran, at the longest AT length."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    study = book.study_results(None)  # the committed results/scale_study/study.json
    readme = " ".join((repo / "README.md").read_text().split())
    block = book.decomposition_blocks(study)[0]
    for setting in ("reference", "bn-only"):
        pooled = next(p for p in block["over_seeds"] if p["setting"] == setting)
        seeds = pooled["seeds"]
        assert f"seeds {', '.join(str(s) for s in seeds[:-1])} and {seeds[-1]} pooled ({pooled['clean']['pooled']['n']} paired test" in readme
        for kind in ("clean", "robust"):
            assert book.interval_text(pooled[kind]["pooled"]) in readme, (setting, kind)
    for width in book.decomposition_widths(study)[1:]:  # each wider configuration's seed 0, at its longest AT
        run = book.decomposition_blocks(study, width)[0]["runs"][0]
        settings = {s["setting"]: s for s in run["settings"]}
        assert f"width {width}" in readme
        for setting in ("reference", "bn-only"):
            for kind in ("clean", "robust"):
                assert book.interval_text(settings[setting]["validation_selected"][kind]) in readme, (width, setting, kind)


def _with_width_16(study: dict) -> dict:
    """The study with width-8 blocks (the lead) and a width-16 configuration, seed 0 only: its 40-epoch model with the
    authors' protocol and BatchNorm alone, its 10-epoch model with RiFT alone."""
    for b in study["decomposition"]:
        b.update(width=8, train=10000)
    wide = copy.deepcopy(study["decomposition"])
    for b in wide:
        b.update(width=16, runs=b["runs"][:1], over_seeds=[], name=b["name"].replace("w8", "w16"))
    wide[1]["runs"][0]["settings"] = [_setting("reference", (1, 1), (3, 60)), _setting("bn-only", (2, 2), (4, 4))]
    wide[1]["runs"][0]["regime"] = {**wide[1]["runs"][0]["regime"], "gap": 5.25}
    study["decomposition"] += wide
    return study


def test_a_second_width_is_read_only_when_named_and_joins_the_answer_and_the_width_table():
    study = _with_width_16(_study((12, 10)))
    assert book.decomposition_widths(study) == [8, 16]
    lead = book.decomposition_table(study, 40)  # the lead width unless another is named
    assert lead.loc["authors' protocol", "test robust"] == book.interval_text(difference_from_counts(10, 10, 10000))
    wide = book.decomposition_table(study, 40, width=16)
    assert wide.loc["authors' protocol", "test robust"] == book.interval_text(difference_from_counts(3, 60, 10000))
    assert list(book.decomposition_regimes(study)["gap"]) == [3.5, 4.5, 1.9]  # the lead's regimes only
    assert list(book.decomposition_regimes(study, 16)["gap"]) == [5.25, 1.9]
    with pytest.raises(ValueError, match="no decomposition at width 32; it has \\[8, 16\\]"):
        book.decomposition_blocks(study, 32)
    table = book.decomposition_across_widths(study)
    assert list(table.index) == [(8, 40), (8, 10), (16, 40), (16, 10)]
    assert table.loc[(16, 40), "authors' protocol: robust"] == book.interval_text(difference_from_counts(3, 60, 10000))
    assert table.loc[(16, 40), "authors' alpha 1: val robust"] == "-3.90 [-4.50, -3.30]" and table.loc[(16, 10), "gap"] == 1.9
    assert table.loc[(16, 10), "authors' protocol: clean"] == "-"  # RiFT alone on that model
    answer = book.decomposition_answer(study)
    tail = answer[answer.index("At width 16, "):]
    assert tail.startswith("At width 16, after 40 epochs of AT (train-validation robust gap 5.2), the authors' protocol gives "
                           f"{book.interval_text(difference_from_counts(1, 1, 10000))} clean and "
                           f"{book.interval_text(difference_from_counts(3, 60, 10000))} robust")
    assert "(seed 0, 10000 test images); excluding 0: the authors' protocol, robust (a loss); before interpolation" in tail
    assert "after 10 epochs" not in tail  # RiFT alone there: nothing of the authors' protocol to report
    assert answer[:answer.index(" At width 16")] == book.decomposition_answer(_study((12, 10)))  # the lead's text unchanged
    # 6 intervals for the lead (protocol, BatchNorm alone, the paper's module), 4 at width 16: one excludes 0, 0.5 by chance
    assert answer.endswith(". In all, 1 of the 10 test-change intervals above excludes 0; were there no effect anywhere, "
                           "about 0.5 would by chance.")
    assert "In all" not in book.decomposition_answer(_study((12, 10)))  # six intervals: no tally
