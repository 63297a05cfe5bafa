"""The scale study (benchmarks/scale_study.py) as the chapters present it: its committed results, loaded and turned
into tables, figures and sentences written from the numbers.

Every paired change is shown as :func:`interval_text` writes it (the change in points and its 95% interval).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
import torch.nn as nn

from ..data import Batches
from ..steps.interpolation import interpolate
from .artifacts import artifact_dir


def study_results(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The scale study's committed summary (``results/scale_study/study.json`` at the repository root), or None
    when it is not there (a notebook opened outside a checkout, e.g. on Colab from a pip install)."""
    if path is None:
        root = artifact_dir().parent
        path = root / "results" / "scale_study" / "study.json"
    path = Path(path)
    if not path.is_file():
        return None
    return {**json.loads(path.read_text()), "_folder": str(path.parent)}  # where its checkpoints are


def interval_text(d: Mapping[str, Any]) -> str:
    """'+0.12 [-0.03, +0.27]' from a paired difference dict (``diff``, ``ci_low``, ``ci_high``, in points)."""
    return f"{d['diff']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"


def _verdict(clean: Mapping[str, Any], robust: Mapping[str, Any], threshold: float) -> str:
    """``gain``: the clean change's 95% interval above 0 with robust accuracy held (within ``threshold`` points);
    ``loss``: the interval below 0; ``within noise``: the interval holds 0; ``robust drop``: a clean gain that cost more
    robust accuracy than the threshold allows. Short, so that the tables fit the page; the chapters' prose says this."""
    if clean["ci_low"] > 0 and robust["diff"] >= -threshold - 1e-9:
        return "gain"
    if clean["ci_high"] < 0:
        return "loss"
    return "within noise" if clean["ci_low"] <= 0 <= clean["ci_high"] else "robust drop"


def _at_label(at: Mapping[str, Any]) -> str:
    """How a run's AT model was trained, e.g. ``PGD-10, 10 epochs (cuda, bf16)`` (the precision only where it is not fp32)."""
    epochs = f"{at['epochs']} epoch{'s' if at['epochs'] != 1 else ''}"
    precision = "" if at["precision"] in ("auto", "fp32") else f", {at['precision']}"  # auto on the CPU is fp32
    return f"{at['method'].upper()}-{at['attack_steps']}, {epochs} ({at['device']}{precision})"


def study_machines(study: Mapping[str, Any]) -> str:
    """Which machines ran the study's jobs, and where the GPU rows ran, in one sentence written from the provenance."""
    seen: dict[str, str] = {}
    for r in study["provenance"]["runs"]:
        m = r["machine"]
        what = f"{m['gpu']} (torch {m['torch']})" if m.get("gpu") else f"{m['cpu']} ({m['cores']} cores, torch {m['torch']})"
        seen.setdefault(what, r["started"][:10])
    gpu_rows = [f"width {r['width']} on {r['train']}" for r in study["trend"] if r["at"]["device"] == "cuda"]
    text = "Study jobs ran on " + "; ".join(f"{what} from {day}" for what, day in seen.items())
    if gpu_rows:
        text += f"; the GPU ran the row{'s' if len(gpu_rows) > 1 else ''} {', '.join(gpu_rows)} images, the CPUs every other"
    return text + f". {study['provenance']['threads_per_job']} thread per CPU job; summarised {study['provenance']['summarized'][:10]}."


