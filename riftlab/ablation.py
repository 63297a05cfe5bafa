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
    no-interp   RiFT without interpolation: the fine-tuned model itself (alpha 1)

As in RiFT, only Conv2d / Linear weights train: biases, BatchNorm affine parameters and BatchNorm
statistics stay those of the AT model (unless ``cfg.update_bn_stats``).
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
import torch.nn as nn

from ._loop import SweepProgress
from .data import Batches
from .evaluation import evaluate
from .interpolation import interpolate
from .models import weight_modules
from .pipeline import RiftConfig, _write_csv, choose_alpha, evaluate_on_test, finetune_step

__all__ = ["VARIANTS", "ablate", "ablation_table", "variant_modules"]

VARIANTS = ("at", "all", "last", "most", "topk", "least", "no-interp")

COLUMNS = ["variant", "modules", "n_modules", "alpha", "val_clean_acc", "val_robust_acc", "test_clean_acc", "test_robust_acc"]


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
    of another AT model) is refused, not mixed in. ``model_at`` is not modified.
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
        if variant == "at":
            work.load_state_dict(theta_at)
            val_acc = evaluate(work, val, cfg.eps, cfg.step, cfg.eval_steps, cfg.val_restarts, seed=cfg.seed)  # = the curves' alpha 0
            alpha, val_clean, val_robust = 0.0, val_acc["clean_acc"], val_acc["robust_acc"]
        else:
            theta_ft = fine_tuned("least" if variant == "no-interp" else variant, names)
            if variant == "no-interp":
                work.load_state_dict(theta_ft)
                val_acc = evaluate(work, val, cfg.eps, cfg.step, cfg.eval_steps, cfg.val_restarts, seed=cfg.seed)  # = the curve's alpha 1
                alpha, val_clean, val_robust = 1.0, val_acc["clean_acc"], val_acc["robust_acc"]
            else:
                curve, choice = choose_alpha(cfg, work, theta_at, theta_ft, val,
                                             checkpoint_path=folder / "interpolation.pt" if folder is not None else None)
                if folder is not None:
                    _write_csv(folder / "interpolation.csv", curve)
                alpha, val_clean, val_robust = choice["alpha"], choice["clean_acc"], choice["robust_acc"]
            work.load_state_dict(interpolate(theta_at, theta_ft, alpha))
        test_acc = evaluate_on_test(cfg, work, test, checkpoint_path=test_progress)
        row = {"variant": variant, "modules": "+".join(names), "n_modules": len(names), "alpha": float(alpha),
               "val_clean_acc": float(val_clean), "val_robust_acc": float(val_robust),
               "test_clean_acc": float(test_acc["clean_acc"]), "test_robust_acc": float(test_acc["robust_acc"])}
        result.save({"row": row})
        log(f"{variant}: alpha {row['alpha']}, val {row['val_clean_acc']:.2f} / {row['val_robust_acc']:.2f}, "
            f"test {row['test_clean_acc']:.2f} / {row['test_robust_acc']:.2f} (clean / robust)")
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def ablation_table(frame: pd.DataFrame, width: int = 40) -> str:
    """The ablation rows as text, long module lists shortened to ``width`` characters."""
    shown = frame.copy()
    shown["modules"] = [m if len(m) <= width else m[: width - 3] + "..." for m in shown["modules"].fillna("")]
    return shown.to_string(index=False, float_format=lambda v: f"{v:.2f}")
