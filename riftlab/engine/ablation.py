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
    module      the module ``cfg.ft_module`` names (``--module``), e.g. the paper's ResNet-18 choice ``layer2.1.conv2``

Every row reports its validation and test changes against the AT model on the same images and
random starts, with paired 95% intervals (:func:`riftlab.stats.paired_difference`).

As in RiFT, only Conv2d / Linear weights train: biases, BatchNorm affine parameters and BatchNorm
statistics stay those of the AT model (unless ``cfg.update_bn_stats``). The fine-tuning protocol is
``cfg``'s (:data:`riftlab.engine.config.FT_PROTOCOLS`): with ``cfg.bn_recalibration_only`` a variant's
schedule moves BatchNorm's statistics alone (its ``params`` column is then 0), and with
``cfg.report_test_selection`` every fine-tuned variant's row also holds what choosing its epoch and
alpha on test would report (``test_selected_*`` columns; :func:`riftlab.engine.pipeline.reference_test_selection`).
"""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any, Callable, Sequence

import pandas as pd
import torch
import torch.nn as nn

from ..checkpoint import read_checkpoint
from ..data import Batches
from ..evaluation.stats import paired_difference
from ..models import weight_modules
from ..steps.interpolation import interpolate
from .config import RiftConfig, attack_seed, precision_params
from .pipeline import (choose_alpha, evaluate_split, finetune, fold_params, ft_milestones, ft_params, reference_test_selection,
                       without_masks)
from .runner import RunDir, Stage, StageContext, fingerprint, state_digest

__all__ = ["VARIANTS", "PAPER_VARIANTS", "ablate", "ablation_table", "check_variants", "variant_modules"]

PAPER_VARIANTS = ("at", "all", "last", "most", "topk", "least", "least3x3", "no-interp")  # what ablate runs by default
VARIANTS = (*PAPER_VARIANTS, "module")  # every choice: "module" needs cfg.ft_module

COLUMNS = ["variant", "modules", "n_modules", "params", "alpha", "val_clean_acc", "val_robust_acc", "test_clean_acc", "test_robust_acc",
           *[f"{split}_{kind}_{what}" for split in ("val", "test") for kind in ("clean", "robust")
             for what in ("change", "ci_low", "ci_high", "gained", "lost")],
           # with cfg.report_test_selection: the reference code's choice of epoch and alpha on test, and its zero-effect null
           "test_selected_epoch", "test_selected_alpha", "test_selected_clean_change", "test_selected_robust_change",
           "test_selected_null_mean", "test_selected_null_p95", "test_selected_p_value"]


def _by_criticality(mrc_table: pd.DataFrame) -> list[str]:
    """Module names from least to most robust-critical (ties keep the table's order)."""
    missing = {"module", "mrc"} - set(mrc_table.columns)
    if missing or mrc_table.empty:
        raise ValueError(f"the MRC table needs rows with columns 'module' and 'mrc' (as mrc.csv has); missing {sorted(missing) or 'rows'}")
    return [str(m) for m in mrc_table.sort_values("mrc", kind="mergesort")["module"]]


def variant_modules(model: nn.Module, mrc_table: pd.DataFrame, variant: str, k: int = 3, module: str | None = None) -> list[str]:
    """The exact module names a variant fine-tunes (``[]`` for ``at``).

    Args:
        model: the AT model (gives the module names and the final Linear).
        mrc_table: MRC per module, columns ``module`` and ``mrc`` (any order).
        variant: one of :data:`VARIANTS`.
        k: how many of the least critical modules ``topk`` fine-tunes.
        module: the exact module name the ``module`` variant fine-tunes (e.g. ``layer2.1.conv2``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown ablation variant {variant!r}; choices: {', '.join(VARIANTS)}")
    names = [n for n, _ in weight_modules(model)]
    if variant == "at":
        return []
    if variant == "module":
        if module is None:
            raise ValueError("the 'module' variant fine-tunes the module --module names (e.g. --module layer2.1.conv2); none was given")
        if module not in names:
            raise ValueError(f"unknown module {module!r}; valid modules: {', '.join(names)}")
        return [module]
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


def check_variants(variants: Sequence[str]) -> list[str]:
    """``variants`` as a list when each is one of :data:`VARIANTS`, once; else a ValueError naming the first bad one."""
    variants = list(variants)
    if not variants:
        raise ValueError(f"no ablation variants given; choices: {', '.join(VARIANTS)}")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown ablation variant {v!r}; choices: {', '.join(VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"ablation variants repeat: {', '.join(variants)}")
    return variants


def ablate(
    model_at: nn.Module,
    mrc_table: pd.DataFrame,
    train: Batches,
    val: Batches,
    test: Batches,
    cfg: RiftConfig,
    variants: Sequence[str] = PAPER_VARIANTS,
    k: int = 3,
    out_dir: str | os.PathLike | None = None,
    name: str = "ablation",
    resume: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Run the ablation ``variants`` on ``model_at`` and return one row per variant.

    Each fine-tuned variant runs RiFT's own steps (:func:`riftlab.engine.pipeline.finetune`,
    :func:`~riftlab.engine.pipeline.choose_alpha`, :func:`~riftlab.engine.pipeline.evaluate_split`)
    with ``cfg``'s settings: fine-tuning on ``train`` (augmented clean batches, as
    :func:`~riftlab.engine.pipeline.finetune_batches` makes them for ``cfg``'s protocol) with the best epoch
    on ``val``, alpha chosen on the ``val`` curve by the paper's rule, then test accuracy (clean and
    PGD, worst of ``cfg.eval_restarts``) of the interpolated model. ``no-interp`` reuses the
    fine-tuned model of ``least`` at alpha 1.

    Columns: ``variant``, ``modules`` (names joined by ``+``), ``n_modules``, ``params`` (weights
    fine-tuned), ``alpha``, ``val_clean_acc``, ``val_robust_acc``, ``test_clean_acc``,
    ``test_robust_acc`` (percent) and, for each split and kind, the change against the AT model on
    the same images with its paired 95% interval and the images gained and lost.

    The work is kept as stages of the run directory ``out_dir`` (:mod:`riftlab.engine.runner`;
    a temporary folder when None): ``<name>/finetune/<variant>`` (the fine-tuned weights),
    ``<name>/<variant>`` (its validation curve and test evaluation) and ``reference/...`` (the AT
    model's own per-image results, shared by ablations of other settings). A rerun reuses finished
    variants, continues an interrupted one where it stopped (``resume``), and refuses saved work of
    other settings or of another AT model by name (``overwrite`` redoes it). ``model_at`` is not modified.
    """
    cfg = cfg.resolved()  # every setting checked (the dataset's defaults kept when already filled in)
    variants = check_variants(variants)
    modules = {v: variant_modules(model_at, mrc_table, v, k, cfg.ft_module) for v in variants}  # every bad input fails before any work
    if cfg.ft_protocol == "reference" and getattr(train, "crop_mode", "zeros") != "reflect":
        raise ValueError("the reference protocol fine-tunes on reflect-padded crops: pass riftlab.engine.pipeline.finetune_batches(cfg, ...) "
                         "as train")
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="riftlab-ablation-") as tmp:
            return ablate(model_at, mrc_table, train, val, test, cfg, variants, k, tmp, name, resume, overwrite, log)
    run = RunDir(out_dir, resume=resume, overwrite=overwrite, log=log, batch_save_interval=2.0)
    job = _Ablation(run, name, model_at, train, val, test, cfg)
    rows = [job.row(variant, modules[variant]) for variant in variants]
    return pd.DataFrame(rows, columns=COLUMNS)


