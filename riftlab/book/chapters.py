"""What a chapter computes: its configuration and data, and the expensive steps, cached.

The expensive steps are cached in the artifacts folder (:mod:`riftlab.book.artifacts`) under a key
made of everything that determines them:

* :func:`trained_models`: the AT model and a standard-trained model of the same architecture,
  with their training histories (chapter 1 computes them, chapters 2-5 reuse them);
* :func:`mrc_table`: module robust criticality of every module of the AT model (chapter 2);
* :func:`finetuned`: one fine-tuning choice plus its interpolation curve and chosen alpha
  (chapters 3-5);
* :func:`evaluation`: clean and PGD robust accuracy of a model on a split, keyed by the model's
  weights themselves (a hash of its state dict), so a model is never attacked twice;
* :func:`comparison`: one model against another on a split, with paired intervals.

Nothing here re-implements the method: every step calls the riftlab function that does it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
import torch.nn as nn

from .._util import seed_everything
from ..compute import to_device
from ..data import Batches, DataSplits
from ..engine.pipeline import PROFILES, RiftConfig, build_for, choose_alpha, prepare
from ..evaluation.robust import accuracy, evaluate
from ..models import weight_modules
from ..resume import MemoryState
from ..steps.criticality import adversarial_set, module_robust_criticality
from ..steps.finetune import finetune_module
from ..steps.interpolation import interpolate
from ..steps.training import adversarial_train
from .artifacts import code_version, load_or_compute, state_hash


#: The name :func:`finetuned` accepts for fine-tuning every layer (the paper's Table 3 baseline).
ALL_LAYERS = "all layers"

_CLASS_NAMES = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


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
    from ..engine.runner import file_digest

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
    from ..checkpoint import load_checkpoint

    if at_checkpoint is not None:
        load_checkpoint(model, at_checkpoint, map_location=next(model.parameters()).device)
        return
    from ..zoo import load_robustbench_model, robustbench_dataset

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



def comparison(cfg: RiftConfig, model_a: nn.Module, model_b: nn.Module, split: str, splits: DataSplits,
               device: torch.device | str) -> dict[str, Any]:
    """B against A on ``split`` as the pipeline measures it: the same images and per-image random starts (the split's
    attack seed, :func:`evaluation`'s restarts), B - A in points with paired 95% intervals and the images gained
    and lost (:func:`riftlab.compare`). Cached under both models' weights."""
    from ..engine.pipeline import compare_split

    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    params = {**_data_key(cfg), "split": split, "a": state_hash(model_a), "b": state_hash(model_b), "eps": cfg.eps, "step": cfg.step,
              "steps": cfg.eval_steps, "restarts": cfg.eval_restarts if split == "test" else cfg.val_restarts,
              "batch": cfg.eval_batch_size, "device": _device_type(device), "code": code_version()}

    def compute() -> dict[str, Any]:
        result = compare_split(cfg, model_a, model_b, Batches(getattr(splits, split), cfg.eval_batch_size, device=device), split)
        return {"clean": dict(result["clean"]), "robust": dict(result["robust"])}

    return dict(load_or_compute("comparison", params, compute))
