"""What RiFT's gain is made of: the scale study's decomposition block (``benchmarks/scale_study.py --decomposition``)
as the chapter shows it.

Each AT length of the block holds, per seed, the AT model's regime (how far its robust accuracy on the training images
ran ahead of validation), RiFT as riftlab runs it, and the labelled fine-tuning settings: the authors' protocol at MRC's
least critical module and at the paper's module, BatchNorm recalibration alone, and riftlab's default with the
test-selected number beside it. Every function here reads that block and nothing else.

The block may hold several configurations (network widths), each block naming its ``width``: the first in the study is
the one the book leads with (the scale study's middle configuration, the one run on several seeds), and every
function reads that one unless given another ``width``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

from .study import interval_text

__all__ = ["SETTING_LABELS", "decomposition_widths", "decomposition_blocks", "decomposition_across_widths", "decomposition_regimes", "decomposition_table", "decomposition_end_points",
           "decomposition_over_seeds", "plot_decomposition", "decomposition_selection_sentence", "decomposition_regime_sentence",
           "decomposition_answer"]

# Short names for the tables (the chapter's prose says what each one does), in the order the tables read them.
SETTING_LABELS = {"frozen-bn": "riftlab default", "reference": "authors' protocol",
                  "reference-paper": "authors' protocol, layer2.1.conv2", "bn-only": "BatchNorm recalibration alone"}
_ORDER = ("frozen-bn", "reference", "reference-paper", "bn-only")


def decomposition_widths(study: Mapping[str, Any]) -> list[int | None]:
    """The widths the decomposition ran at, in the study's order: the first is the one the book leads with. A block
    summarised before widths were recorded has width None (the study then has that one configuration)."""
    return list(dict.fromkeys(b.get("width") for b in study.get("decomposition") or []))


def decomposition_blocks(study: Mapping[str, Any], width: int | None = None) -> list[Mapping[str, Any]]:
    """The decomposition blocks of one width (default: the lead one, :func:`decomposition_widths`), one per AT length,
    the longest first; empty when the study has none."""
    widths = decomposition_widths(study)
    if not widths:
        return []
    if width is None:
        width = widths[0]
    elif width not in widths:
        raise ValueError(f"the study has no decomposition at width {width}; it has {widths}")
    return sorted((b for b in study["decomposition"] if b.get("width") == width), key=lambda b: -b["at_epochs"])


def _block(study: Mapping[str, Any], at_epochs: int, width: int | None = None) -> Mapping[str, Any]:
    for block in decomposition_blocks(study, width):
        if block["at_epochs"] == at_epochs:
            return block
    lengths = [b["at_epochs"] for b in decomposition_blocks(study, width)]
    raise ValueError(f"the study has no decomposition at {at_epochs} AT epochs"
                     + (f" at width {width}" if width is not None else "") + f"; it has {lengths or 'none'}")


def _runs(block: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return block.get("runs") or [block]  # a block summarised before seeds were planned is its seed 0


def decomposition_regimes(study: Mapping[str, Any], width: int | None = None) -> pd.DataFrame:
    """One row per AT model of the decomposition (AT length, seed): its test accuracies and how far its robust accuracy
    on the training images (the training attack, averaged over the last epoch) ran ahead of validation (the evaluation
    attack, at the end): the gap that grows with robust overfitting."""
    rows = []
    for block in decomposition_blocks(study, width):
        for r in _runs(block):
            g = r["regime"]
            rows.append({"AT epochs": block["at_epochs"], "seed": r.get("seed", 0), "test clean": r["at"]["clean"], "test robust": r["at"]["robust"],
                         "train robust": g["train_robust"], "val robust": g["val_robust"], "gap": g["gap"]})
    return pd.DataFrame(rows)


def _settings(run: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {s["setting"]: s for s in run["settings"]}


def decomposition_table(study: Mapping[str, Any], at_epochs: int, seed: int = 0, width: int | None = None) -> pd.DataFrame:
    """One AT model's settings (:data:`SETTING_LABELS`; the module each trained is MRC's least critical one, the run's
    ``module``, except at the paper's module), each with what riftlab reports for it: the alpha chosen on
    validation and its test change against AT (paired 95% intervals), and the number the reference code's choice on
    test would print (its clean gain; the gain that choice makes when nothing changed, 95th percentile)."""
    run = next(r for r in _runs(_block(study, at_epochs, width)) if r.get("seed", 0) == seed)
    settings = _settings(run)
    rows = []
    for key in _ORDER:
        if key not in settings:
            continue
        s = settings[key]
        chosen = s.get("test_selected")
        rows.append({"setting": SETTING_LABELS[key], "alpha": s["alpha"],
                     "test clean": interval_text(s["validation_selected"]["clean"]),
                     "test robust": interval_text(s["validation_selected"]["robust"]),
                     "chosen on test: clean": f"{chosen['clean_gain']:+.2f} (null {chosen['null']['p95']:.2f})" if chosen else "-"})
    # an AT model with riftlab's run alone (no setting yet) gives an empty table, not a KeyError
    columns = ["setting", "alpha", "test clean", "test robust", "chosen on test: clean"]
    return pd.DataFrame(rows, columns=columns).set_index("setting")


def decomposition_end_points(study: Mapping[str, Any], at_epochs: int, seed: int = 0, width: int | None = None) -> pd.DataFrame:
    """What each setting's fine-tuning does by itself: the fine-tuned model (alpha 1) against AT on validation, clean and
    robust, with the curve's paired 95% intervals; shown where the rule keeps alpha 0 too."""
    run = next(r for r in _runs(_block(study, at_epochs, width)) if r.get("seed", 0) == seed)
    settings = _settings(run)
    rows = []
    for key in _ORDER:
        end = settings.get(key, {}).get("end_point")
        if end:
            rows.append({"setting": SETTING_LABELS[key], "alpha 1, val clean": interval_text(end["clean"]),
                         "alpha 1, val robust": interval_text(end["robust"])})
    return pd.DataFrame(rows).set_index("setting")


