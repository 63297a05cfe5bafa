"""The whole RiFT pipeline as one function writing a run directory.

    AT model --(MRC on training adversarial examples)--> least robust-critical module
             --(fine-tune that weight on clean data)--> theta_FT
             --(interpolate, choose alpha on validation)--> theta_RiFT
             --(report clean / PGD robust accuracy on test)

Run directory layout::

    at/best.pt, at/last.pt      adversarial training (when trained here), resumable
    at.pt                       the AT model used
    mrc.csv                     MRC table, lowest first
    finetune.csv, ft.pt         fine-tuning history and the fine-tuned model
    interpolation.csv           validation curve over alpha
    rift.pt                     the final interpolated model
    results.json                configuration, chosen module and alpha, validation and test numbers
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn as nn

from . import __version__, distributed
from ._util import milestones_for, relative_distance, seed_everything
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .compute import check_precision, to_device
from .criticality import adversarial_set, module_robust_criticality
from .data import Batches, DataSplits, load_dataset
from .evaluation import compare, evaluate
from .finetune import FinetuneResult, finetune_module, get_weight_module
from .interpolation import DEFAULT_ALPHAS, interpolate, interpolation_curve, select_alpha
from .models import build_model
from .training import TrainResult, adversarial_train

__all__ = ["RiftConfig", "PROFILES", "run_rift", "prepare", "build_for", "adversarial_train_step", "finetune_step", "choose_alpha",
           "evaluate_on_test", "compare_on_test"]


@dataclass
class RiftConfig:
    """Every knob of a RiFT run. ``PROFILES`` holds named presets (``paper``, ``cpu``, ``demo``)."""

    dataset: str = "cifar10"
    model: str = "resnet18"
    width: int | None = None
    # A RobustBench model as the AT model (its architecture replaces `model`/`width`; see riftlab.zoo).
    robustbench: str | None = None
    threat_model: str = "Linf"
    model_dir: str = "models"  # RobustBench's folder: <model_dir>/<dataset>/<threat_model>/<name>.pt
    data_root: str | None = None
    download: bool = False
    device: str = "auto"
    seed: int = 0
    # data
    train_subset: int | None = None
    val_subset: int | None = None
    test_subset: int | None = None
    synthetic_sizes: tuple[int, int] | None = None
    val_size: int | None = None  # default: the dataset's (5000 for CIFAR)
    batch_size: int = 128
    eval_batch_size: int = 512
    # adversarial training
    at_epochs: int = 110
    at_lr: float = 0.1
    # epochs after which the lr drops x0.1 (default: the paper's 100 and 105 of 110, scaled to at_epochs)
    at_milestones: tuple[int, ...] | None = None
    at_attack_steps: int = 10
    at_attack_step: float | None = None  # default: the dataset's step
    at_eval_every: int = 1  # validate every k-th AT epoch (and the last); the best is chosen among those
    at_method: str = "pgd"  # pgd (PGD-AT), trades or mart (see riftlab.losses)
    at_beta: float = 6.0  # TRADES / MART robustness weight
    eps: float | None = None  # default: the dataset's eps
    step: float | None = None
    # MRC
    mrc_examples: int = 10000
    mrc_eps: float = 0.1
    mrc_passes: int = 10
    mrc_step_size: float | None = None
    # fine-tuning
    ft_epochs: int = 10
    ft_lr: float = 0.001
    ft_module: str | None = None  # default: the least robust-critical module
    update_bn_stats: bool = False
    # interpolation and evaluation
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    threshold: float = 0.1
    eval_steps: int = 10
    eval_restarts: int = 3
    val_restarts: int = 1
    # speed: bf16 autocast on CUDA ("auto"), "fp32" or "bf16" everywhere; torch.compile for training
    precision: str = "auto"
    compile: bool = False
    progress: bool = True

    def resolved(self) -> "RiftConfig":
        from .data import dataset_info

        info = dataset_info(self.dataset)
        cfg = dataclasses.replace(self)
        cfg.eps = info.eps if self.eps is None else self.eps
        cfg.step = info.step if self.step is None else self.step
        cfg.at_attack_step = cfg.step if self.at_attack_step is None else self.at_attack_step
        cfg.validate()
        return cfg

    def at_schedule(self) -> list[int]:
        """The adversarial-training lr milestones: ``at_milestones``, or the paper's scaled to ``at_epochs``."""
        if self.at_milestones is not None:
            return list(self.at_milestones)
        return milestones_for(self.at_epochs, 110, (100, 105))

    def validate(self) -> None:
        from .losses import AT_METHODS
        from .models import check_model_name

        _check_types(self)
        check_precision(self.precision)
        if self.robustbench is None:
            check_model_name(self.model)  # fail before the data is loaded
        if self.at_method not in AT_METHODS:
            raise ValueError(f"unknown at_method {self.at_method!r} (adversarial-training method); choices: {', '.join(AT_METHODS)}")
        if not 0 <= self.at_beta < float("inf"):
            raise ValueError(f"at_beta must be a finite number >= 0, got {self.at_beta}")
        if self.eps is not None and not 0 <= self.eps <= 1:
            raise ValueError(f"eps must be in [0, 1] (pixel units, e.g. 8/255 = 0.0314), got {self.eps}")
        if self.step is not None and not 0 < self.step <= 1:
            raise ValueError(f"step must be in (0, 1] (pixel units), got {self.step}")
        if not 0 <= self.mrc_eps <= 10:
            raise ValueError(f"mrc_eps is relative to the weight norm and must be in [0, 10], got {self.mrc_eps}")
        if self.at_milestones is not None and (list(self.at_milestones) != sorted(set(self.at_milestones))
                                               or not all(1 <= m < self.at_epochs for m in self.at_milestones)):
            raise ValueError(f"at_milestones must be increasing epochs in [1, at_epochs) = [1, {self.at_epochs}), "
                             f"got {self.at_milestones}")
        if any(not 0 <= a <= 1 for a in self.alphas) or 0.0 not in self.alphas:
            raise ValueError(f"alphas must lie in [0, 1] and include 0, got {self.alphas}")
        for name in ("batch_size", "eval_batch_size", "at_eval_every", "mrc_examples", "mrc_passes", "ft_epochs", "eval_steps", "eval_restarts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.synthetic_sizes is not None and (len(self.synthetic_sizes) != 2 or min(self.synthetic_sizes) < 1):
            raise ValueError(f"synthetic_sizes must be two image counts >= 1, (train, test), got {self.synthetic_sizes}")
        for name in ("train_subset", "val_subset", "test_subset"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 when given, got {getattr(self, name)}")


def _check_types(cfg: "RiftConfig") -> None:
    """Every field must have its declared type (papermill and the CLI pass values through here)."""
    import types
    import typing

    hints = typing.get_type_hints(RiftConfig)
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        kinds = tuple(typing.get_origin(a) or a for a in allowed)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok = True  # an int where a float is expected is fine
        if ok and isinstance(value, tuple) and f.name == "alphas":
            ok = all(isinstance(a, (int, float)) for a in value)
        if ok and isinstance(value, tuple) and f.name == "at_milestones" and not all(
                isinstance(m, int) and not isinstance(m, bool) for m in value):
            raise ValueError(f"at_milestones must be whole epochs, got {value!r}")
        if not ok:
            names = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
            raise ValueError(f"{f.name} must be {names}, got {value!r} ({type(value).__name__})")


PROFILES: dict[str, dict[str, Any]] = {
    # The paper's protocol (on a GPU).
    "paper": {},
    # A small, honest CPU run: small width, subsets, short schedules.
    "cpu": dict(width=8, train_subset=10000, val_subset=1000, test_subset=2000, synthetic_sizes=(16000, 2000),
                at_epochs=15, at_attack_steps=3, at_attack_step=4 / 255, mrc_examples=512, mrc_passes=3,
                ft_epochs=4, eval_restarts=1),
    # The demo: a few minutes on a laptop CPU. Width 16, not 8: at width 8 the least critical module (a 1x1
    # shortcut of 128 weights) could not learn anything on clean data, so RiFT had nothing to win. AT is
    # "fast AT" (PGD-1 from a random start, step 1.25 eps = 10/255; Wong et al. 2020): at width 16 it
    # gave a better model than PGD-3 in half the time. Fine-tuning keeps the paper's lr (0.001) for 4
    # epochs: the weight moves ~6% of its norm, inside MRC's 10% ball, so the robust curve stays flat over
    # most alphas. AT validates at epochs 5 and 10 only (the last epoch was the best in every demo run).
    # Evaluation batches of 256, not 512: at width 16 a batch of 512 overflows the CPU's caches and ran at
    # 503 images/s against 800 (forward + input gradient, 2 threads).
    "demo": dict(dataset="synthetic-cifar10", width=16, train_subset=4000, val_subset=1000, test_subset=1000,
                 synthetic_sizes=(5000, 1000), val_size=1000, batch_size=64, at_epochs=10, at_attack_steps=1, at_attack_step=10 / 255,
                 eval_batch_size=256, at_eval_every=5, mrc_examples=256, mrc_passes=3, ft_epochs=4, eval_restarts=1),
    # The scale study (benchmarks/scale_study.py): real Fashion-MNIST (eps 0.1), 5000 validation images, the full
    # 10000 test images; the width, the training images and the fine-tuning epochs are set per run. PGD-3 AT (step
    # 0.04): at width 16 on 10000 images it reached 83.2 / 73.1 (validation clean / PGD-10) after 10 epochs, where
    # fast AT (PGD-1, step 1.25 eps) fell to 80.7 / 44.1, the mark of catastrophic overfitting. MRC on 1000 training
    # images, 10 passes; one PGD-10 start per image everywhere, so that curves and tests fit in CPU hours.
    "study": dict(dataset="fashion-mnist", width=16, train_subset=10000, val_size=5000, batch_size=128, eval_batch_size=256,
                  at_epochs=10, at_attack_steps=3, at_attack_step=0.04, at_eval_every=5, mrc_examples=1000, mrc_passes=10,
                  eval_restarts=1),
    # The book's offline CPU profile (chapters 1-5): real Fashion-MNIST (eps 0.1), a ResNet-18 of width 8; all five
    # chapters in about four minutes on one CPU core. Batches of 128 for evaluation give MRC 12 ascent steps; alpha
    # on a 0.2 grid halves the cost of the interpolation curves (chapter 3 draws four of them).
    "book": dict(dataset="fashion-mnist", width=8, train_subset=4000, val_subset=500, test_subset=1000, batch_size=64,
                 eval_batch_size=128, at_epochs=6, at_attack_steps=3, at_attack_step=0.04, mrc_examples=512, mrc_passes=3,
                 ft_epochs=3, ft_lr=0.01, alphas=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), eval_restarts=1),
}


def build_for(cfg: RiftConfig, splits: DataSplits) -> nn.Module:
    """The architecture ``cfg`` names, randomly initialised (a RobustBench one when ``cfg.robustbench`` is set)."""
    info = splits.info
    if cfg.robustbench is not None:
        from .zoo import build_robustbench_model, robustbench_dataset

        return build_robustbench_model(cfg.robustbench, robustbench_dataset(cfg.dataset), cfg.threat_model)
    return build_model(cfg.model, info.num_classes, info.channels, info.image_size, cfg.width, info.mean, info.std)


def prepare(cfg: RiftConfig) -> tuple[DataSplits, torch.device]:
    """Seed every generator from ``cfg.seed``, load the data described by ``cfg`` and resolve its device.

    Under torchrun this joins the process group and gives each rank its own GPU (see
    :func:`riftlab.distributed.setup`), and sets the process-wide precision to ``cfg.precision``.
    """
    from .compute import set_precision

    device = distributed.setup(cfg.device)
    set_precision(cfg.precision)
    seed_everything(cfg.seed)
    splits = load_dataset(cfg.dataset, cfg.data_root, cfg.download, val_size=cfg.val_size, train_subset=cfg.train_subset, val_subset=cfg.val_subset,
                          test_subset=cfg.test_subset, synthetic_sizes=cfg.synthetic_sizes)
    return splits, device


def adversarial_train_step(cfg: RiftConfig, model: nn.Module, train: Batches, val: Batches | None, out_dir: str | os.PathLike | None = None,
                           meta: dict[str, Any] | None = None) -> TrainResult:
    """Adversarially train ``model`` in place with ``cfg``'s recipe: method, schedule, attack and validation."""
    return adversarial_train(model, train, val, epochs=cfg.at_epochs, lr=cfg.at_lr, milestones=cfg.at_schedule(), eps=cfg.eps,
                             step=cfg.at_attack_step, attack_steps=cfg.at_attack_steps, method=cfg.at_method, beta=cfg.at_beta,
                             eval_steps=cfg.eval_steps, eval_every=cfg.at_eval_every, seed=cfg.seed, out_dir=out_dir, meta=meta,
                             progress=cfg.progress, compile=cfg.compile)


def finetune_step(cfg: RiftConfig, model: nn.Module, modules: str | list[str], train: Batches, val: Batches | None,
                  out_dir: str | os.PathLike | None = None) -> FinetuneResult:
    """Fine-tune ``modules`` of ``model`` (a copy) with ``cfg``'s schedule: ``ft_epochs`` at ``ft_lr``, x0.1 halfway."""
    return finetune_module(model, modules, train, val, epochs=cfg.ft_epochs, lr=cfg.ft_lr, update_bn_stats=cfg.update_bn_stats,
                           milestones=[max(1, cfg.ft_epochs // 2)], out_dir=out_dir, progress=cfg.progress, compile=cfg.compile)


def choose_alpha(cfg: RiftConfig, model: nn.Module, theta_at: dict[str, torch.Tensor], theta_ft: dict[str, torch.Tensor],
                 val: Batches, checkpoint_path: str | os.PathLike | None = None) -> tuple[pd.DataFrame, dict[str, float]]:
    """The validation curve over ``cfg.alphas`` (PGD-``eval_steps``, ``val_restarts``, seed ``cfg.seed``) and
    the alpha the paper's rule picks on it (``cfg.threshold``). ``model`` gives the architecture."""
    curve = interpolation_curve(model, theta_at, theta_ft, val, cfg.eps, cfg.step, cfg.eval_steps, cfg.val_restarts, cfg.alphas,
                                seed=cfg.seed, checkpoint_path=checkpoint_path, progress=cfg.progress)
    return curve, select_alpha(curve, cfg.threshold)


def evaluate_on_test(cfg: RiftConfig, model: nn.Module, test: Batches, checkpoint_path: str | os.PathLike | None = None,
                     per_image: bool = False) -> dict[str, Any]:
    """The reported numbers: clean and PGD-``eval_steps`` accuracy, worst of ``eval_restarts``, seed ``cfg.seed + 1``
    (other random starts than the validation curve's)."""
    return evaluate(model, test, cfg.eps, cfg.step, cfg.eval_steps, cfg.eval_restarts, seed=cfg.seed + 1, checkpoint_path=checkpoint_path,
                    per_image=per_image)


def compare_on_test(cfg: RiftConfig, model_a: nn.Module, model_b: nn.Module, test: Batches,
                    checkpoint_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """:func:`evaluate_on_test`'s numbers for two models on the same images and random starts, with B - A's paired
    intervals (:func:`riftlab.compare`)."""
    return compare(model_a, model_b, test, cfg.eps, cfg.step, cfg.eval_steps, cfg.eval_restarts, seed=cfg.seed + 1,
                   checkpoint_path=checkpoint_path)


def without_masks(result: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's numbers without its per-image masks (for JSON)."""
    return {k: v for k, v in result.items() if not k.endswith("_correct")}


def _write_json(path: Path, obj: Any) -> None:
    if not distributed.is_main():  # under torchrun rank 0 writes the run directory
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    if not distributed.is_main():
        return
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


_RUN_FILES = ("at", "ft", "progress", "at.pt", "ft.pt", "rift.pt", "mrc.csv", "finetune.csv", "at_history.csv",
              "interpolation.csv", "results.json", "config.json")


def prepare_run_dir(out: Path, cfg: "RiftConfig", resume: bool, overwrite: bool) -> None:
    """Make ``out`` ready for a run: refuse to clobber finished or unfinished work unless told to.

    ``overwrite`` removes riftlab's own files in ``out`` (nothing else); ``resume`` continues an
    unfinished run, which must have been started with the same settings. Under torchrun rank 0
    does this while the other ranks wait.
    """
    if not distributed.is_main():  # rank 0 checks and prepares the folder; the others wait for it
        distributed.barrier()
        return
    try:
        check_run_dir(out, cfg, resume, overwrite)
        _prepare_run_dir(out, _run_config(cfg), overwrite)
    finally:
        distributed.barrier()


def check_run_dir(out: Path, cfg: "RiftConfig", resume: bool, overwrite: bool) -> None:
    """Raise the error :func:`prepare_run_dir` would raise, touching nothing (to fail before loading data)."""
    if overwrite:
        return
    if (out / "results.json").is_file():
        raise FileExistsError(f"{out} already holds a finished run (results.json); pass --overwrite or choose another --out")
    if any((out / name).exists() for name in _RUN_FILES):
        if not resume:
            raise FileExistsError(f"{out} holds an unfinished run; pass --resume to continue it or --overwrite to start over")
        if (out / "config.json").is_file():
            saved = json.loads((out / "config.json").read_text())
            fresh = json.loads(json.dumps(_run_config(cfg), default=str))
            diff = [k for k in sorted(set(saved) | set(fresh)) if saved.get(k) != fresh.get(k)]
            if diff:
                raise ValueError(f"cannot resume {out}: it was started with other settings ({', '.join(diff)}); "
                                 "use the same options, or --overwrite")


def _run_config(cfg: "RiftConfig") -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"}


def _prepare_run_dir(out: Path, config: dict[str, Any], overwrite: bool) -> None:
    import shutil

    if overwrite:
        for name in _RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config)


def run_rift(cfg: RiftConfig, out_dir: str | os.PathLike, at_checkpoint: str | os.PathLike | None = None,
             resume: bool = False, overwrite: bool = False, log=print) -> dict[str, Any]:
    """Run RiFT end to end and write the run directory ``out_dir``; returns the results dict.

    Without ``at_checkpoint`` the AT model is trained first, unless ``cfg.robustbench`` names a
    RobustBench model to start from (read from ``cfg.model_dir``). Every stage saves its progress
    atomically (per epoch, per module, per alpha, per batch); ``resume=True`` continues a killed
    run from where it stopped, with the same final result.
    """
    cfg = cfg.resolved()
    out = Path(out_dir)
    check_run_dir(out, cfg, resume, overwrite)  # a refusal comes before the data loads (seconds to minutes)
    splits, device = prepare(cfg)  # seeds everything; bad data settings fail here, before anything is written
    prepare_run_dir(out, cfg, resume, overwrite)
    if not distributed.is_main():
        log = _silent
    info = splits.info
    model = to_device(build_for(cfg, splits), device)
    meta = {"riftlab": __version__, "dataset": cfg.dataset, "seed": cfg.seed, **model.riftlab_config,
            "at_method": cfg.at_method, "at_beta": cfg.at_beta}
    train_aug = Batches(splits.train, cfg.batch_size, shuffle=True, augment=True, crop_padding=info.crop_padding, device=device, seed=cfg.seed)
    val = Batches(splits.val, cfg.eval_batch_size, device=device)
    test = Batches(splits.test, cfg.eval_batch_size, device=device)
    progress_dir = out / "progress"
    timings: dict[str, float] = {}
    arch = f"RobustBench {cfg.robustbench}" if cfg.robustbench is not None else f"{cfg.model} (width {cfg.width or 'default'})"
    log(f"riftlab {__version__}: {arch} on {cfg.dataset} {splits.sizes()}, device {device}")

    t0 = time.perf_counter()
    if (out / "at.pt").is_file():
        load_checkpoint(model, out / "at.pt", map_location=device)
        log(f"AT model: reusing {out / 'at.pt'}")
    elif at_checkpoint is not None:
        load_checkpoint(model, at_checkpoint, map_location=device)
        log(f"loaded AT model from {at_checkpoint}")
    elif cfg.robustbench is not None:
        from .zoo import load_robustbench_model, robustbench_dataset

        model.load_state_dict(load_robustbench_model(cfg.robustbench, robustbench_dataset(cfg.dataset), cfg.threat_model,
                                                     cfg.model_dir).state_dict())
        log(f"AT model: RobustBench {cfg.robustbench} ({cfg.threat_model}) from {cfg.model_dir}")
    else:
        log(f"adversarial training ({cfg.at_method}): {cfg.at_epochs} epochs, PGD-{cfg.at_attack_steps} (eps {cfg.eps:.4f}, step {cfg.at_attack_step:.4f})")
        result = adversarial_train_step(cfg, model, train_aug, val, out_dir=out / "at", meta=meta)
        _write_csv(out / "at_history.csv", pd.DataFrame(result.history))
        log(f"best AT epoch {result.best_epoch}: val {result.history[result.best_epoch - 1]}")
    if not (out / "at.pt").is_file():
        save_checkpoint(out / "at.pt", {"model_state": model.state_dict(), "meta": {**meta, "stage": "at"}})
    theta_at = {k: v.detach().clone() for k, v in model.state_dict().items()}
    timings["adversarial_training"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if (out / "mrc.csv").is_file():
        mrc = pd.read_csv(out / "mrc.csv")
    else:
        mrc_source = Batches(splits.train.subset(cfg.mrc_examples, seed=cfg.seed), cfg.eval_batch_size, device=device)
        adv = adversarial_set(model, mrc_source, cfg.eps, cfg.step, cfg.eval_steps, seed=cfg.seed)
        mrc = module_robust_criticality(model, adv, eps=cfg.mrc_eps, passes=cfg.mrc_passes, step_size=cfg.mrc_step_size,
                                        checkpoint_path=progress_dir / "mrc.pt", progress=cfg.progress)
        _write_csv(out / "mrc.csv", mrc)
    module = cfg.ft_module or str(mrc["module"].iloc[0])
    timings["mrc"] = time.perf_counter() - t0
    log(f"MRC: least robust-critical {mrc['module'].iloc[0]} ({mrc['mrc'].iloc[0]:.4f}), "
        f"most {mrc['module'].iloc[-1]} ({mrc['mrc'].iloc[-1]:.4f}); fine-tuning {module}")

    t0 = time.perf_counter()
    ft_model = to_device(build_for(cfg, splits), device)
    if (out / "ft.pt").is_file():
        load_checkpoint(ft_model, out / "ft.pt", map_location=device)
        ft_history = pd.read_csv(out / "finetune.csv")
        best_epoch = int(read_checkpoint(out / "ft.pt")["meta"]["best_epoch"])
    else:
        ft = finetune_step(cfg, model, module, train_aug, val, out_dir=out / "ft")
        ft_model, ft_history, best_epoch = ft.model, pd.DataFrame(ft.history), ft.best_epoch
        _write_csv(out / "finetune.csv", ft_history)
        save_checkpoint(out / "ft.pt", {"model_state": ft_model.state_dict(),
                                        "meta": {**meta, "stage": "finetuned", "module": module, "best_epoch": best_epoch}})
    theta_ft = ft_model.state_dict()
    timings["finetune"] = time.perf_counter() - t0
    moved = relative_change(model, ft_model, module)
    log(f"fine-tuned {module}: kept epoch {best_epoch}; its weight moved by {moved:.3g} of its norm; "
        f"MRC measured the robust loss within {cfg.mrc_eps:g}")

    t0 = time.perf_counter()
    curve, choice = choose_alpha(cfg, model, theta_at, theta_ft, val, checkpoint_path=progress_dir / "interpolation.pt")
    _write_csv(out / "interpolation.csv", curve)
    timings["interpolation"] = time.perf_counter() - t0
    log(f"chosen alpha {choice['alpha']} on validation: clean {choice['clean_gain']:+.2f}, robust {choice['robust_change']:+.2f} points")

    t0 = time.perf_counter()
    theta_rift = interpolate(theta_at, theta_ft, choice["alpha"])
    save_checkpoint(out / "rift.pt", {"model_state": theta_rift, "meta": {**meta, "stage": "rift", "module": module, "alpha": choice["alpha"]}})
    rift_model = to_device(build_for(cfg, splits), device)
    rift_model.load_state_dict(theta_rift)
    test_cmp = compare_on_test(cfg, model, rift_model, test, checkpoint_path=progress_dir / "test")
    save_checkpoint(out / "test_correct.pt", {"at": {k: test_cmp["a"][f"{k}_correct"] for k in ("clean", "robust")},
                                              "rift": {k: test_cmp["b"][f"{k}_correct"] for k in ("clean", "robust")}})
    timings["test_evaluation"] = time.perf_counter() - t0
    base = curve.loc[curve["alpha"] == 0.0].iloc[0]
    chosen = curve.loc[curve["alpha"] == choice["alpha"]].iloc[0]
    results = {
        "riftlab": __version__,
        "config": dataclasses.asdict(cfg),
        "dataset": {"name": cfg.dataset, "description": info.description, "synthetic": info.synthetic, **splits.sizes()},
        "module": module,
        "mrc_least": {"module": str(mrc["module"].iloc[0]), "mrc": float(mrc["mrc"].iloc[0])},
        "mrc_most": {"module": str(mrc["module"].iloc[-1]), "mrc": float(mrc["mrc"].iloc[-1])},
        "alpha": choice["alpha"],
        "finetune_best_epoch": best_epoch,
        "finetune_relative_change": moved,
        "validation": {"at": {"clean_acc": float(base["clean_acc"]), "robust_acc": float(base["robust_acc"])},
                       "rift": {"clean_acc": choice["clean_acc"], "robust_acc": choice["robust_acc"]},
                       "difference": {kind: {"diff": float(chosen[f"{kind}_change"]), "ci_low": float(chosen[f"{kind}_change_low"]),
                                             "ci_high": float(chosen[f"{kind}_change_high"]), "n": len(splits.val)}
                                      for kind in ("clean", "robust")}},
        "test": {"at": without_masks(test_cmp["a"]), "rift": without_masks(test_cmp["b"]),
                 "difference": {"clean": test_cmp["clean"], "robust": test_cmp["robust"]}},
        "seconds": timings,
    }
    _write_json(out / "results.json", results)
    log(results_table(results))
    return results


def relative_change(before: nn.Module, after: nn.Module, module: str) -> float:
    """How far fine-tuning moved ``module``'s weight: ||W_after - W_before|| / ||W_before|| (l2 over the tensor).

    MRC certifies the robust loss only within a relative radius (``mrc_eps``, 0.1 in the paper); a
    fine-tuned weight far outside it is where interpolation has to find its way back.
    """
    return relative_distance(get_weight_module(after, module).weight, get_weight_module(before, module).weight)


def _silent(*args: Any, **kwargs: Any) -> None:
    """The log of ranks other than 0 under torchrun."""


def results_table(results: dict[str, Any]) -> str:
    """The AT vs AT+RiFT table as text, with the RiFT - AT differences and their paired 95% intervals."""
    from .stats import format_difference

    v, t = results["validation"], results["test"]
    lines = [f"{'':10s} {'val clean':>10s} {'val robust':>11s} {'test clean':>11s} {'test robust':>12s}"]
    for key, label in (("at", "AT"), ("rift", "AT+RiFT")):
        lines.append(f"{label:10s} {v[key]['clean_acc']:10.2f} {v[key]['robust_acc']:11.2f} {t[key]['clean_acc']:11.2f} {t[key]['robust_acc']:12.2f}")
    if "difference" in t:
        for kind in ("clean", "robust"):
            lines.append(f"RiFT - AT, {kind:6s}: validation {format_difference(v['difference'][kind])}, "
                         f"test {format_difference(t['difference'][kind])} (points, 95% paired interval, images +gained/-lost)")
        seeds = f"attack seeds {results['config']['seed']} (validation) and {t['at']['seed']} (test)"
        lines.append(f"module {results['module']}, alpha {results['alpha']}; {seeds}")
    else:
        lines.append(f"module {results['module']}, alpha {results['alpha']}")
    return "\n".join(lines)
