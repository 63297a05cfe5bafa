"""Which weights to fine-tune? The paper's ablations (Tables 3 and 4), each run like RiFT itself.

Every variant fine-tunes some weights of the AT model on clean data (same schedule as RiFT),
chooses alpha on the validation curve with the same rule, and reports validation and test
accuracy. The variants:

    at          the AT model itself (no fine-tuning; alpha 0): the reference row
    all         the weights of every Conv2d and Linear module together
    last        the final Linear layer
    most        the most robust-critical module (highest MRC)
    topk        the k least robust-critical modules together
    least       the least robust-critical module: RiFT
    least3x3    the least robust-critical 3x3 convolution (a departure from the paper's definition,
                which ranks every module: the paper's chosen modules all happen to be 3x3 convolutions,
                while on small networks the least critical module is often a 1x1 shortcut)
    no-interp   RiFT without interpolation: the fine-tuned model itself (alpha 1)

Every row reports its validation and test changes against the AT model on the same images and
random starts, with exact paired 95% intervals (:func:`riftlab.stats.paired_difference`).

As in RiFT, only Conv2d / Linear weights train: biases, BatchNorm affine parameters and BatchNorm
statistics stay those of the AT model (unless ``cfg.update_bn_stats``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
import torch.nn as nn

from ._loop import SweepProgress
from .checkpoint import read_checkpoint
from .data import Batches
from .evaluation import evaluate
from .interpolation import interpolate
from .models import weight_modules
from .stats import paired_difference
from .pipeline import RiftConfig, _write_csv, choose_alpha, evaluate_on_test, finetune_step

__all__ = ["VARIANTS", "ablate", "ablation_table", "variant_modules"]

VARIANTS = ("at", "all", "last", "most", "topk", "least", "least3x3", "no-interp")

COLUMNS = ["variant", "modules", "n_modules", "params", "alpha", "val_clean_acc", "val_robust_acc", "test_clean_acc", "test_robust_acc",
           *[f"{split}_{kind}_{what}" for split in ("val", "test") for kind in ("clean", "robust")
             for what in ("change", "ci_low", "ci_high", "gained", "lost")]]


def _by_criticality(mrc_table: pd.DataFrame) -> list[str]:
    """Module names from least to most robust-critical (ties keep the table's order)."""
    missing = {"module", "mrc"} - set(mrc_table.columns)
    if missing or mrc_table.empty:
        raise ValueError(f"the MRC table needs rows with columns 'module' and 'mrc' (as mrc.csv has); missing {sorted(missing) or 'rows'}")
    return [str(m) for m in mrc_table.sort_values("mrc", kind="mergesort")["module"]]


def variant_modules(model: nn.Module, mrc_table: pd.DataFrame, variant: str, k: int = 3) -> list[str]:
    """The exact module names a variant fine-tunes (``[]`` for ``at``).

    Args:
        model: the AT model (gives the module names and the final Linear).
        mrc_table: MRC per module, columns ``module`` and ``mrc`` (any order).
        variant: one of :data:`VARIANTS`.
        k: how many of the least critical modules ``topk`` fine-tunes.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown ablation variant {variant!r}; choices: {', '.join(VARIANTS)}")
    names = [n for n, _ in weight_modules(model)]
    if variant == "at":
        return []
    if variant == "all":
        return names
    if variant == "last":
        linears = [n for n, m in weight_modules(model) if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("the model has no Linear layer for the 'last' variant")
        return linears[-1:]
    ranked = _by_criticality(mrc_table)
    unknown = sorted(set(ranked) - set(names))
    if unknown:
        raise ValueError(f"the MRC table names modules this model does not have ({', '.join(unknown[:3])}); "
                         "was it computed for another model?")
    if variant == "most":
        return ranked[-1:]
    if variant == "least3x3":
        convs = dict(weight_modules(model))
        three = [n for n in ranked if isinstance(convs[n], nn.Conv2d) and tuple(convs[n].kernel_size) == (3, 3)]
        if not three:
            raise ValueError("the model has no 3x3 convolution for the 'least3x3' variant")
        return three[:1]
    if variant == "topk":
        if not 1 <= k <= len(ranked):
            raise ValueError(f"k must be between 1 and the number of modules in the MRC table ({len(ranked)}), got {k}")
        return ranked[:k]
    return ranked[:1]  # least and no-interp


def _fingerprint(model: nn.Module) -> str:
    """A short hash of the model's weights, so saved work of another AT model is never reused."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def ablate(
    model_at: nn.Module,
    mrc_table: pd.DataFrame,
    train: Batches,
    val: Batches,
    test: Batches,
    cfg: RiftConfig,
    variants: Sequence[str] = VARIANTS,
    k: int = 3,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    log: Callable[[str], None] = print,
    reference_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Run the ablation ``variants`` on ``model_at`` and return one row per variant.

    Each fine-tuned variant runs RiFT's own steps (:func:`riftlab.pipeline.finetune_step`,
    :func:`~riftlab.pipeline.choose_alpha`, :func:`~riftlab.pipeline.evaluate_on_test`) with
    ``cfg``'s settings: fine-tuning on ``train`` (augmented clean batches) with the best epoch on
    ``val``, alpha chosen on the ``val`` curve by the paper's rule, then test accuracy (clean and
    PGD, worst of ``cfg.eval_restarts``) of the interpolated model. ``no-interp`` reuses the
    fine-tuned model of ``least`` at alpha 1.

    Columns: ``variant``, ``modules`` (names joined by ``+``), ``n_modules``, ``alpha``,
    ``val_clean_acc``, ``val_robust_acc``, ``test_clean_acc``, ``test_robust_acc`` (percent).

    With ``out_dir``, each variant's work lives in ``out_dir/<variant>/`` (fine-tuning epochs,
    the fine-tuned weights, the validation curve ``interpolation.csv``, test progress, and the
    finished row ``result.pt``), written atomically; with ``resume=True`` a rerun skips finished
    variants and continues an interrupted one where it stopped. Saved work of other settings (or
    of another AT model) is refused, not mixed in. ``model_at`` is not modified. The AT model's own
    per-image validation and test results, against which every row's change is measured, are
    kept in ``reference_dir`` (default ``out_dir``), where ablations of other settings reuse them.
    """
    cfg = cfg if cfg.eps is not None and cfg.step is not None else cfg.resolved()
    variants = list(variants)
    if not variants:
        raise ValueError(f"no ablation variants given; choices: {', '.join(VARIANTS)}")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown ablation variant {v!r}; choices: {', '.join(VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"ablation variants repeat: {', '.join(variants)}")
    modules = {v: variant_modules(model_at, mrc_table, v, k) for v in variants}  # every bad input fails before any work
    root = Path(out_dir) if out_dir is not None else None
    if root is not None and not resume and root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} holds earlier ablation work; pass resume=True to continue it, or remove it")

    work = copy.deepcopy(model_at).eval()
    theta_at = {k_: v.detach().clone() for k_, v in model_at.state_dict().items()}
    base = {"at_model": _fingerprint(model_at), "dataset": cfg.dataset, "seed": cfg.seed, "train_n": train.num_examples,
            "batch_size": train.batch_size, "ft_epochs": cfg.ft_epochs, "ft_lr": cfg.ft_lr, "update_bn_stats": cfg.update_bn_stats}
    evaluation = {"eps": cfg.eps, "step": cfg.step, "eval_steps": cfg.eval_steps, "val_restarts": cfg.val_restarts,
                  "eval_restarts": cfg.eval_restarts, "alphas": list(cfg.alphas), "threshold": cfg.threshold,
                  "val_n": val.num_examples, "test_n": test.num_examples}
    finetuned: dict[str, dict[str, torch.Tensor]] = {}

    def fine_tuned(key: str, names: list[str]) -> dict[str, torch.Tensor]:
        """The fine-tuned weights of ``names`` (work saved in ``root/key``), computed once per key."""
        if key not in finetuned:
            folder = root / key if root is not None else None
            saved = SweepProgress(folder / "ft.pt" if folder is not None else None, {**base, "modules": names})
            state = saved.load()
            if "model_state" not in state:
                saved.save({})  # claims the folder for these settings before any epoch is written
                ft = finetune_step(cfg, model_at, names, train, val, out_dir=folder / "ft" if folder is not None else None)
                state = {"model_state": ft.model.state_dict(), "best_epoch": ft.best_epoch}
                saved.save(state)
            finetuned[key] = state["model_state"]
        return finetuned[key]

    shared = Path(reference_dir) if reference_dir is not None else root

    def reference(split: str) -> dict[str, torch.Tensor]:
        """The AT model's per-image results on ``split`` (the curves' alpha 0 on val; the reported test attack).

        They depend on the AT model, the data and the attack only, so ablations with other fine-tuning
        settings share them (``reference_dir``); the file name carries a hash of those settings."""
        settings = {"at_model": base["at_model"], "dataset": cfg.dataset, "seed": cfg.seed, **evaluation, "split": split}
        key = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
        path = shared / f"at-{split}-{key}.pt" if shared is not None else None
        saved = SweepProgress(path, settings)
        state = saved.load()
        if "masks" not in state:
            work.load_state_dict(theta_at)
            data = val if split == "val" else test
            result = (evaluate(work, data, cfg.eps, cfg.step, cfg.eval_steps, cfg.val_restarts, seed=cfg.seed, per_image=True)
                      if split == "val" else evaluate_on_test(cfg, work, data, per_image=True))
            state = {"masks": {k: result[f"{k}_correct"] for k in ("clean", "robust")}}
            saved.save(state)
        return state["masks"]

    trained = dict(weight_modules(model_at))
    rows = []
    for variant in variants:
        names = modules[variant]
        folder = root / variant if root is not None else None
        result = SweepProgress(folder / "result.pt" if folder is not None else None, {**base, **evaluation, "variant": variant, "modules": names})
        state = result.load()
        if "row" in state:
            log(f"{variant}: done earlier, reusing {folder / 'result.pt'}")
            rows.append(state["row"])
            continue
        result.save({})
        test_progress = folder / "test.pt" if folder is not None else None
        at_val = reference("val")
        if variant == "at":
            alpha, val_masks = 0.0, at_val
        else:
            theta_ft = fine_tuned("least" if variant == "no-interp" else variant, names)
            if variant == "no-interp":
                work.load_state_dict(theta_ft)
                val_acc = evaluate(work, val, cfg.eps, cfg.step, cfg.eval_steps, cfg.val_restarts, seed=cfg.seed, per_image=True)  # = the curve's alpha 1
                alpha, val_masks = 1.0, {k: val_acc[f"{k}_correct"] for k in ("clean", "robust")}
            else:
                curve, choice, val_masks = _curve_with_masks(cfg, work, theta_at, theta_ft, val,
                                                             folder / "interpolation.pt" if folder is not None else None)
                if folder is not None:
                    _write_csv(folder / "interpolation.csv", curve)
                alpha = choice["alpha"]
            work.load_state_dict(interpolate(theta_at, theta_ft, alpha))
        test_acc = evaluate_on_test(cfg, work, test, checkpoint_path=test_progress, per_image=True)
        at_test = reference("test")
        row = {"variant": variant, "modules": "+".join(names), "n_modules": len(names),
               "params": sum(trained[n].weight.numel() for n in names), "alpha": float(alpha),
               "val_clean_acc": 100.0 * int(val_masks["clean"].sum()) / len(val_masks["clean"]),
               "val_robust_acc": 100.0 * int(val_masks["robust"].sum()) / len(val_masks["robust"]),
               "test_clean_acc": float(test_acc["clean_acc"]), "test_robust_acc": float(test_acc["robust_acc"])}
        for split, ours, theirs in (("val", val_masks, at_val), ("test", {k: test_acc[f"{k}_correct"] for k in ("clean", "robust")}, at_test)):
            for kind in ("clean", "robust"):
                d = paired_difference(theirs[kind], ours[kind])
                row.update({f"{split}_{kind}_change": d["diff"], f"{split}_{kind}_ci_low": d["ci_low"], f"{split}_{kind}_ci_high": d["ci_high"],
                            f"{split}_{kind}_gained": d["gained"], f"{split}_{kind}_lost": d["lost"]})
        result.save({"row": row})
        log(f"{variant}: alpha {row['alpha']}, val {row['val_clean_acc']:.2f} / {row['val_robust_acc']:.2f}, "
            f"test {row['test_clean_acc']:.2f} / {row['test_robust_acc']:.2f} (clean / robust); test change vs AT: clean "
            f"{row['test_clean_change']:+.2f} [{row['test_clean_ci_low']:+.2f}, {row['test_clean_ci_high']:+.2f}], robust "
            f"{row['test_robust_change']:+.2f} [{row['test_robust_ci_low']:+.2f}, {row['test_robust_ci_high']:+.2f}]")
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def _curve_with_masks(cfg: RiftConfig, work: nn.Module, theta_at: dict[str, torch.Tensor], theta_ft: dict[str, torch.Tensor], val: Batches,
                      checkpoint_path: Path | None) -> tuple[pd.DataFrame, dict[str, float], dict[str, torch.Tensor]]:
    """RiFT's validation curve and choice, and the chosen alpha's per-image validation results (from the curve's saved sweep)."""
    curve, choice = choose_alpha(cfg, work, theta_at, theta_ft, val, checkpoint_path=checkpoint_path)
    if checkpoint_path is not None:
        masks = read_checkpoint(checkpoint_path)["state"]["masks"][list(cfg.alphas).index(choice["alpha"])]
    else:  # no saved sweep to read: evaluate the chosen point again (same seed, so the same results)
        work.load_state_dict(interpolate(theta_at, theta_ft, choice["alpha"]))
        result = evaluate(work, val, cfg.eps, cfg.step, cfg.eval_steps, cfg.val_restarts, seed=cfg.seed, per_image=True)
        masks = {k: result[f"{k}_correct"] for k in ("clean", "robust")}
    return curve, choice, masks


def ablation_table(frame: pd.DataFrame, width: int = 40) -> str:
    """The ablation rows as text: accuracies, and each variant's test change against AT with its paired 95% interval."""
    shown = frame.copy()
    shown["modules"] = [m if len(m) <= width else m[: width - 3] + "..." for m in shown["modules"].fillna("")]
    for kind in ("clean", "robust"):
        if f"test_{kind}_change" in shown:
            shown[f"test {kind} vs AT"] = [f"{c:+.2f} [{lo:+.2f}, {hi:+.2f}]" for c, lo, hi in
                                           zip(shown[f"test_{kind}_change"], shown[f"test_{kind}_ci_low"], shown[f"test_{kind}_ci_high"])]
    keep = [c for c in ("variant", "modules", "params", "alpha", "val_clean_acc", "val_robust_acc", "test_clean_acc", "test_robust_acc",
                        "test clean vs AT", "test robust vs AT") if c in shown]
    return shown[keep].to_string(index=False, float_format=lambda v: f"{v:.2f}")