def decomposition_over_seeds(study: Mapping[str, Any], at_epochs: int, width: int | None = None) -> pd.DataFrame:
    """Each setting run on several seeds: its validation-selected test change with the seeds' test images pooled (paired
    95% score interval, clean and robust), and the seeds' mean clean change with its t interval over seeds (none where
    the seeds agree exactly)."""
    rows = []
    for p in _block(study, at_epochs, width).get("over_seeds") or []:
        label = "riftlab default" if p["setting"] == "rift" else SETTING_LABELS[p["setting"]]
        row: dict[str, Any] = {"setting": label, "seeds": ", ".join(str(s) for s in p["seeds"])}
        for kind in ("clean", "robust"):
            row[f"test {kind}, pooled"] = interval_text(p[kind]["pooled"])
        o = p["clean"]["over_seeds"]  # the robust one is in study.json; the table keeps to the page's width
        row["clean, seeds' mean"] = f"{o['mean']:+.2f}" + (f" [{o['ci_low']:+.2f}, {o['ci_high']:+.2f}]" if o.get("ci_low") is not None
                                                             and not o.get("note") else "")
        rows.append(row)
    return pd.DataFrame(rows).set_index("setting") if rows else pd.DataFrame()


def plot_decomposition(study: Mapping[str, Any], at_epochs: int, seed: int = 0, width: int | None = None):
    """Each setting's validation interpolation curve against AT (alpha 0), clean and robust side by side, with the paired
    95% intervals as bands and the alpha the rule chose marked. Returns the figure."""
    import matplotlib.pyplot as plt

    run = next(r for r in _runs(_block(study, at_epochs, width)) if r.get("seed", 0) == seed)
    settings = _settings(run)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for key in _ORDER:
        s = settings.get(key)
        if not s or not s.get("curve"):
            continue
        curve = s["curve"]
        xs = [c["alpha"] for c in curve]
        for ax, kind in zip(axes, ("clean", "robust")):
            ys = [c[f"{kind}_change"] for c in curve]
            line, = ax.plot(xs, ys, marker=".", label=SETTING_LABELS[key])
            ax.fill_between(xs, [c[f"{kind}_change_low"] for c in curve], [c[f"{kind}_change_high"] for c in curve],
                            color=line.get_color(), alpha=0.12)
            chosen = [c for c in curve if c["alpha"] == s["alpha"]]
            if chosen:
                ax.plot([s["alpha"]], [chosen[0][f"{kind}_change"]], marker="o", ms=9, mfc="none", color=line.get_color())
    for ax, kind in zip(axes, ("clean", "robust")):
        ax.axhline(0, color="grey", lw=1, ls=":")
        ax.set_xlabel("alpha (0: the AT model, 1: the fine-tuned model)")
        ax.set_ylabel(f"validation {kind} change (points)")
    at_width = f"width {width}, " if width is not None else ""
    axes[0].set_title(f"{at_width}{at_epochs}-epoch AT, seed {seed}: clean")
    axes[1].set_title("robust (PGD); circles: the alpha the rule chose")
    axes[0].legend(fontsize=8, loc="upper center", bbox_to_anchor=(1.1, -0.16), ncol=2)
    fig.tight_layout()
    return fig


