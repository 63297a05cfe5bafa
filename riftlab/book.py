"""Helpers for the book's notebooks: configuration, reproducible setup, glue, load-or-compute.

The notebooks call these so that each chapter is short, runs alone (recomputing what an earlier
chapter would have saved) and gives the same outputs on every run of its default parameters.

The expensive steps are cached in the artifacts folder (``$RIFTLAB_ARTIFACTS``, else
``artifacts/`` at the repository root) under a key made of everything that determines them:

* :func:`trained_models`: the AT model and a standard-trained model of the same architecture,
  with their training histories (chapter 1 computes them, chapters 2-5 reuse them);
* :func:`mrc_table`: module robust criticality of every module of the AT model (chapter 2);
* :func:`finetuned`: one fine-tuning choice plus its interpolation curve and chosen alpha
  (chapters 3-5);
* :func:`evaluation`: clean and PGD robust accuracy of a model on a split, keyed by the model's
  weights themselves (a hash of its state dict), so a model is never attacked twice.

Nothing here re-implements the method: every step calls the riftlab function that does it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from . import __version__
from ._util import seed_everything
from .checkpoint import read_checkpoint
from .compute import resolve_device, to_device
from .steps.criticality import adversarial_set, module_robust_criticality
from .data import Batches, DataSplits
from .evaluation.robust import accuracy, evaluate
from .steps.finetune import finetune_module
from .steps.interpolation import interpolate
from .models import weight_modules
from .engine.pipeline import PROFILES, RiftConfig, build_for, choose_alpha, prepare
from .engine.runner import RunDir, Stage, StageContext, fingerprint, plain, state_digest
from .resume import MemoryState
from .steps.training import adversarial_train

__all__ = [
    "setup", "on_colab", "run_root", "environment", "glue", "artifact_dir", "artifact_path", "load_or_compute", "round_floats", "chapter_config", "config_summary",
    "load_data", "loaders", "state_hash", "trained_models", "evaluation", "mrc_table", "finetuned", "rift", "class_names",
    "ALL_LAYERS", "plot_attacks", "code_version",
]

#: The name :func:`finetuned` accepts for fine-tuning every layer (the paper's Table 3 baseline).
ALL_LAYERS = "all layers"

_CLASS_NAMES = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


def on_colab() -> bool:
    """Whether this runs in a Google Colab notebook."""
    import sys

    return "google.colab" in sys.modules


def run_root(path: str | os.PathLike | None = None) -> Path | None:
    """Where run directories and the artifacts cache go: ``path`` when given; on Colab with Google Drive
    mounted (``/content/drive/MyDrive``), ``MyDrive/riftlab``, so that a disconnected session resumes from
    what it saved; else None (the repository's ``artifacts/`` and ``runs/``)."""
    if path is not None:
        return Path(path)
    drive = Path("/content/drive/MyDrive")
    if on_colab() and drive.is_dir():
        return drive / "riftlab"
    return None


def environment() -> str:
    """One line on where this runs (Colab or not, the GPU if any): the first cell prints it on Colab."""
    where = "Colab" if on_colab() else "local"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (Runtime > Change runtime type > T4 GPU)"
    return f"riftlab {__version__}, torch {torch.__version__}, {where}, {gpu}"


def setup(seed: int = 0, device: str = "auto", threads: int | None = 1, root: str | os.PathLike | None = None) -> torch.device:
    """Seed every generator, ask for deterministic algorithms and return the device to use.

    ``root`` (see :func:`run_root`) puts the artifacts cache there (``<root>/artifacts``): on
    Colab, Google Drive when it is mounted.

    On CPU the thread count is fixed (default 1) so that results do not depend on the machine's
    core count (parallel reductions add in another order with another thread count); one thread
    also keeps a shared 2-core machine usable: with two threads competing with another busy
    process, PyTorch's OpenMP threads slow down several-fold. On a GPU, cuDNN is put in
    deterministic mode.
    """
    seed_everything(seed)
    folder = run_root(root)
    if folder is not None:
        os.environ["RIFTLAB_ARTIFACTS"] = str(folder / "artifacts")
    dev = resolve_device(device)
    if dev.type == "cpu" and threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return dev


def _plain(value: Any, digits: int) -> Any:
    """numpy / torch scalars become Python numbers; floats are rounded to ``digits``."""
    if isinstance(value, (torch.Tensor, np.generic)) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float):
        return round(float(value), digits)
    return value


def glue(name: str, value: Any, display: bool = False, digits: int = 2) -> None:
    """Make ``value`` available to the book's prose as ``{glue:text}`name```.

    Numbers are converted to plain Python numbers and floats are rounded to ``digits`` decimals,
    so the prose and the stored outputs are stable. With myst-nb installed this is
    ``myst_nb.glue``; without it (e.g. on Colab) the value is printed when ``display`` is true.

    Returns None on purpose: a cell ending in a ``glue(...)`` call then has no result to show. (A
    trailing semicolon is not enough: nbval executes cells without storing history, and IPython
    then shows the result anyway.)
    """
    value = _plain(value, digits)
    try:
        from myst_nb import glue as _glue
    except ImportError:
        if display:
            print(f"{name}: {value}")
        return None
    _glue(name, value, display=display)
    return None