class _Ablation:
    """The stages of one ablation (see :func:`ablate`)."""

    def __init__(self, run: RunDir, name: str, model_at: nn.Module, train: Batches, val: Batches, test: Batches, cfg: RiftConfig):
        self.run, self.name, self.cfg = run, name, cfg
        self.model_at, self.train, self.val, self.test = model_at, train, val, test
        self.work = copy.deepcopy(model_at).eval()
        self.theta_at = {k: v.detach().clone() for k, v in model_at.state_dict().items()}
        device = next(model_at.parameters()).device
        self.common = {"at_model": state_digest(model_at.state_dict()), "dataset": cfg.dataset, "train_n": train.num_examples,
                       "val_n": val.num_examples, "test_n": test.num_examples, **precision_params(cfg, device)}
        self.evaluation = {"eps": cfg.eps, "step": cfg.step, "eval_steps": cfg.eval_steps, "val_restarts": cfg.val_restarts,
                           "eval_restarts": cfg.eval_restarts, "eval_batch_size": val.batch_size, "val_seed": attack_seed(cfg, "val"),
                           "test_seed": attack_seed(cfg, "test"), **fold_params(cfg)}

    def reference(self, split: str) -> dict[str, torch.Tensor]:
        """The AT model's per-image results on ``split`` (the curves' alpha 0 on validation; the reported test attack)."""
        params = {**self.common, **self.evaluation, "split": split}
        stage_name = f"reference/at-{split}-{fingerprint(params)[:8]}"
        out = f"{stage_name}.pt"

        def compute(ctx: StageContext) -> dict[str, Any]:
            self.work.load_state_dict(self.theta_at)
            result = evaluate_split(self.cfg, self.work, self.val if split == "val" else self.test, split, per_image=True, state=ctx.state)
            ctx.save_checkpoint(out, {k: result[f"{k}_correct"] for k in ("clean", "robust")})
            return without_masks(result)

        self.run.run(Stage(stage_name, params, compute, outputs=(out,)))
        return read_checkpoint(self.run.path / out)

    def fine_tuned(self, key: str, names: list[str]) -> dict[str, torch.Tensor]:
        """The fine-tuned weights of ``names`` (stage ``<name>/finetune/<key>``)."""
        cfg = self.cfg
        params = {**self.common, "modules": names, "seed": cfg.seed, "batch_size": self.train.batch_size, "ft_epochs": cfg.ft_epochs,
                  "ft_lr": cfg.ft_lr, "ft_milestones": ft_milestones(cfg), "update_bn_stats": cfg.update_bn_stats, **ft_params(cfg)}
        folder = f"{self.name}/finetune/{key}"
        kept = (f"{folder}/ft_epochs.pt",) if cfg.report_test_selection else ()

        def compute(ctx: StageContext) -> dict[str, Any]:
            ft = finetune(cfg, self.model_at, names, self.train, self.val, state=ctx.state)
            ctx.save_checkpoint(f"{folder}/ft.pt", {"model_state": ft.model.state_dict(), "best_epoch": ft.best_epoch})
            ctx.write_csv(f"{folder}/finetune.csv", pd.DataFrame(ft.history))
            if kept:
                ctx.save_checkpoint(kept[0], {"epochs": ft.epoch_states})
            return {"best_epoch": ft.best_epoch}

        self.run.run(Stage(folder, params, compute, outputs=(f"{folder}/ft.pt", f"{folder}/finetune.csv", *kept)))
        return read_checkpoint(self.run.path / folder / "ft.pt")["model_state"]

    def row(self, variant: str, names: list[str]) -> dict[str, Any]:
        cfg = self.cfg
        at_val, at_test = self.reference("val"), self.reference("test")
        key = "least" if variant == "no-interp" else variant
        theta_ft = self.fine_tuned(key, names) if variant != "at" else None
        folder = f"{self.name}/{variant}"
        selects = cfg.report_test_selection and variant not in ("at", "no-interp")  # the reference code's test choices
        params = {**self.common, **self.evaluation, "variant": variant, "modules": names, "alphas": list(cfg.alphas),
                  "threshold": cfg.threshold, **({"test_selection": True} if selects else {})}
        inputs = (f"{self.name}/finetune/{key}",) if theta_ft is not None else ()
        outputs = (f"{folder}/result.json", f"{folder}/correct.pt") + ((f"{folder}/interpolation.csv",) if variant not in ("at", "no-interp") else ())
        outputs += (f"{folder}/test_selection.json",) if selects else ()

        def compute(ctx: StageContext) -> dict[str, Any]:
            if variant == "at":
                alpha, val_masks = 0.0, at_val
            elif variant == "no-interp":
                self.work.load_state_dict(theta_ft)
                result = evaluate_split(cfg, self.work, self.val, "val", per_image=True, state=ctx.state.child("val"))  # = the curve's alpha 1
                alpha, val_masks = 1.0, {k: result[f"{k}_correct"] for k in ("clean", "robust")}
            else:
                curve, choice, masks = choose_alpha(cfg, self.work, self.theta_at, theta_ft, self.val, state=ctx.state.child("curve"))
                ctx.write_csv(f"{folder}/interpolation.csv", curve)
                alpha, val_masks = choice["alpha"], masks[list(cfg.alphas).index(choice["alpha"])]
            self.work.load_state_dict(interpolate(self.theta_at, theta_ft, alpha) if theta_ft is not None else self.theta_at)
            test = evaluate_split(cfg, self.work, self.test, "test", per_image=True, state=ctx.state.child("test"))
            test_masks = {k: test[f"{k}_correct"] for k in ("clean", "robust")}
            ctx.save_checkpoint(f"{folder}/correct.pt", {"val": val_masks, "test": test_masks})
            row = _row(variant, names, self.model_at, alpha, {"val": (val_masks, at_val), "test": (test_masks, at_test)})
            if cfg.bn_recalibration_only:
                row["params"] = 0  # the schedule ran, but no weight trained: only BatchNorm's statistics moved
            if selects:
                epochs = read_checkpoint(self.run.path / self.name / "finetune" / key / "ft_epochs.pt")["epochs"]
                chosen, _ = reference_test_selection(cfg, self.work, self.theta_at, epochs, at_test, self.test, ctx.state.child("selection"))
                ctx.write_json(f"{folder}/test_selection.json", chosen)
                row.update({"test_selected_epoch": chosen["epoch"], "test_selected_alpha": chosen["alpha"],
                            "test_selected_clean_change": chosen["clean_gain"], "test_selected_robust_change": chosen["robust_change"],
                            "test_selected_null_mean": chosen["null"]["mean"], "test_selected_null_p95": chosen["null"]["p95"],
                            "test_selected_p_value": chosen["null"]["p_value"]})
            ctx.write_json(f"{folder}/result.json", row)
            return row

        row = self.run.run(Stage(folder, params, compute, inputs=inputs, outputs=outputs))
        if self.run.log is not None:
            self.run.log(f"{variant}: alpha {row['alpha']}, val {row['val_clean_acc']:.2f} / {row['val_robust_acc']:.2f}, "
                         f"test {row['test_clean_acc']:.2f} / {row['test_robust_acc']:.2f} (clean / robust); test change vs AT: clean "
                         f"{row['test_clean_change']:+.2f} [{row['test_clean_ci_low']:+.2f}, {row['test_clean_ci_high']:+.2f}], robust "
                         f"{row['test_robust_change']:+.2f} [{row['test_robust_ci_low']:+.2f}, {row['test_robust_ci_high']:+.2f}]")
        return row


def _row(variant: str, names: list[str], model_at: nn.Module, alpha: float,
         masks: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]) -> dict[str, Any]:
    """One table row: accuracies from exact counts, and each change against the AT model with its paired interval."""
    trained = dict(weight_modules(model_at))
    row: dict[str, Any] = {"variant": variant, "modules": "+".join(names), "n_modules": len(names),
                           "params": sum(trained[n].weight.numel() for n in names), "alpha": float(alpha)}
    for split in ("val", "test"):
        ours = masks[split][0]
        for kind in ("clean", "robust"):
            row[f"{split}_{kind}_acc"] = 100.0 * int(ours[kind].sum()) / len(ours[kind])
    for split in ("val", "test"):
        ours, theirs = masks[split]
        for kind in ("clean", "robust"):
            d = paired_difference(theirs[kind], ours[kind])
            row.update({f"{split}_{kind}_change": d["diff"], f"{split}_{kind}_ci_low": d["ci_low"], f"{split}_{kind}_ci_high": d["ci_high"],
                        f"{split}_{kind}_gained": d["gained"], f"{split}_{kind}_lost": d["lost"]})
    return row


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