def _pooled(block: Mapping[str, Any], setting: str) -> Mapping[str, Any] | None:
    return next((p for p in block.get("over_seeds") or [] if p["setting"] == setting), None)


def _change(block: Mapping[str, Any], setting: str) -> tuple[dict[str, Any], dict[str, Any], str] | None:
    """(clean, robust, where) for a setting's test change: pooled over the seeds that ran it when there are several,
    else seed 0's; None when it did not run."""
    p = _pooled(block, setting)
    if p is not None:
        return (p["clean"]["pooled"], p["robust"]["pooled"],
                f"seeds {', '.join(str(s) for s in p['seeds'])} pooled, {p['clean']['pooled']['n']} paired test images")
    s = _settings(_runs(block)[0]).get(setting)
    if s is None:
        return None
    return s["validation_selected"]["clean"], s["validation_selected"]["robust"], "seed 0, 10000 test images"


def _within_noise(d: Mapping[str, Any]) -> bool:
    return d["ci_low"] <= 0 <= d["ci_high"]


def _clearing(named: list[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """The named changes whose 95% interval excludes 0, each marked a gain or a loss."""
    return [f"{what} ({'a gain' if d['ci_low'] > 0 else 'a loss'})" for what, d in named if not _within_noise(d)]


def _end_points_text(block: Mapping[str, Any]) -> str:
    """Seed 0's fine-tuned end points (alpha 1, validation) of the authors' protocol and of BatchNorm recalibration
    alone, as the answer phrases them; empty when the authors' protocol did not run on this AT model."""
    ends = {k: v["end_point"] for k, v in _settings(_runs(block)[0]).items() if v.get("end_point")}
    if "reference" not in ends:
        return ""
    return (f"changes validation accuracy by {interval_text(ends['reference']['clean'])} clean and "
            f"{interval_text(ends['reference']['robust'])} robust"
            + (f", BatchNorm recalibration alone by {interval_text(ends['bn-only']['clean'])} and "
               f"{interval_text(ends['bn-only']['robust'])}" if "bn-only" in ends else "") + " (seed 0)")


def _protocol_text(block: Mapping[str, Any]) -> tuple[str, list[tuple[str, Mapping[str, Any]]]]:
    """What the authors' protocol and its BatchNorm control give on one AT model, as the answer phrases it for the
    models it does not lead with: their test changes, which clear the noise, and the fine-tuned end points; and the
    changes it named. Empty where the authors' protocol did not run."""
    if (ref := _change(block, "reference")) is None:
        return "", []
    clean, robust, where = ref
    parts = [("the authors' protocol, clean", clean), ("the authors' protocol, robust", robust)]
    text = f"the authors' protocol gives {interval_text(clean)} clean and {interval_text(robust)} robust"
    if (bn := _change(block, "bn-only")) is not None:
        parts += [("BatchNorm alone, clean", bn[0]), ("BatchNorm alone, robust", bn[1])]
        text += f", BatchNorm recalibration alone {interval_text(bn[0])} and {interval_text(bn[1])}"
    clearing = _clearing(parts)
    text += f" ({where}); " + (f"excluding 0: {', '.join(clearing)}" if clearing else "every interval includes 0")
    if ends := _end_points_text(block):  # what the rule turned down there, which can dwarf the lead model's
        text += f"; before interpolation, its fine-tuned model (alpha 1) {ends}"
    return text, parts


def decomposition_answer(study: Mapping[str, Any]) -> str:
    """The decomposition's answer in one paragraph, written from its numbers: under the authors' protocol with the
    longest AT, RiFT's test change with its interval; what BatchNorm recalibration alone gives; what the paper's module
    gives; what choosing on test adds; and whether any of it clears the noise. Empty when the study has no
    decomposition."""
    blocks = decomposition_blocks(study)
    if not blocks:
        return ""
    block = blocks[0]
    regimes = decomposition_regimes(study)
    gap = lambda e: regimes[regimes["AT epochs"] == e]["gap"].mean()  # noqa: E731
    text = (f"With adversarial training run {block['at_epochs']} epochs (the paper's decays scaled; robust accuracy on the training "
            f"images ends {gap(block['at_epochs']):.1f} points above validation"
            + (f", {gap(blocks[1]['at_epochs']):.1f} after {blocks[1]['at_epochs']} epochs" if len(blocks) > 1 else "") + ")")
    named: list[tuple[str, Mapping[str, Any]]] = []  # every change the paragraph gives, to say which clear the noise
    if (ref := _change(block, "reference")) is not None:
        clean, robust, where = ref
        named += [("the authors' protocol, clean", clean), ("the authors' protocol, robust", robust)]
        text += (f", RiFT fine-tuned as the authors' code does it (train-mode BatchNorm, their augmentation and alpha grid; alpha "
                 f"chosen on validation) changes test accuracy by {interval_text(clean)} clean and {interval_text(robust)} robust "
                 f"points ({where})")
    if (bn := _change(block, "bn-only")) is not None:
        clean, robust, where = bn
        named += [("BatchNorm alone, clean", clean), ("BatchNorm alone, robust", robust)]
        text += (f". Recalibrating the BatchNorm statistics alone, no weight trained, gives {interval_text(clean)} clean and "
                 f"{interval_text(robust)} robust ({where})")
    if (paper := _settings(_runs(block)[0]).get("reference-paper")) is not None:
        clean, robust = paper["validation_selected"]["clean"], paper["validation_selected"]["robust"]
        named += [("the paper's module, clean", clean), ("the paper's module, robust", robust)]
        text += (f"; at the paper's module, layer2.1.conv2, the authors' protocol gives {interval_text(clean)} clean and "
                 f"{interval_text(robust)} robust (seed 0)")
    if ends := _end_points_text(block):
        text += f". Before interpolation, the authors' fine-tuned model itself (alpha 1) {ends}"
    chosen = [s["test_selected"] for r in _runs(block) for s in r["settings"] if s["setting"] == "reference" and s.get("test_selected")]
    if chosen:
        gains, nulls = [c["clean_gain"] for c in chosen], [c["null"]["mean"] for c in chosen]
        text += (f". Choosing the epoch and alpha on the test images, as the reference code does, would print a clean gain of "
                 f"{sum(gains) / len(gains):+.2f} points (the mean over {len(gains)} seed{'s' if len(gains) > 1 else ''}), where the "
                 f"same choice prints {sum(nulls) / len(nulls):+.2f} on average when nothing changed")
    if named:
        clear = _clearing(named)
        gains = [what for what, d in named if d["ci_low"] > 0]
        if not clear:
            text += (". Of the test changes with alpha chosen by the rule, none has a 95% interval that excludes 0: at this scale "
                     "the study finds no gain under the authors' protocol either")
        else:
            text += (f". Of the test changes with alpha chosen by the rule, these have 95% intervals that exclude 0: {', '.join(clear)}"
                     + ("" if gains else "; none is a gain"))
    for shorter in blocks[1:]:  # the other AT lengths, where the authors' protocol ran on them too
        part, parts = _protocol_text(shorter)
        if part:
            text += f". After {shorter['at_epochs']} epochs of AT, {part}"
            named += parts
    for width in decomposition_widths(study)[1:]:  # the other widths, seed 0 unless more ran
        regimes = decomposition_regimes(study, width)
        said = []
        for b in decomposition_blocks(study, width):
            part, parts = _protocol_text(b)
            if part:
                said.append(f"after {b['at_epochs']} epochs of AT (train-validation robust gap "
                            f"{regimes[regimes['AT epochs'] == b['at_epochs']]['gap'].mean():.1f}), {part}")
                named += parts
        if said:
            text += f". At width {width}, " + "; ".join(said)
    if len(named) >= 10:  # many intervals: some exclude 0 by chance alone, and the reader should know how many
        k = len(_clearing(named))
        text += (f". In all, {k} of the {len(named)} test-change intervals above {'excludes' if k == 1 else 'exclude'} 0; were "
                 f"there no effect anywhere, about {0.05 * len(named):.1f} would by chance")
    return text + "."


def decomposition_selection_sentence(study: Mapping[str, Any], at_epochs: int, width: int | None = None) -> str:
    """What choosing on the test images adds, setting by setting, written from the numbers: the clean gain the
    reference code's two choices on test would print, against what the same choices print when nothing changed (the
    sign-flip null's mean and 95th percentile) and the p-value of the printed gain under that null."""
    parts = []
    for r in _runs(_block(study, at_epochs, width)):
        for s in r["settings"]:
            c = s.get("test_selected")
            if not c:
                continue
            parts.append(f"{SETTING_LABELS[s['setting']]} (seed {r.get('seed', 0)}): {c['clean_gain']:+.2f} at epoch {c['epoch']}, "
                         f"alpha {c['alpha']:g} (robust {c['robust_change']:+.2f}); nothing changed: {c['null']['mean']:+.2f}, "
                         f"95th percentile {c['null']['p95']:.2f}, p = {c['null']['p_value']:.2f}")
    if not parts:
        return ""
    return ("Chosen on the test images, as the reference code chooses, the clean gain each run would print: "
            + "; ".join(parts) + ".")


def decomposition_regime_sentence(study: Mapping[str, Any], width: int | None = None) -> str:
    """How the longer AT differs from the shorter one, in the seeds' means, written from the numbers: test clean and
    robust accuracy and the train-validation robust gap. Empty with one AT length."""
    blocks = decomposition_blocks(study, width)
    if len(blocks) < 2:
        return ""
    regimes = decomposition_regimes(study, width)
    mean = lambda e, c: float(regimes[regimes["AT epochs"] == e][c].mean())  # noqa: E731
    long, short = blocks[0]["at_epochs"], blocks[-1]["at_epochs"]
    seeds = lambda e: len(regimes[regimes["AT epochs"] == e])  # noqa: E731
    parts = [f"{what} {mean(long, col):.2f} against {mean(short, col):.2f}" for what, col in
             (("test clean", "test clean"), ("test robust", "test robust"), ("the train-validation robust gap", "gap"))]
    return (f"In the seeds' means ({seeds(long)} at {long} epochs, {seeds(short)} at {short}), {long} epochs of AT against {short}: "
            + "; ".join(parts) + ".")


def decomposition_across_widths(study: Mapping[str, Any], seed: int = 0) -> pd.DataFrame:
    """The decomposition at every width and AT length, one seed (default 0, the seed every configuration ran): the AT
    model's train-validation robust gap, the authors' protocol's test change (alpha chosen on validation, paired 95%
    intervals), BatchNorm recalibration alone's robust change, and the authors' fine-tuned model (alpha 1) on
    validation robust: the rows a reader compares to see whether width moves any of it. "-" where a setting has not
    run."""
    rows = []
    for width in decomposition_widths(study):
        for block in decomposition_blocks(study, width):
            run = next((r for r in _runs(block) if r.get("seed", 0) == seed), None)
            if run is None:
                continue
            settings = _settings(run)
            ref, bn = settings.get("reference"), settings.get("bn-only")
            show = lambda s, kind: interval_text(s["validation_selected"][kind]) if s else "-"  # noqa: E731
            rows.append({"width": width, "AT epochs": block["at_epochs"], "gap": run["regime"]["gap"],
                         "authors' protocol: clean": show(ref, "clean"), "authors' protocol: robust": show(ref, "robust"),
                         "BatchNorm alone: robust": show(bn, "robust"),
                         "authors' alpha 1: val robust": interval_text(ref["end_point"]["robust"]) if ref and ref.get("end_point") else "-"})
    columns = ["width", "AT epochs", "gap", "authors' protocol: clean", "authors' protocol: robust", "BatchNorm alone: robust",
               "authors' alpha 1: val robust"]
    return pd.DataFrame(rows, columns=columns).set_index(["width", "AT epochs"])