def round_floats(obj: Any, digits: int = 2) -> Any:
    """Round every float inside nested dicts/lists, for stable printed outputs."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(round_floats(v, digits) for v in obj)
    return obj


# ----------------------------------------------------------------------------------------------
# Artifacts


def artifact_dir() -> Path:
    """Where chapters keep what they compute: ``$RIFTLAB_ARTIFACTS``, else ``artifacts/`` at the repository root."""
    env = os.environ.get("RIFTLAB_ARTIFACTS")
    if env:
        return Path(env)
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").is_file() or (folder / "pyproject.toml").is_file():
            return folder / "artifacts"
    return here / "artifacts"


def artifact_path(name: str, params: dict[str, Any]) -> Path:
    """The file that holds ``name`` computed with ``params``: different parameters never share a file."""
    return artifact_dir() / f"{name}-{fingerprint(params)[:12]}.pt"


def load_or_compute(name: str, params: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Return the saved result of ``compute()`` for these ``params``, computing and saving it if absent.

    One stage of the artifacts folder, kept by riftlab's run engine (:mod:`riftlab.engine.runner`)
    like any run directory: named by the fingerprint of ``params``, recorded in its ``riftlab.lock``,
    written atomically. ``compute`` returns a dict of tensors, numbers, strings and lists/dicts of
    them (what ``torch.load(weights_only=True)`` accepts).
    """
    path = artifact_path(name, params)

    def stage(ctx: StageContext) -> dict[str, Any]:
        ctx.save_checkpoint(path.name, {"result": compute(), "params": plain(params)})
        return {}

    RunDir(path.parent, resume=True).run(Stage(path.stem, params, stage, outputs=(path.name,)))
    return read_checkpoint(path)["result"]


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """A short hash of riftlab's own source files.

    Part of every cache key, so that artifacts computed by another version of the code (a changed
    training loop, attack or default) are never reused: editing riftlab invalidates the cache.
    """
    h = hashlib.sha1(__version__.encode())
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def state_hash(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A short hash of a model's weights and buffers (names, dtypes, shapes and bytes).

    Two models hash alike exactly when their state dicts are bit-identical, so results computed
    from a model can be cached under its hash (:func:`riftlab.engine.runner.state_digest`).
    """
    return state_digest(model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state)


# ----------------------------------------------------------------------------------------------
# Configuration and data


def chapter_config(profile: str = "book", **overrides: Any) -> RiftConfig:
    """The resolved :class:`RiftConfig` of a chapter: ``PROFILES[profile]`` with ``overrides`` on top.

    Overrides that are None keep the profile's value, so a notebook can pass all of its
    parameters and leave the ones it does not set at None. ``model_name`` is accepted for
    ``model``. Progress bars are off unless ``progress=True`` is passed. Example::

        cfg = chapter_config("book")                                  # the offline CPU profile
        cfg = chapter_config("paper", dataset="cifar10", download=True)  # the paper's settings
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    if "model_name" in overrides:
        overrides["model"] = overrides.pop("model_name")
    fields = {f.name for f in dataclasses.fields(RiftConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}; valid settings: {', '.join(sorted(fields))}")
    values = {"progress": False, **PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None}}
    return RiftConfig(**values).resolved()


def config_summary(cfg: RiftConfig, splits: DataSplits | None = None) -> pd.DataFrame:
    """The settings a reader needs to know, as a two-column table (setting, value)."""
    rows = [
        ("dataset", cfg.dataset),
        ("model", f"{cfg.model} (width {cfg.width if cfg.width is not None else 'default'})"),
        ("threat model", f"l_inf, eps {cfg.eps:.4f} = {cfg.eps * 255:.1f}/255"),
        ("adversarial training", f"{cfg.at_epochs} epochs, PGD-{cfg.at_attack_steps} (step {cfg.at_attack_step:.4f}), lr {cfg.at_lr} "
                                 f"(x0.1 after epochs {', '.join(map(str, cfg.at_schedule()))})"),
        ("robust evaluation", f"PGD-{cfg.eval_steps} (step {cfg.step:.4f}), worst of {cfg.eval_restarts} on test, {cfg.val_restarts} on validation"),
        ("MRC", f"{cfg.mrc_examples} training examples, eps {cfg.mrc_eps}, {cfg.mrc_passes} passes"),
        ("fine-tuning", f"{cfg.ft_epochs} epochs, lr {cfg.ft_lr}, batch {cfg.batch_size}"),
        ("interpolation", f"alpha in {list(cfg.alphas)}, robust threshold {cfg.threshold} points"),
    ]
    if splits is not None:
        sizes = splits.sizes()
        rows.insert(1, ("images (train / val / test)", f"{sizes['train']} / {sizes['val']} / {sizes['test']}"))
    return pd.DataFrame(rows, columns=["setting", "value"]).set_index("setting")


def load_data(cfg: RiftConfig) -> DataSplits:
    """The train / validation / test splits ``cfg`` describes (subsets included)."""
    return prepare(cfg)[0]


def loaders(cfg: RiftConfig, splits: DataSplits, device: torch.device | str) -> dict[str, Batches]:
    """Batches as the pipeline uses them: ``train`` (shuffled, crop + flip), ``val`` and ``test``."""
    info = splits.info
    return {
        "train": Batches(splits.train, cfg.batch_size, shuffle=True, augment=True, crop_padding=info.crop_padding, device=device, seed=cfg.seed),
        "val": Batches(splits.val, cfg.eval_batch_size, device=device),
        "test": Batches(splits.test, cfg.eval_batch_size, device=device),
    }


def class_names(dataset: str, num_classes: int = 10) -> list[str]:
    """Human-readable class names (Fashion-MNIST, CIFAR-10), else the class indices as text."""
    names = _CLASS_NAMES.get(dataset.removeprefix("synthetic-"))
    return list(names) if names is not None and len(names) == num_classes else [str(i) for i in range(num_classes)]


def _data_key(cfg: RiftConfig) -> dict[str, Any]:
    return {"dataset": cfg.dataset, "val_size": cfg.val_size, "train_subset": cfg.train_subset, "val_subset": cfg.val_subset,
            "test_subset": cfg.test_subset, "synthetic_sizes": cfg.synthetic_sizes}


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def _frame(records: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> pd.DataFrame:
    return pd.DataFrame(records)


def _records(frame: pd.DataFrame) -> dict[str, list[Any]]:
    """A DataFrame as plain lists (what a weights-only checkpoint can hold)."""
    return {c: [v.item() if hasattr(v, "item") else v for v in frame[c].tolist()] for c in frame.columns}


# ----------------------------------------------------------------------------------------------
# The expensive steps, cached


def _train_history_with_train_accuracy(cfg: RiftConfig, model: nn.Module, batches: dict[str, Batches],
                                       train_eval: Batches, milestones: list[int]) -> tuple[list[dict[str, float]], int]:
    """Adversarial training one epoch at a time (the resume protocol, in memory), measuring each epoch's
    model on a fixed subset of the training data as well, so that train and validation curves can be drawn.

    Continuing from the saved progress gives exactly the run an uninterrupted ``adversarial_train`` would."""
    history: list[dict[str, float]] = []
    result = None
    probe = copy.deepcopy(model)
    progress = MemoryState()
    for epoch in range(1, cfg.at_epochs + 1):
        result = adversarial_train(model, batches["train"], batches["val"], epochs=epoch, lr=cfg.at_lr, milestones=milestones,
                                   eps=cfg.eps, step=cfg.at_attack_step, attack_steps=cfg.at_attack_steps,
                                   eval_steps=cfg.eval_steps, seed=cfg.seed, state=progress)
        probe.load_state_dict(progress.load()["model_state"])  # this epoch's weights, not the best so far
        train_acc = evaluate(probe, train_eval, cfg.eps, cfg.step, cfg.eval_steps, 1, seed=cfg.seed)
        record = dict(result.history[-1])
        record["train_attack_acc"] = record.pop("train_robust_acc")
        record["train_clean_acc"], record["train_robust_acc"] = train_acc["clean_acc"], train_acc["robust_acc"]
        history.append(record)
    assert result is not None
    return history, result.best_epoch


def trained_models(cfg: RiftConfig, splits: DataSplits, device: torch.device | str, train_eval_size: int = 300,
                   at_checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """The AT model and a standard-trained model of the same architecture, with their histories.

    The AT model is trained here, unless ``at_checkpoint`` (a file: riftlab's, the reference code's
    or a bare state dict) or ``cfg.robustbench`` (a RobustBench model, read from ``cfg.model_dir``)
    gives a published one: then it is loaded, its history is empty and its best epoch 0, and only the
    standard model of the same architecture is trained (what a Colab session starts from).

    AT is ``adversarial_train`` with ``cfg``'s recipe (PGD-``at_attack_steps`` examples); the
    standard model gets the same schedule on clean images (``attack_steps=0``). Each keeps its
    best epoch on validation (robust accuracy for AT, clean accuracy for standard training).
    The AT history has, per epoch: ``train_attack_acc`` (accuracy on the PGD examples it trained
    on, while training), ``train_clean_acc`` / ``train_robust_acc`` (the epoch's model on
    ``train_eval_size`` fixed training images, PGD-``eval_steps``) and ``val_clean_acc`` /
    ``val_robust_acc``.

    Cached under the data, architecture, seed, training recipe and device type: the first call
    trains (minutes), later calls with the same settings load (a second).

    Returns:
        ``{"at": model, "standard": model, "at_history": DataFrame, "standard_history": DataFrame,
        "at_best_epoch": int, "standard_best_epoch": int}``; models in eval mode on ``device``.
    """
    from .engine.runner import file_digest

    published = at_checkpoint is not None or cfg.robustbench is not None
    source = ({"at_checkpoint": file_digest(at_checkpoint)} if at_checkpoint is not None
              else {"robustbench": cfg.robustbench, "threat_model": cfg.threat_model} if cfg.robustbench is not None else
              {"at_epochs": cfg.at_epochs, "at_lr": cfg.at_lr, "at_milestones": cfg.at_schedule(), "at_attack_steps": cfg.at_attack_steps,
               "at_attack_step": cfg.at_attack_step, "train_eval_size": train_eval_size})
    params = {**_data_key(cfg), "model": cfg.model, "width": cfg.width, "seed": cfg.seed, "batch_size": cfg.batch_size, **source,
              "standard_epochs": cfg.at_epochs, "standard_lr": cfg.at_lr, "eps": cfg.eps, "step": cfg.step, "eval_steps": cfg.eval_steps,
              "device": _device_type(device), "code": code_version()}

    def compute() -> dict[str, Any]:
        batches = loaders(cfg, splits, device)
        milestones = cfg.at_schedule()
        seed_everything(cfg.seed)
        at = to_device(build_for(cfg, splits), device)
        if published:
            _load_published(cfg, at, at_checkpoint)
            at_history, at_best = [], 0
        else:
            train_eval = Batches(splits.train.subset(train_eval_size, seed=cfg.seed + 7), cfg.eval_batch_size, device=device)
            at_history, at_best = _train_history_with_train_accuracy(cfg, at, batches, train_eval, milestones)
        seed_everything(cfg.seed)
        standard = to_device(build_for(cfg, splits), device)
        std = adversarial_train(standard, batches["train"], batches["val"], epochs=cfg.at_epochs, lr=cfg.at_lr, milestones=milestones,
                                attack_steps=0, seed=cfg.seed)
        return {"at": _cpu_state(at), "standard": _cpu_state(standard), "at_history": at_history, "standard_history": std.history,
                "at_best_epoch": at_best, "standard_best_epoch": std.best_epoch}

    saved = load_or_compute("models", params, compute)
    out: dict[str, Any] = {}
    for key in ("at", "standard"):
        model = build_for(cfg, splits)
        model.load_state_dict(saved[key])
        out[key] = to_device(model, device).eval()
        out[f"{key}_history"] = _frame(saved[f"{key}_history"])
        out[f"{key}_best_epoch"] = int(saved[f"{key}_best_epoch"])
    return out


def _load_published(cfg: RiftConfig, model: nn.Module, at_checkpoint: str | os.PathLike | None) -> None:
    """Load the AT weights a Colab session starts from into ``model``: a checkpoint file, or RobustBench's model."""
    from .checkpoint import load_checkpoint

    if at_checkpoint is not None:
        load_checkpoint(model, at_checkpoint, map_location=next(model.parameters()).device)
        return
    from .zoo import load_robustbench_model, robustbench_dataset

    published = load_robustbench_model(cfg.robustbench, robustbench_dataset(cfg.dataset), cfg.threat_model, cfg.model_dir)
    model.load_state_dict(published.state_dict())


def _cpu_state(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}


def evaluation(cfg: RiftConfig, model: nn.Module, split: str, splits: DataSplits, device: torch.device | str,
               restarts: int | None = None) -> dict[str, float]:
    """Clean and PGD-``eval_steps`` robust accuracy (percent) of ``model`` on ``split`` (``val``/``test``).

    ``restarts`` defaults to ``cfg.eval_restarts`` on test and ``cfg.val_restarts`` on validation,
    with the pipeline's attack seeds (``seed + 1`` on test, ``seed`` on validation, the seed the
    interpolation curve uses). Cached under the model's weights (:func:`state_hash`), so any model
    is attacked once however many chapters report it.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    restarts = restarts or (cfg.eval_restarts if split == "test" else cfg.val_restarts)
    seed = cfg.seed + 1 if split == "test" else cfg.seed
    params = {**_data_key(cfg), "split": split, "model": state_hash(model), "eps": cfg.eps, "step": cfg.step,
              "steps": cfg.eval_steps, "restarts": restarts, "seed": seed, "batch": cfg.eval_batch_size,
              "device": _device_type(device), "code": code_version()}

    def compute() -> dict[str, Any]:
        batches = Batches(getattr(splits, split), cfg.eval_batch_size, device=device)
        return evaluate(model, batches, cfg.eps, cfg.step, cfg.eval_steps, restarts, seed=seed)

    return dict(load_or_compute("eval", params, compute))


def mrc_table(cfg: RiftConfig, model: nn.Module, splits: DataSplits, device: torch.device | str) -> pd.DataFrame:
    """Module robust criticality of every Conv2d / Linear weight of ``model``, lowest first.

    As in :func:`riftlab.run_rift`: PGD-``eval_steps`` adversarial examples are crafted once from
    ``cfg.mrc_examples`` *training* images and held fixed; then
    :func:`riftlab.module_robust_criticality` (radius ``mrc_eps`` relative to each weight's norm,
    ``mrc_passes`` passes). Cached under the model's weights and the MRC settings.
    """
    params = {**_data_key(cfg), "model": state_hash(model), "seed": cfg.seed, "mrc_examples": cfg.mrc_examples, "mrc_eps": cfg.mrc_eps,
              "mrc_passes": cfg.mrc_passes, "mrc_step_size": cfg.mrc_step_size, "eps": cfg.eps, "step": cfg.step,
              "eval_steps": cfg.eval_steps, "batch": cfg.eval_batch_size, "device": _device_type(device), "code": code_version()}

    def compute() -> dict[str, Any]:
        source = Batches(splits.train.subset(cfg.mrc_examples, seed=cfg.seed), cfg.eval_batch_size, device=device)
        adv = adversarial_set(model, source, cfg.eps, cfg.step, cfg.eval_steps, seed=cfg.seed)
        return _records(module_robust_criticality(model, adv, eps=cfg.mrc_eps, passes=cfg.mrc_passes, step_size=cfg.mrc_step_size))

    return _frame(load_or_compute("mrc", params, compute))


def finetuned(cfg: RiftConfig, model: nn.Module, module: str, splits: DataSplits, device: torch.device | str) -> dict[str, Any]:
    """Fine-tune one choice of weights of the AT ``model`` on clean data, then interpolate.

    ``module`` is a Conv2d / Linear name (only that weight trains, with
    :func:`riftlab.finetune_module`: every BatchNorm keeps the AT statistics unless
    ``cfg.update_bn_stats``) or :data:`ALL_LAYERS` (every parameter trains, BatchNorm in train
    mode, as the paper's "all layers" baseline; done with ``adversarial_train(attack_steps=0)``).
    Both use ``cfg.ft_epochs`` epochs at ``cfg.ft_lr`` (x0.1 halfway), keep the fine-tuned epoch
    with the best validation clean accuracy, and are followed by the same interpolation:
    :func:`riftlab.interpolation_curve` on validation and :func:`riftlab.select_alpha`.
    ``model`` itself is not modified. Cached under the AT model's weights and these settings.

    Returns:
        ``{"module", "model" (fine-tuned, eval mode), "history" (DataFrame: epoch, lr, train_loss,
        val_clean_acc), "best_epoch", "trained_params", "curve" (DataFrame: alpha, clean_acc,
        robust_acc on validation, and each alpha's change against alpha 0 with its paired 95%
        interval), "choice" (select_alpha's dict)}``.
    """
    names = [n for n, _ in weight_modules(model)]
    if module != ALL_LAYERS and module not in names:
        raise ValueError(f"unknown module {module!r}; valid choices: {ALL_LAYERS!r}, {', '.join(names)}")
    milestones = [max(1, cfg.ft_epochs // 2)]
    params = {**_data_key(cfg), "model": state_hash(model), "module": module, "seed": cfg.seed, "batch_size": cfg.batch_size,
              "ft_epochs": cfg.ft_epochs, "ft_lr": cfg.ft_lr, "milestones": milestones, "update_bn_stats": cfg.update_bn_stats,
              "eps": cfg.eps, "step": cfg.step, "eval_steps": cfg.eval_steps, "val_restarts": cfg.val_restarts, "alphas": list(cfg.alphas),
              "threshold": cfg.threshold, "batch": cfg.eval_batch_size, "device": _device_type(device), "code": code_version()}

    def compute() -> dict[str, Any]:
        batches = loaders(cfg, splits, device)
        seed_everything(cfg.seed)
        if module == ALL_LAYERS:
            tuned = copy.deepcopy(model)
            result = adversarial_train(tuned, batches["train"], batches["val"], epochs=cfg.ft_epochs, lr=cfg.ft_lr, milestones=milestones,
                                       attack_steps=0, seed=cfg.seed)
            start = {"epoch": 0, "lr": cfg.ft_lr, "train_loss": float("nan"), "val_clean_acc": accuracy(model, batches["val"])}
            history = [start] + [{k: r[k] for k in ("epoch", "lr", "train_loss", "val_clean_acc")} for r in result.history]
            best_epoch, trained = result.best_epoch, sum(p.numel() for p in model.parameters())
        else:
            ft = finetune_module(model, module, batches["train"], batches["val"], epochs=cfg.ft_epochs, lr=cfg.ft_lr,
                                 update_bn_stats=cfg.update_bn_stats, milestones=milestones)
            tuned, history, best_epoch = ft.model, ft.history, ft.best_epoch
            trained = dict(weight_modules(model))[module].weight.numel()
        theta_at = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # The pipeline's own validation curve: alpha = 0 (the AT model) included, so every point's change against it
        # comes with its paired interval; the alpha-0 row equals the cached validation evaluation (same images, seed).
        curve, choice, _ = choose_alpha(cfg, model, theta_at, tuned.state_dict(), batches["val"])
        return {"state": _cpu_state(tuned), "history": [dict(r) for r in history], "best_epoch": int(best_epoch), "trained_params": int(trained),
                "curve": _records(curve), "choice": choice}

    saved = load_or_compute("finetuned", params, compute)
    tuned = copy.deepcopy(model)
    tuned.load_state_dict(saved["state"])
    return {"module": module, "model": tuned.eval(), "history": _frame(saved["history"]), "best_epoch": saved["best_epoch"],
            "trained_params": saved["trained_params"], "curve": _frame(saved["curve"]), "choice": dict(saved["choice"])}


def rift(cfg: RiftConfig, splits: DataSplits, device: torch.device | str, at_checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """The whole of RiFT from the cached steps: AT model, MRC, fine-tuned module, chosen alpha.

    The module is ``cfg.ft_module`` or the least robust-critical one; alpha is chosen on
    validation. Returns :func:`trained_models`'s dict plus ``mrc`` (DataFrame), ``module``,
    ``finetuned`` (:func:`finetuned`'s dict), ``alpha``, ``choice`` and ``rift`` (the interpolated
    model, eval mode).
    """
    out = trained_models(cfg, splits, device, at_checkpoint=at_checkpoint)
    at = out["at"]
    out["mrc"] = mrc_table(cfg, at, splits, device)
    out["module"] = cfg.ft_module or str(out["mrc"]["module"].iloc[0])
    ft = finetuned(cfg, at, out["module"], splits, device)
    out["finetuned"], out["choice"], out["alpha"] = ft, ft["choice"], ft["choice"]["alpha"]
    model = copy.deepcopy(at)
    model.load_state_dict(interpolate(at.state_dict(), ft["model"].state_dict(), out["alpha"]))
    out["rift"] = model.eval()
    return out


# ----------------------------------------------------------------------------------------------
# Figures


def plot_attacks(x: torch.Tensor, y: torch.Tensor, adversarial: Mapping[str, torch.Tensor], predictions: Mapping[str, Sequence[int]],
                 names: Sequence[str], eps: float, clean_predictions: Mapping[str, Sequence[int]] | None = None):
    """A grid with one row per image: the clean image, then for each model the perturbation
    (magnified to fill the colour range: mid-grey is 0, black / white are -eps / +eps) and the
    adversarial image, titled with the model's prediction. Returns the matplotlib figure.

    Args:
        x: clean images (N, C, H, W) in [0, 1]; y: labels (N,).
        adversarial: model label -> adversarial images for that model (N, C, H, W).
        predictions: model label -> predicted classes on the adversarial images.
        names: class names. eps: the attack's l_inf radius (pixel units).
        clean_predictions: model label -> predicted classes on the clean images (shown under the clean image).
    """
    import matplotlib.pyplot as plt

    n, labels = len(x), list(adversarial)
    fig, axes = plt.subplots(n, 1 + 2 * len(labels), figsize=(1.9 * (1 + 2 * len(labels)), 2.0 * n), squeeze=False)

    def show(ax, img, title, color="black", cmap="gray", vmin=0.0, vmax=1.0):
        img = img.detach().cpu()
        ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap=cmap if img.shape[0] == 1 else None, vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=8, color=color)
        ax.set_xticks([])
        ax.set_yticks([])

    for i in range(n):
        truth = names[int(y[i])]
        clean_note = ""
        if clean_predictions:
            clean_note = "\n" + ", ".join(f"{k}: {names[int(p[i])]}" for k, p in clean_predictions.items())
        show(axes[i, 0], x[i], f"clean: {truth}{clean_note}")
        for j, label in enumerate(labels):
            delta = (adversarial[label][i].cpu() - x[i].cpu()) / (2 * eps) + 0.5  # [-eps, eps] -> [0, 1]
            show(axes[i, 1 + 2 * j], delta, f"perturbation ({label})")
            pred = int(predictions[label][i])
            show(axes[i, 2 + 2 * j], adversarial[label][i], f"{label} says: {names[pred]}", color="tab:green" if pred == int(y[i]) else "tab:red")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# The scale study (benchmarks/scale_study.py): committed results the chapters load


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


def _ci(d: Mapping[str, Any]) -> str:
    return f"{d['diff']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"


def _verdict(clean: Mapping[str, Any], robust: Mapping[str, Any], threshold: float) -> str:
    if clean["ci_low"] > 0 and robust["diff"] >= -threshold - 1e-9:
        return "gain (interval above 0)"
    if clean["ci_high"] < 0:
        return "loss (interval below 0)"
    return "no detectable change" if clean["ci_low"] <= 0 <= clean["ci_high"] else "gain, but robust drop"


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
                             "clean change [95% CI]": _ci(_curve_change(c, "clean")), "robust change [95% CI]": _ci(_curve_change(c, "robust")),
                             "chosen": "yes" if c["alpha"] == r["alpha"] else ""})
    return pd.DataFrame(rows)


def study_curve_sentence(run: Mapping[str, Any], threshold: float) -> str:
    """What the selection rule had to choose from on one run's validation curve, in words written from its numbers: the
    alpha with the largest clean change, its robust change against the rule's allowance, and the alpha the rule took."""
    points = [c for c in run["curve"] if c["alpha"] > 0]
    best = max(points, key=lambda c: (c["clean_change"], -c["alpha"]))
    ci = lambda c, kind: _ci(_curve_change(c, kind))  # noqa: E731
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


def study_trend(study: Mapping[str, Any]) -> pd.DataFrame:
    """One row per configuration of the study (seed 0): how AT was run (attack, epochs, device), RiFT as defined and its
    test changes with their paired 95% intervals."""
    threshold = study["provenance"]["threshold"]
    rows = []
    for r in study["trend"]:
        d = r["test"]["difference"]
        rows.append({"width": r["width"], "training images": r["train"],
                     "AT": _at_label(r["at"]),
                     "module (weights)": f"{r['module']} ({r['mrc']['least_params']})",
                     "MRC spread (most / least)": round(r["mrc"]["spread"], 1), "alpha": r["alpha"],
                     "AT test clean": round(r["test"]["at"]["clean_acc"], 2), "AT test robust": round(r["test"]["at"]["robust_acc"], 2),
                     "clean change [95% CI]": _ci(d["clean"]), "robust change [95% CI]": _ci(d["robust"]),
                     "verdict": _verdict(d["clean"], d["robust"], threshold)})
    return pd.DataFrame(rows)


VARIANT_LABELS = {("rift", "least"): "RiFT as defined (least critical module, lr 0.001)",
                  ("variants", "least3x3"): "least critical 3x3 conv (departs from the paper's definition)",
                  ("bn", "least"): "BatchNorm statistics updated (the reference code)", ("lr0.003", "least"): "lr 0.003",
                  ("lr0.01", "least"): "lr 0.01"}


def _test_change(row: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """An ablation row's test change against AT for ``kind`` (clean or robust), as :func:`_ci` and :func:`_verdict` read it."""
    return {"diff": row[f"test_{kind}_change"], "ci_low": row[f"test_{kind}_ci_low"], "ci_high": row[f"test_{kind}_ci_high"]}


def _curve_change(point: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """An interpolation-curve point's change against alpha = 0 for ``kind`` (clean or robust), as :func:`_ci` reads it."""
    return {"diff": point[f"{kind}_change"], "ci_low": point[f"{kind}_change_low"], "ci_high": point[f"{kind}_change_high"]}


def study_variants(study: Mapping[str, Any]) -> pd.DataFrame:
    """Every labelled fine-tuning variant of every configuration, with its test changes against AT and their intervals."""
    threshold = study["provenance"]["threshold"]
    rows = []
    for r in study["trend"]:
        entries = [("rift", "least", r["module"], r["mrc"]["least_params"], r["alpha"], r["test"]["difference"]["clean"],
                    r["test"]["difference"]["robust"])]
        for v in r["variants"]:
            if v["setting"] == "table3" or v["variant"] in ("at", "no-interp"):
                continue
            entries.append((v["setting"], v["variant"], v["modules"], v["params"], v["alpha"], _test_change(v, "clean"), _test_change(v, "robust")))
        for setting, variant, module, params, alpha, clean, robust in entries:
            rows.append({"width": r["width"], "training images": r["train"],
                         "fine-tuning": VARIANT_LABELS.get((setting, variant), f"{setting} / {variant}"),
                         "module (weights)": f"{module} ({params})", "alpha": alpha, "clean change [95% CI]": _ci(clean),
                         "robust change [95% CI]": _ci(robust), "verdict": _verdict(clean, robust, threshold)})
    return pd.DataFrame(rows)


def study_headline(study: Mapping[str, Any]) -> pd.DataFrame:
    """AT and AT+RiFT of the headline configuration, per seed: validation and test, with the paired changes."""
    block = study["headline"]
    rows = []
    for r in block["runs"]:
        for split, label in (("validation", "val"), ("test", "test")):
            d = r[split]["difference"]
            rows.append({"seed": r["seed"], "split": label, "AT clean": round(r[split]["at"]["clean_acc"], 2),
                         "AT+RiFT clean": round(r[split]["rift"]["clean_acc"], 2), "clean change [95% CI]": _ci(d["clean"]),
                         "AT robust": round(r[split]["at"]["robust_acc"], 2), "AT+RiFT robust": round(r[split]["rift"]["robust_acc"], 2),
                         "robust change [95% CI]": _ci(d["robust"]), "alpha": r["alpha"], "module": r["module"]})
    return pd.DataFrame(rows)


def study_summary_sentence(study: Mapping[str, Any]) -> str:
    """The study's answer in plain words, written from its numbers (never a claimed direction they contradict)."""
    block = study["headline"]
    pick = block["pick"]
    width, train = pick["width"], pick["train"]
    over = block.get("over_seeds")
    where = f"a ResNet-18 of width {width} adversarially trained on {train} real Fashion-MNIST images"
    trend = study_trend(study)
    gains = trend[trend["verdict"].str.startswith("gain (")]
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
        lead += (f"; pooled over the seeds' {pooled['clean']['n']} paired test images, {_ci(pooled['clean'])} clean and "
                 f"{_ci(pooled['robust'])} robust points (paired 95% score intervals)")
    widest = max(study["trend"], key=lambda r: (r["width"], r["train"]))
    if (widest["width"], widest["train"]) != (width, train):
        d = widest["test"]["difference"]
        at = widest["at"]
        lead += (f". At the study's widest, a ResNet-18 of width {widest['width']} on {widest['train']} images, adversarially trained "
                 f"with {at['method'].upper()}-{at['attack_steps']} on {'a GPU' if at['device'] == 'cuda' else 'the CPU'} (seed "
                 f"{widest['seed']}), the rule took alpha {widest['alpha']:g} and the test change was {_ci(d['clean'])} clean and "
                 f"{_ci(d['robust'])} robust points")
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
        value = float(row["clean change [95% CI]"].split(" ")[0])
        low, high = (float(v) for v in row["clean change [95% CI]"].split("[")[1].rstrip("]").split(", "))
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
                          "clean change [95% CI]": _ci(_test_change(v, "clean")), "robust change [95% CI]": _ci(_test_change(v, "robust"))}
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
                         "clean change [95% CI]": _ci(clean), "robust change [95% CI]": _ci(robust), "verdict": _verdict(clean, robust, threshold)})
        if "over_seeds" in c:
            o = c["over_seeds"]
            rows.append({"fine-tuned": label, "seeds": f"mean over {', '.join(map(str, c['seeds']))}", "alpha": None, "test images": None,
                         "clean change [95% CI]": _ci({**o["clean"], "diff": o["clean"]["mean"]}),
                         "robust change [95% CI]": _ci({**o["robust"], "diff": o["robust"]["mean"]}),
                         "verdict": ""})
            pooled = c["pooled"]
            rows.append({"fine-tuned": label, "seeds": f"pooled {', '.join(map(str, c['seeds']))}", "alpha": None,
                         "test images": pooled["clean"]["n"], "clean change [95% CI]": _ci(pooled["clean"]),
                         "robust change [95% CI]": _ci(pooled["robust"]), "verdict": _verdict(pooled["clean"], pooled["robust"], threshold)})
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
                f"won on seed 0's test split (clean {_ci(_test_change(first, 'clean'))}, robust {first['test_robust_change']:+.2f} points)")
        if "pooled" not in c:
            parts.append(head + "; one seed among several comparisons can win by chance, and its repetition on the other seeds has not run")
            continue
        pooled, over = c["pooled"], c["over_seeds"]
        holds = _verdict(pooled["clean"], pooled["robust"], threshold).startswith("gain (")
        parts.append(head + f". Run again unchanged on seeds {', '.join(str(s) for s in c['seeds'] if s != 0)} (a check fixed before they were seen), "
                     f"it changes clean accuracy by {over['clean']['mean']:+.2f} points on average over seeds "
                     f"{', '.join(map(str, c['seeds']))} ([{over['clean']['ci_low']:+.2f}, {over['clean']['ci_high']:+.2f}]) and by "
                     f"{_ci(pooled['clean'])} pooled over {pooled['clean']['n']} paired test images, robust {_ci(pooled['robust'])}: "
                     + ("the gain holds when pooled over the seeds" if holds else "the seed-0 win does not hold up"))
    return ". ".join(parts) + ("." if parts else "")


def direction(before: float, after: float, up: str = "rises", down: str = "falls", same: str = "stays level") -> str:
    """The verb a sentence about ``before`` -> ``after`` must use, from the numbers themselves (rounded as they are shown,
    to one decimal): prose glues it instead of stating a direction the numbers might contradict."""
    a, b = round(float(before), 1), round(float(after), 1)
    return up if b > a else down if b < a else same


def study_tie_check(study: Mapping[str, Any], tolerance_images: int = 2) -> pd.DataFrame:
    """Re-evaluate the study's committed checkpoints (the headline's AT and fine-tuned weights, fp16) on the first test
    images with the attack stored beside them, and set the result against the stored numbers.

    The stored numbers were measured when the study was summarised, by this code on these files; a
    CPU of another kind or another thread count can round a few images differently, hence
    ``tolerance_images``. Returns one row per (model, metric): stored, re-evaluated, the difference in
    images and whether it is within the tolerance."""
    from .checkpoint import read_checkpoint
    from .data import ImageSet, load_dataset
    from .evaluation.robust import compare, evaluate
    from .models import build_model

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


def comparison(cfg: RiftConfig, model_a: nn.Module, model_b: nn.Module, split: str, splits: DataSplits,
               device: torch.device | str) -> dict[str, Any]:
    """B against A on ``split`` as the pipeline measures it: the same images and per-image random starts (the split's
    attack seed, :func:`evaluation`'s restarts), B - A in points with paired 95% intervals and the images gained
    and lost (:func:`riftlab.compare`). Cached under both models' weights."""
    from .engine.pipeline import compare_split

    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    params = {**_data_key(cfg), "split": split, "a": state_hash(model_a), "b": state_hash(model_b), "eps": cfg.eps, "step": cfg.step,
              "steps": cfg.eval_steps, "restarts": cfg.eval_restarts if split == "test" else cfg.val_restarts,
              "batch": cfg.eval_batch_size, "device": _device_type(device), "code": code_version()}

    def compute() -> dict[str, Any]:
        result = compare_split(cfg, model_a, model_b, Batches(getattr(splits, split), cfg.eval_batch_size, device=device), split)
        return {"clean": dict(result["clean"]), "robust": dict(result["robust"])}

    return dict(load_or_compute("comparison", params, compute))
