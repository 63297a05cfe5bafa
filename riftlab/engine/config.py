"""Every setting of a RiFT run (:class:`RiftConfig`), its named presets (:data:`PROFILES`), and the
settings each stage's fingerprint is made of."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .._util import milestones_for
from ..compute import check_precision, precision_name
from ..steps.interpolation import DEFAULT_ALPHAS

__all__ = ["RiftConfig", "PROFILES", "data_params", "precision_params", "attack_seed"]


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
        from ..data import dataset_info

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
        from ..steps.losses import AT_METHODS
        from ..models import check_model_name

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
    # From scratch on a free Colab T4 in under an hour (benchmarks/t4_estimate.py counts the FLOPs of every stage): CIFAR-10,
    # the paper's ResNet-18, 15 epochs of PGD-3 AT (step 4/255; on Fashion-MNIST PGD-3 matched PGD-10's robustness, measured,
    # where fast AT overfitted catastrophically), MRC on 5000 training examples, one PGD-10 start per test image.
    "colab": dict(dataset="cifar10", download=True, at_epochs=15, at_attack_steps=3, at_attack_step=4 / 255, at_eval_every=5,
                  mrc_examples=5000, eval_restarts=1),
    # The scale study (benchmarks/scale_study.py): real Fashion-MNIST (eps 0.1), 5000 validation images, the full
    # 10000 test images; the width, the training images and the fine-tuning epochs are set per run. PGD-3 AT (step
    # 0.04): at width 16 on 10000 images it reached 83.2 / 73.1 (validation clean / PGD-10) after 10 epochs, where
    # fast AT (PGD-1, step 1.25 eps) fell to 80.7 / 44.1, the mark of catastrophic overfitting. MRC on 1000 training
    # images, 10 passes; one PGD-10 start per image everywhere and six alphas (0, 0.2, ..., 1: half the curve's cost),
    # so that curves and tests fit in CPU hours.
    "study": dict(dataset="fashion-mnist", width=16, train_subset=10000, val_size=5000, batch_size=128, eval_batch_size=256,
                  at_epochs=10, at_attack_steps=3, at_attack_step=0.04, at_eval_every=5, mrc_examples=1000, mrc_passes=10,
                  eval_restarts=1, alphas=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0)),
    # The book's offline CPU profile (chapters 1-5): real Fashion-MNIST (eps 0.1), a ResNet-18 of width 8; all five
    # chapters in about four minutes on one CPU core. Batches of 128 for evaluation give MRC 12 ascent steps; alpha
    # on a 0.2 grid halves the cost of the interpolation curves (chapter 3 draws four of them).
    "book": dict(dataset="fashion-mnist", width=8, train_subset=4000, val_subset=500, test_subset=1000, batch_size=64,
                 eval_batch_size=128, at_epochs=6, at_attack_steps=3, at_attack_step=0.04, mrc_examples=512, mrc_passes=3,
                 ft_epochs=3, ft_lr=0.01, alphas=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), eval_restarts=1),
}


def data_params(cfg: RiftConfig) -> dict[str, Any]:
    """The settings that pick the images: part of every stage's fingerprint."""
    return {"dataset": cfg.dataset, "val_size": cfg.val_size, "train_subset": cfg.train_subset, "val_subset": cfg.val_subset,
            "test_subset": cfg.test_subset, "synthetic_sizes": cfg.synthetic_sizes}


def precision_params(cfg: RiftConfig, device: torch.device | str) -> dict[str, Any]:
    """How the stage computes: bf16 or fp16 autocast, or fp32 (the effective choice of ``cfg.precision`` on ``device``)."""
    from ..compute import use_precision

    with use_precision(cfg.precision):
        return {"precision": precision_name(device)}


def attack_seed(cfg: RiftConfig, split: str) -> int:
    """The seed of the PGD random starts on ``split``: ``cfg.seed`` on validation (the interpolation curve, MRC's
    adversarial set), ``cfg.seed + 1`` on test, so the reported numbers meet other starts than the ones alpha was chosen with.
    Every command uses it: ``riftlab evaluate`` on a run's ``rift.pt`` reproduces the run's test numbers."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    return cfg.seed + 1 if split == "test" else cfg.seed