def study_curve(runs: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The validation interpolation curves of these runs: each alpha above 0 against alpha = 0 (the AT model), with the
    paired 95% intervals the selection rule had in front of it; ``chosen`` marks the alpha the rule took."""
    rows = []
    for r in runs:
        for c in r["curve"]:
            if c["alpha"] > 0:
                rows.append({"width": r["width"], "training images": r["train"], "seed": r["seed"],
                             "module (weights)": f"{r['module']} ({r['mrc']['least_params']})", "alpha": c["alpha"],
                             "clean change [95% CI]": interval_text(_curve_change(c, "clean")),
                             "robust change [95% CI]": interval_text(_curve_change(c, "robust")),
                             "chosen": "yes" if c["alpha"] == r["alpha"] else ""})
    return pd.DataFrame(rows)


def study_curve_sentence(run: Mapping[str, Any], threshold: float) -> str:
    """What the selection rule had to choose from on one run's validation curve, in words written from its numbers: the
    alpha with the largest clean change, its robust change against the rule's allowance, and the alpha the rule took."""
    points = [c for c in run["curve"] if c["alpha"] > 0]
    best = max(points, key=lambda c: (c["clean_change"], -c["alpha"]))
    ci = lambda c, kind: interval_text(_curve_change(c, kind))  # noqa: E731
    text = (f"On validation, the largest clean change is {ci(best, 'clean')} points at alpha {best['alpha']:g}, with a robust change "
            f"of {ci(best, 'robust')}")
    if best["robust_change"] < -threshold - 1e-9:
        text += f": more than the rule's {threshold:g}-point allowance"
    chosen = next((c for c in points if c["alpha"] == run["alpha"]), None)
    if chosen is None:
        return text + f". No alpha above 0 kept robust accuracy within {threshold:g} points, so the rule took alpha 0 (the AT model)."
    if chosen is best:
        return text + ", and the rule took it."
    return text + f". The rule took alpha {chosen['alpha']:g}: clean {ci(chosen, 'clean')}, robust {ci(chosen, 'robust')}."


def study_width_note(study: Mapping[str, Any]) -> str:
    """Where a wider network on the same training images came out weaker (lower AT test clean and robust accuracy) than
    a narrower one: such a row's change does not measure capacity alone. Written from the numbers; empty when none did."""
    rows = sorted(study["trend"], key=lambda r: (r["train"], r["width"]))
    pairs = []
    for wide in rows:
        narrower = [r for r in rows if r["train"] == wide["train"] and r["width"] < wide["width"]]
        if narrower:
            best = max(narrower, key=lambda r: r["test"]["at"]["clean_acc"])
            w, n = wide["test"]["at"], best["test"]["at"]
            if w["clean_acc"] < n["clean_acc"] and w["robust_acc"] < n["robust_acc"]:
                pairs.append(f"width {wide['width']} ({w['clean_acc']:.2f} / {w['robust_acc']:.2f}) below width {best['width']} "
                             f"({n['clean_acc']:.2f} / {n['robust_acc']:.2f}) on {wide['train']} images")
    if not pairs:
        return ""
    return ("A wider network is not always a stronger one at this training budget: AT test clean / robust accuracy of "
            + "; ".join(pairs) + ". Such a row's change does not measure capacity alone.")


def study_models(study: Mapping[str, Any]) -> pd.DataFrame:
    """One row per configuration of the study (seed 0): how its AT model was trained (attack, epochs, device), its test
    accuracies (percent), its least critical module (weights) and MRC's spread (most / least critical)."""
    return pd.DataFrame([{"width": r["width"], "training images": r["train"], "AT": _at_label(r["at"]),
                          "AT test clean": round(r["test"]["at"]["clean_acc"], 2), "AT test robust": round(r["test"]["at"]["robust_acc"], 2),
                          "least critical (weights)": f"{r['module']} ({r['mrc']['least_params']})",
                          "MRC spread": round(r["mrc"]["spread"], 1)} for r in study["trend"]])


def study_trend(study: Mapping[str, Any]) -> pd.DataFrame:
    """One row per configuration of the study (seed 0): RiFT as defined, its alpha and its test changes (points) with
    their paired 95% intervals, and the verdict (:func:`_verdict`). How each AT model was trained: :func:`study_models`."""
    threshold = study["provenance"]["threshold"]
    rows = []
    for r in study["trend"]:
        d = r["test"]["difference"]
        rows.append({"width": r["width"], "training images": r["train"], "module": r["module"], "alpha": r["alpha"],
                     "clean change": interval_text(d["clean"]), "robust change": interval_text(d["robust"]),
                     "verdict": _verdict(d["clean"], d["robust"], threshold)})
    return pd.DataFrame(rows)


# Short, so that the tables fit the page; the chapter's prose says what each one changes.
VARIANT_LABELS = {("rift", "least"): "RiFT as defined", ("variants", "least3x3"): "least critical 3x3 conv",
                  ("bn", "least"): "BatchNorm statistics updated", ("lr0.003", "least"): "lr 0.003", ("lr0.01", "least"): "lr 0.01"}


def _test_change(row: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """An ablation row's test change against AT for ``kind`` (clean or robust), as :func:`interval_text` and :func:`_verdict`
    read it."""
    return {"diff": row[f"test_{kind}_change"], "ci_low": row[f"test_{kind}_ci_low"], "ci_high": row[f"test_{kind}_ci_high"]}


def _curve_change(point: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """An interpolation-curve point's change against alpha = 0 for ``kind`` (clean or robust), as :func:`interval_text` reads it."""
    return {"diff": point[f"{kind}_change"], "ci_low": point[f"{kind}_change_low"], "ci_high": point[f"{kind}_change_high"]}


def study_variants(study: Mapping[str, Any]) -> pd.DataFrame:
    """Every labelled fine-tuning variant, beside RiFT as defined on the same configuration, with its test changes
    against AT (points) and their paired 95% intervals; only the configurations that ran variants."""
    threshold = study["provenance"]["threshold"]
    rows = []
    for r in study["trend"]:
        if not [v for v in r["variants"] if v["setting"] != "table3" and v["variant"] not in ("at", "no-interp")]:
            continue
        entries = [("rift", "least", r["module"], r["mrc"]["least_params"], r["alpha"], r["test"]["difference"]["clean"],
                    r["test"]["difference"]["robust"])]
        for v in r["variants"]:
            if v["setting"] == "table3" or v["variant"] in ("at", "no-interp"):
                continue
            entries.append((v["setting"], v["variant"], v["modules"], v["params"], v["alpha"], _test_change(v, "clean"), _test_change(v, "robust")))
        for setting, variant, module, _, alpha, clean, robust in entries:
            rows.append({"width": r["width"], "training images": r["train"],
                         "fine-tuning": VARIANT_LABELS.get((setting, variant), f"{setting} / {variant}"),
                         "module": module, "alpha": alpha, "clean change": interval_text(clean),
                         "robust change": interval_text(robust), "verdict": _verdict(clean, robust, threshold)})
    return pd.DataFrame(rows)


def study_headline(study: Mapping[str, Any]) -> pd.DataFrame:
    """AT and AT+RiFT of the headline configuration, per seed: validation and test, with the paired changes."""
    block = study["headline"]
    rows = []
    for r in block["runs"]:
        for split, label in (("validation", "val"), ("test", "test")):
            d = r[split]["difference"]
            rows.append({"seed": r["seed"], "split": label, "AT clean": round(r[split]["at"]["clean_acc"], 2),
                         "AT+RiFT clean": round(r[split]["rift"]["clean_acc"], 2), "clean change [95% CI]": interval_text(d["clean"]),
                         "AT robust": round(r[split]["at"]["robust_acc"], 2), "AT+RiFT robust": round(r[split]["rift"]["robust_acc"], 2),
                         "robust change [95% CI]": interval_text(d["robust"]), "alpha": r["alpha"], "module": r["module"]})
    return pd.DataFrame(rows)


def study_summary_sentence(study: Mapping[str, Any]) -> str:
    """The study's answer in plain words, written from its numbers (never a claimed direction they contradict)."""
    block = study["headline"]
    pick = block["pick"]
    width, train = pick["width"], pick["train"]
    over = block.get("over_seeds")
    where = f"a ResNet-18 of width {width} adversarially trained on {train} real Fashion-MNIST images"
    trend = study_trend(study)
    gains = trend[trend["verdict"] == "gain"]
    if pick["rule"] == "smallest winning configuration":
        lead = f"RiFT as defined gains clean accuracy on the test split of {where}, with robust accuracy held"
    elif pick["rule"].startswith("smallest winning configuration"):
        lead = (f"RiFT as defined does not gain anywhere in the study; a labelled variant ({VARIANT_LABELS.get((pick['setting'], pick['variant']), pick['setting'])}) "
                f"does, on the test split of {where}")
    else:
        lead = (f"In no configuration of the study ({len(trend)} of them, widths {', '.join(str(w) for w in sorted(set(trend['width'])))}) "
                "did RiFT's test clean gain have a 95% interval above 0 with robust accuracy held")
    if over is not None:
        c, r = over["clean"], over["robust"]
        seeds = ', '.join(str(s) for s in c['seeds'])
        if c.get("sd") == 0 and r.get("sd") == 0:  # every seed the same: an interval over seeds of width 0 says only that
            lead += (f". In every one of seeds {seeds} of {where}, AT+RiFT minus AT is exactly {c['mean']:+.2f} clean and "
                     f"{r['mean']:+.2f} robust points (the seeds agree, so their spread gives no interval; the test images' "
                     "uncertainty is the pooled interval)")
        else:
            lead += (f". Over seeds {seeds} of {where}, AT+RiFT minus AT is "
                     f"{c['mean']:+.2f} clean points (95% interval over seeds [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]) and "
                     f"{r['mean']:+.2f} robust points ([{r['ci_low']:+.2f}, {r['ci_high']:+.2f}])")
    pooled = block.get("pooled") or {}
    if pooled.get("clean") and pooled.get("robust"):
        lead += (f"; pooled over the seeds' {pooled['clean']['n']} paired test images, {interval_text(pooled['clean'])} clean and "
                 f"{interval_text(pooled['robust'])} robust points (paired 95% score intervals)")
    widest = max(study["trend"], key=lambda r: (r["width"], r["train"]))
    if (widest["width"], widest["train"]) != (width, train):
        d = widest["test"]["difference"]
        at = widest["at"]
        lead += (f". At the study's widest, a ResNet-18 of width {widest['width']} on {widest['train']} images, adversarially trained "
                 f"with {at['method'].upper()}-{at['attack_steps']} on {'a GPU' if at['device'] == 'cuda' else 'the CPU'} (seed "
                 f"{widest['seed']}), the rule took alpha {widest['alpha']:g} and the test change was {interval_text(d['clean'])} clean and "
                 f"{interval_text(d['robust'])} robust points")
    missing = block.get("seeds_missing") or []
    if missing:
        lead += f" (seed{'s' if len(missing) > 1 else ''} {', '.join(str(s) for s in missing)} of the plan have not been run yet)"
    if len(gains) == 0:
        lead += ". At these sizes the product cannot show RiFT working; the trend table says how the change moves with width and data"
    return lead + "."


def plot_study_trend(study: Mapping[str, Any]):
    """RiFT's test clean change (with its 95% paired interval) against the width, one line per training-set size;
    the labelled variants of the middle configuration beside them. Returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    by_data: dict[tuple[int, int], list[tuple[int, Mapping[str, Any]]]] = {}  # one line per training-set size and AT attack
    for r in study["trend"]:
        by_data.setdefault((r["train"], r["at"]["attack_steps"]), []).append((r["width"], r["test"]["difference"]["clean"]))
    for (train, steps), points in sorted(by_data.items()):
        points.sort()
        xs = [w for w, _ in points]
        ys = [d["diff"] for _, d in points]
        err = [[d["diff"] - d["ci_low"] for _, d in points], [d["ci_high"] - d["diff"] for _, d in points]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=f"RiFT as defined, {train} training images, PGD-{steps} AT")
    variants = study_variants(study)
    shown = variants[~variants["fine-tuning"].str.startswith("RiFT as defined")]
    for i, (_, row) in enumerate(shown.iterrows()):
        value = float(row["clean change"].split(" ")[0])
        low, high = (float(v) for v in row["clean change"].split("[")[1].rstrip("]").split(", "))
        ax.errorbar([row["width"] * (1.04 + 0.03 * i)], [value], yerr=[[value - low], [high - value]], marker="s", ls="none", capsize=3,
                    alpha=0.7, label=f"{row['fine-tuning']}, width {row['width']}")
    ax.axhline(0, color="grey", lw=1, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ResNet-18 width (channels of the first stage)")
    ax.set_ylabel("test clean change (points)")
    ax.set_title("AT+RiFT minus AT on 10000 Fashion-MNIST test images, 95% paired intervals")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below the axes: the plot keeps its width
    fig.tight_layout()
    return fig


def plot_study_mrc(study: Mapping[str, Any]):
    """The headline AT model's MRC, every module, on a log scale (the least critical first). Returns the figure."""
    import matplotlib.pyplot as plt

    run = study["headline"]["runs"][0]
    table = pd.DataFrame(run["mrc"]["table"]).sort_values("mrc")
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    ax.barh(table["module"], table["mrc"].clip(lower=1e-4), color=["tab:green"] + ["tab:blue"] * (len(table) - 2) + ["tab:red"])
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("MRC (increase of the adversarial loss, log scale)")
    ax.set_title(f"MRC of every module: width {run['width']}, {run['train']} images, seed {run['seed']}")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


def study_table3(study: Mapping[str, Any]) -> pd.DataFrame | None:
    """The paper's Table 3 at the headline configuration (seed 0): which weights to fine-tune, each with alpha chosen on
    validation and its test changes against AT; None when the study has not run it."""
    run = study["headline"]["runs"][0]
    rows = [v for v in run["variants"] if v["setting"] == "table3"]
    if not rows:
        return None
    labels = {"at": "AT (no fine-tuning)", "least": "least critical module (RiFT)", "most": "most critical module", "last": "last layer",
              "all": "all layers", "no-interp": "least critical, no interpolation (alpha 1)"}
    return pd.DataFrame([{"fine-tuned": labels.get(v["variant"], v["variant"]), "weights": v["params"], "alpha": v["alpha"],
                          "test clean": round(v["test_clean_acc"], 2), "test robust": round(v["test_robust_acc"], 2),
                          "clean change [95% CI]": interval_text(_test_change(v, "clean")),
                          "robust change [95% CI]": interval_text(_test_change(v, "robust"))}
                         for v in rows])


TABLE3_LABELS = {"most": "most critical module", "last": "last layer", "all": "all layers"}


def study_confirmations(study: Mapping[str, Any]) -> pd.DataFrame | None:
    """The Table 3 variants that won on seed 0, run again unchanged on the headline's other seeds: per seed, over the seeds
    (mean, Student-t 95% interval) and pooled over the seeds' test images (paired 95% score interval); None when no
    Table 3 variant won on seed 0 (or Table 3 has not run)."""
    found = (study.get("headline") or {}).get("confirmations") or []
    if not found:
        return None
    threshold = study["provenance"]["threshold"]
    rows = []
    for c in found:
        label = TABLE3_LABELS.get(c["variant"], c["variant"])
        for r in c["rows"]:
            clean, robust = _test_change(r, "clean"), _test_change(r, "robust")
            rows.append({"fine-tuned": label, "seeds": str(r["seed"]), "alpha": r["alpha"], "test images": 10000,
                         "clean change [95% CI]": interval_text(clean), "robust change [95% CI]": interval_text(robust),
                         "verdict": _verdict(clean, robust, threshold)})
        if "over_seeds" in c:
            o = c["over_seeds"]
            rows.append({"fine-tuned": label, "seeds": f"mean over {', '.join(map(str, c['seeds']))}", "alpha": None, "test images": None,
                         "clean change [95% CI]": interval_text({**o["clean"], "diff": o["clean"]["mean"]}),
                         "robust change [95% CI]": interval_text({**o["robust"], "diff": o["robust"]["mean"]}),
                         "verdict": ""})
            pooled = c["pooled"]
            rows.append({"fine-tuned": label, "seeds": f"pooled {', '.join(map(str, c['seeds']))}", "alpha": None,
                         "test images": pooled["clean"]["n"], "clean change [95% CI]": interval_text(pooled["clean"]),
                         "robust change [95% CI]": interval_text(pooled["robust"]),
                         "verdict": _verdict(pooled["clean"], pooled["robust"], threshold)})
    return pd.DataFrame(rows)


def study_confirmation_sentence(study: Mapping[str, Any]) -> str:
    """What the seed-0 Table 3 wins became on the other seeds, in plain words from the numbers ("" when there were none)."""
    found = (study.get("headline") or {}).get("confirmations") or []
    threshold = study["provenance"]["threshold"]
    parts = []
    for c in found:
        label = TABLE3_LABELS.get(c["variant"], c["variant"])
        first = next(r for r in c["rows"] if r["seed"] == 0)
        params = first["params"]
        head = (f"Among the paper's Table 3 choices, fine-tuning the {label} ({params} weights) instead of the least critical module "
                f"won on seed 0's test split (clean {interval_text(_test_change(first, 'clean'))}, robust {first['test_robust_change']:+.2f} points)")
        if "pooled" not in c:
            parts.append(head + "; one seed among several comparisons can win by chance, and its repetition on the other seeds has not run")
            continue
        pooled, over = c["pooled"], c["over_seeds"]
        holds = _verdict(pooled["clean"], pooled["robust"], threshold) == "gain"
        parts.append(head + f". Run again unchanged on seeds {', '.join(str(s) for s in c['seeds'] if s != 0)} (a check fixed before they were seen), "
                     f"it changes clean accuracy by {over['clean']['mean']:+.2f} points on average over seeds "
                     f"{', '.join(map(str, c['seeds']))} ([{over['clean']['ci_low']:+.2f}, {over['clean']['ci_high']:+.2f}]) and by "
                     f"{interval_text(pooled['clean'])} pooled over {pooled['clean']['n']} paired test images, "
                     f"robust {interval_text(pooled['robust'])}: "
                     + ("the gain holds when pooled over the seeds" if holds else "the seed-0 win does not hold up"))
    return ". ".join(parts) + ("." if parts else "")



def study_tie_check(study: Mapping[str, Any], tolerance_images: int = 2) -> pd.DataFrame:
    """Re-evaluate the study's committed checkpoints (the headline's AT and fine-tuned weights, fp16) on the first test
    images with the attack stored beside them, and set the result against the stored numbers.

    The stored numbers were measured when the study was summarised, by this code on these files; a
    CPU of another kind or another thread count can round a few images differently, hence
    ``tolerance_images``. Returns one row per (model, metric): stored, re-evaluated, the difference in
    images and whether it is within the tolerance."""
    from ..checkpoint import read_checkpoint
    from ..data import ImageSet, load_dataset
    from ..evaluation.robust import compare, evaluate
    from ..models import build_model

    ck = study["checkpoints"]
    tie, cfg = ck["tie_check"], ck["config"]
    folder = Path(study["_folder"])
    splits = load_dataset(cfg["dataset"], val_size=cfg["val_size"], train_subset=cfg["train_subset"])
    info = splits.info

    def model(state: Mapping[str, torch.Tensor]) -> nn.Module:
        net = build_model(cfg["model"], info.num_classes, info.channels, info.image_size, cfg["width"], info.mean, info.std)
        net.load_state_dict(state)
        return net.eval()

    states = {tag: {k: (v.float() if v.is_floating_point() else v) for k, v in read_checkpoint(folder / ck["files"][tag])["model_state"].items()}
              for tag in ("at", "ft")}
    first = ImageSet(splits.test.images[:tie["images"]], splits.test.labels[:tie["images"]])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as when the numbers were stored
    try:
        result = compare(model(states["at"]), model(interpolate(states["at"], states["ft"], ck["alpha"])), Batches(first, tie["batch"]),
                         cfg["eps"], cfg["step"], cfg["eval_steps"], tie["restarts"], seed=tie["seed"])
        measured = {"at": result["a"], "rift": result["b"]}
        if "ft" in tie:  # the fine-tuned weights themselves (alpha 1): checked even where the chosen alpha is 0
            # one seed gives every image the same random start in `evaluate` as in `compare`: AT is not attacked again
            measured["ft"] = evaluate(model(states["ft"]), Batches(first, tie["batch"]), cfg["eps"], cfg["step"], cfg["eval_steps"],
                                      tie["restarts"], seed=tie["seed"])
    finally:
        torch.set_num_threads(threads)
    rows = []
    for tag, key in (("AT", "at"), ("AT+RiFT", "rift"), ("fine-tuned (alpha 1)", "ft")):
        if key not in measured:
            continue
        for metric in ("clean_acc", "robust_acc"):
            stored, now = tie[key][metric], measured[key][metric]
            images = round(abs(stored - now) * tie["images"] / 100)
            rows.append({"model": tag, "metric": metric, "stored": stored, "re-evaluated": now, "difference (images)": images,
                         f"agrees (within {tolerance_images} images)": images <= tolerance_images})
    return pd.DataFrame(rows)
