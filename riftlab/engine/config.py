"""Every setting of a RiFT run (:class:`RiftConfig`), its named presets (:data:`PROFILES`), and the
settings each stage's fingerprint is made of."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .._util import milestones_for
from ..compute import PRECISIONS, precision_name
from ..steps.interpolation import DEFAULT_ALPHAS
from .rules import Flag, Integer, Items, Number, OneOf, Pattern, Rule, SettingError, Text

__all__ = ["RiftConfig", "PROFILES", "FT_PROTOCOLS", "protocol_settings", "RULES", "SettingError", "check_settings", "data_params", "precision_params", "attack_seed"]


@dataclass
class RiftConfig:
    """Every knob of a RiFT run. ``PROFILES`` holds named presets (``paper``, ``cpu``, ``demo``).

    What each field may be is its rule in :data:`RULES` (counts >= 1, rates finite, pixel budgets in [0, 1]...);
    :meth:`validate` (and :meth:`resolved`, which fills the dataset's defaults) checks them all before any work."""

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
    at_warmup_epochs: int = 0  # linear learning-rate warm-up over the first epochs (the throughput profile's large batch)
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
    # "riftlab" (default) or "reference": fine-tune as the reference code does (FT_PROTOCOLS: train-mode BatchNorm,
    # reflect-padded crops, the 0.1 alpha grid); selection stays on validation either way
    ft_protocol: str = "riftlab"
    bn_recalibration_only: bool = False  # the same schedule with no weight trained: only BatchNorm's statistics move
    # interpolation and evaluation
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    threshold: float = 0.1
    # also report what choosing the fine-tuning epoch and alpha on test (the reference code's way) would give, with
    # the gain that choice alone makes on a zero-effect control (riftlab.evaluation.selection); never used to choose
    report_test_selection: bool = False
    eval_steps: int = 10
    eval_restarts: int = 3
    val_restarts: int = 1
    # speed: bf16 autocast on CUDA ("auto"), "fp32" or "bf16" everywhere; torch.compile for training
    precision: str = "auto"
    compile: bool = False
    cuda_graphs: bool = False  # training steps, attacks and MRC passes as CUDA graph replays (riftlab.graphs); eager is the reference
    # evaluation's attacks on a copy with each BatchNorm folded into the convolution before it (riftlab.compute.fold_batchnorm):
    # the same function up to rounding, so opt-in; the unfolded model is the reference
    fold_bn: bool = False
    # on CUDA, eval_batch_size replaced once per run by the largest power of two (64 to 4096) whose attack fits half the free
    # GPU memory (riftlab.evaluation.robust.eval_batch_size_for); the run records the size chosen. Elsewhere eval_batch_size stays
    auto_eval_batch_size: bool = False
    progress: bool = True

    def resolved(self) -> "RiftConfig":
        from ..data import dataset_info

        self.validate()  # before anything is looked up: an unknown dataset is a setting error like any other
        info = dataset_info(self.dataset)
        cfg = dataclasses.replace(self)
        cfg.eps = info.eps if self.eps is None else self.eps
        cfg.step = info.step if self.step is None else self.step
        cfg.at_attack_step = cfg.step if self.at_attack_step is None else self.at_attack_step
        return cfg

    def at_schedule(self) -> list[int]:
        """The adversarial-training lr milestones: ``at_milestones``, or the paper's scaled to ``at_epochs``."""
        if self.at_milestones is not None:
            return list(self.at_milestones)
        return milestones_for(self.at_epochs, 110, (100, 105))

    def validate(self) -> None:
        """Check every setting against its rule in :data:`RULES` (type, finiteness, range), then the settings that
        depend on each other; raise :class:`~riftlab.engine.rules.SettingError` (one line: the setting, the value
        given, what is allowed) on the first that fails. Touches nothing: call it before any data or model."""
        values = dataclasses.asdict(self)
        if self.robustbench is not None and self.model == f"robustbench:{self.robustbench}":
            del values["model"]  # a RobustBench model's architecture is RobustBench's, named after it (riftlab.zoo)
        check_settings(values)
        if self.at_milestones is not None and self.at_milestones and self.at_milestones[-1] >= self.at_epochs:
            raise SettingError("at_milestones", self.at_milestones, f"increasing epochs in [1, at_epochs) = [1, {self.at_epochs})")
        if self.at_warmup_epochs >= self.at_epochs:
            raise SettingError("at_warmup_epochs", self.at_warmup_epochs, f"an integer in [0, at_epochs) = [0, {self.at_epochs})")
        if self.at_method != "pgd" and self.at_attack_steps < 1:
            raise SettingError("at_attack_steps", self.at_attack_steps, f"an integer >= 1 with at_method {self.at_method!r}",
                               "TRADES and MART train on adversarial examples")
        _check_val_size(self)
        _check_protocol(self)


# What each fine-tuning protocol fixes (checked by RiftConfig.validate; protocol_settings gives them). "reference" is
# the reference code's fine-tuning: the network in train mode, so every BatchNorm's running statistics are re-estimated
# on clean images; alpha on the 0.1 grid. Its reflect-padded crops follow from the name (riftlab.engine.pipeline.
# finetune_batches). riftlab's default keeps BatchNorm frozen, so that the one weight MRC measured is the only change.
FT_PROTOCOLS: dict[str, dict[str, Any]] = {
    "riftlab": {},
    "reference": {"update_bn_stats": True, "alphas": DEFAULT_ALPHAS},
}


def protocol_settings(name: str) -> dict[str, Any]:
    """The settings that make ``name`` (a key of :data:`FT_PROTOCOLS`) a run's fine-tuning protocol, to lay over a
    profile: ``RiftConfig(**{**PROFILES["study"], **protocol_settings("reference")})``. The reference protocol also
    turns on ``report_test_selection`` (what its own test-split choices would report)."""
    if name not in FT_PROTOCOLS:
        raise SettingError("ft_protocol", name, f"one of {', '.join(FT_PROTOCOLS)}")
    return {"ft_protocol": name, **FT_PROTOCOLS[name], **({"report_test_selection": True} if name == "reference" else {})}


def _check_protocol(cfg: "RiftConfig") -> None:
    """The settings a protocol fixes must have its values; BatchNorm recalibration alone needs train-mode BatchNorm."""
    for key, value in FT_PROTOCOLS[cfg.ft_protocol].items():
        given = getattr(cfg, key)
        same = (len(given) == len(value) and all(abs(float(a) - b) < 1e-9 for a, b in zip(given, value))
                if isinstance(value, tuple) else given == value)
        if not same:
            raise SettingError(key, given, f"{value!r} with ft_protocol {cfg.ft_protocol!r}",
                               "the reference code's value; drop the option that sets it, or use ft_protocol 'riftlab'")
    if cfg.bn_recalibration_only and not cfg.update_bn_stats:
        raise SettingError("bn_recalibration_only", True, "False with frozen BatchNorm",
                           "only running statistics move, and frozen BatchNorm keeps them: add update_bn_stats "
                           "(--update-bn-stats) or ft_protocol 'reference'")


def check_settings(values: Mapping[str, Any]) -> None:
    """Check each ``name: value`` against its rule in :data:`RULES` (names without a rule are left alone); raise
    :class:`~riftlab.engine.rules.SettingError` for the first value its rule refuses. The command line calls it on the
    options given, before it reads any checkpoint; :meth:`RiftConfig.validate` on every field."""
    for name, value in values.items():
        rule = RULES.get(name)
        if rule is not None:
            rule.check(name, value)


def _check_val_size(cfg: "RiftConfig") -> None:
    """A synthetic set's validation images are held out of its generated training images: known before any data."""
    from ..data import dataset_info

    info = dataset_info(cfg.dataset)
    if not info.synthetic:
        return  # a real dataset's size is known when its files are read (riftlab.data.load_dataset checks it there)
    n_train = cfg.synthetic_sizes[0] if cfg.synthetic_sizes else {32: 50000, 64: 100000}[info.image_size]
    val_size = info.val_size if cfg.val_size is None else cfg.val_size
    if not 1 <= val_size < n_train:
        raise SettingError("val_size", val_size, f"in [1, {n_train}): validation images held out of the {n_train} training "
                           "images synthetic_sizes generates")


def _datasets() -> list[str]:
    from ..data import list_datasets

    return list_datasets()


def _models() -> list[str]:
    from ..models import list_models

    return list_models()


def _at_methods() -> list[str]:
    from ..steps.losses import AT_METHODS

    return list(AT_METHODS)


_COUNT = Integer(low=1)  # images, epochs, steps, passes, restarts
_SUBSET = Integer(low=1, optional=True)
_PIXELS = Number(low=0, high=1, low_open=True, optional=True, note="pixel units")

# One rule per field of RiftConfig: what each setting may be. A new field needs its line here (tests/test_settings.py
# checks that every field has one). Optional rules also allow None (a default worked out later, e.g. by resolved()).
RULES: dict[str, Rule] = {
    "dataset": OneOf(choices=_datasets),
    "model": OneOf(choices=_models),
    "width": Integer(low=1, optional=True, note="first-stage channels or widen factor"),
    "robustbench": Text(optional=True),
    "threat_model": OneOf(choices=("Linf", "L2", "corruptions")),
    "model_dir": Text(),
    "data_root": Text(optional=True),
    "download": Flag(),
    "device": Pattern(regex=r"auto|cpu|mps|cuda(:\d+)?", words="auto, cpu, cuda, cuda:N or mps"),
    "seed": Integer(low=0, high=2**32 - 1),
    "train_subset": _SUBSET,
    "val_subset": _SUBSET,
    "test_subset": _SUBSET,
    "synthetic_sizes": Items(item=_COUNT, length=2, optional=True, words="two image counts >= 1 (train, test)"),
    "val_size": Integer(low=1, optional=True, note="validation images held out of the training set"),
    "batch_size": _COUNT,
    "eval_batch_size": _COUNT,
    "at_epochs": _COUNT,
    "at_warmup_epochs": Integer(low=0, note="epochs of linear learning-rate warm-up, fewer than at_epochs"),
    "at_lr": Number(low=0, low_open=True),
    "at_milestones": Items(item=_COUNT, increasing=True, optional=True, words="increasing epochs in [1, at_epochs)"),
    "at_attack_steps": Integer(low=0, note="0: standard training"),
    "at_attack_step": _PIXELS,
    "at_eval_every": _COUNT,
    "at_method": OneOf(choices=_at_methods),
    "at_beta": Number(low=0),
    "eps": Number(low=0, high=1, optional=True, note="pixel units, e.g. 8/255 = 0.0314"),
    "step": _PIXELS,
    "mrc_examples": _COUNT,
    "mrc_eps": Number(low=0, high=10, note="relative to the weight's norm"),
    "mrc_passes": _COUNT,
    "mrc_step_size": Number(low=0, low_open=True, optional=True),
    "ft_epochs": _COUNT,
    "ft_lr": Number(low=0, note="0 leaves the weight as it is: a control"),
    "ft_module": Text(optional=True),
    "update_bn_stats": Flag(),
    "ft_protocol": OneOf(choices=("riftlab", "reference")),
    "bn_recalibration_only": Flag(),
    "report_test_selection": Flag(),
    "alphas": Items(item=Number(low=0, high=1), min_length=1, include=0.0, words="numbers that lie in [0, 1] and include 0"),
    "threshold": Number(low=0, note="points of validation robust accuracy"),
    "eval_steps": _COUNT,
    "eval_restarts": _COUNT,
    "val_restarts": _COUNT,
    "precision": OneOf(choices=PRECISIONS),
    "compile": Flag(),
    "cuda_graphs": Flag(),
    "fold_bn": Flag(),
    "auto_eval_batch_size": Flag(),
    "progress": Flag(),
}


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
    # Throughput on a GPU, beside the paper's recipe (not the paper's): batches of 512 with the learning rate scaled
    # linearly (0.1 * 512 / 128 = 0.4) and warmed up over 5 epochs, every PGD-AT step a CUDA graph replay. Its robust
    # accuracy against batch 128 on the same epochs is what benchmarks/speed2.py's `recipe` part measures.
    "throughput": dict(batch_size=512, at_lr=0.4, at_warmup_epochs=5, cuda_graphs=True),
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
