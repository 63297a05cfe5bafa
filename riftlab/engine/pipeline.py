"""RiFT as stages of one run directory, and the one mapping from a :class:`RiftConfig` to each step.

    at          adversarial training (or an AT model from a file or RobustBench)   at.pt, at_history.csv
    mrc         module robust criticality on training adversarial examples       mrc.csv
    finetune    the least robust-critical module (or --module) on clean data     ft.pt, finetune.csv
    interpolate the validation curve over alpha and the paper's choice           interpolation.csv, interpolation_correct.pt,
                                                                                 alpha.json, rift.pt
    test        AT and AT+RiFT on the test split, same images and starts         test.json, test_correct.pt
    test_selection  (with report_test_selection) what the reference code's choices   test_selection.json,
                on test would report, and what choosing alone makes on a null    test_selection_correct.pt

plus ``results.json`` (everything a reader needs, assembled from the stages) and ``riftlab.lock``
(the runner's record of every stage: :mod:`riftlab.engine.runner`). Each stage's fingerprint
holds every setting that determines its result; the runner reuses a finished stage that matches,
resumes an unfinished one (``--resume``) from its per-epoch / per-module / per-alpha / per-batch
progress, and refuses one made with other settings, naming the setting.

The step commands (``riftlab train-at``, ``mrc``, ``finetune``, ``interpolate``) run a prefix of the
same stages into the same directory, so ``riftlab finetune`` followed by ``riftlab rift`` reuses
the fine-tuning and goes on from there.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
import torch.nn as nn

from .. import distributed
from .._version import __version__
from .._util import relative_distance, seed_everything
from ..checkpoint import load_checkpoint, read_checkpoint
from ..compute import resolve_device, set_precision, to_device
from ..graphs import set_cuda_graphs
from ..data import Batches, DataSplits, ImageSet, load_dataset
from ..evaluation.robust import clean_correct, compare, evaluate
from ..evaluation.selection import max_selection, reference_selection_report
from ..models import build_model
from ..resume import StepState, ensure_state
from ..steps.criticality import adversarial_set, module_robust_criticality
from ..steps.finetune import FinetuneResult, finetune_module, get_weight_module
from ..steps.interpolation import DEFAULT_ALPHAS, interpolate, interpolation_curve, select_alpha
from ..steps.training import TrainResult, adversarial_train
from .config import PROFILES, RiftConfig, attack_seed, data_params, precision_params
from .runner import RunDir, Stage, StageContext, file_digest

__all__ = ["RiftConfig", "PROFILES", "RiftRun", "AtSource", "run_rift", "prepare", "build_for", "architecture", "resolve_eval_batch_size",
           "fold_params", "training_batches", "eval_batches",
           "train_at", "finetune", "finetune_batches", "ft_params", "reference_test_selection", "choose_alpha", "evaluate_split", "compare_split", "checkpoint_meta", "results_table",
           "without_masks", "STAGES"]

STAGES = ("at", "mrc", "finetune", "interpolate", "test")
REFERENCE_ALPHAS = DEFAULT_ALPHAS  # the reference code's test curve: alpha on the 0.1 grid
SELECTION_PERMUTATIONS = 200  # sign-flip copies of the zero-effect control (riftlab.evaluation.selection)


# ----------------------------------------------------------------------------------------------
# From a RiftConfig to data, models and each step: written once, used by the runner, the ablations,
# the reproduction and the book.


def prepare(cfg: RiftConfig) -> tuple[DataSplits, torch.device]:
    """Seed every generator from ``cfg.seed``, load the data described by ``cfg`` and resolve its device.

    Under torchrun this joins the process group and gives each rank its own GPU (see
    :func:`riftlab.distributed.setup`), and sets the process-wide precision to ``cfg.precision`` and CUDA graphs
    to ``cfg.cuda_graphs``; on CUDA it turns on ``cudnn.benchmark``.
    """
    device = distributed.setup(cfg.device)
    set_precision(cfg.precision)
    set_cuda_graphs(cfg.cuda_graphs)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes (training batches, bucketed attacks): tuned once each
    seed_everything(cfg.seed)
    splits = load_dataset(cfg.dataset, cfg.data_root, cfg.download, val_size=cfg.val_size, train_subset=cfg.train_subset,
                          val_subset=cfg.val_subset, test_subset=cfg.test_subset, synthetic_sizes=cfg.synthetic_sizes)
    return splits, device


def build_for(cfg: RiftConfig, splits: DataSplits) -> nn.Module:
    """The architecture ``cfg`` names, randomly initialised (a RobustBench one when ``cfg.robustbench`` is set)."""
    info = splits.info
    if cfg.robustbench is not None:
        from ..zoo import build_robustbench_model, robustbench_dataset

        return build_robustbench_model(cfg.robustbench, robustbench_dataset(cfg.dataset), cfg.threat_model)
    return build_model(cfg.model, info.num_classes, info.channels, info.image_size, cfg.width, info.mean, info.std)


def architecture(cfg: RiftConfig) -> nn.Module:
    """:func:`build_for`'s model from the dataset's description alone (no data loaded): for what the architecture decides
    before any image is read (a module's name, the memory an attack takes)."""
    from ..data import dataset_info

    info = dataset_info(cfg.dataset)
    if cfg.robustbench is not None:
        from ..zoo import build_robustbench_model, robustbench_dataset

        return build_robustbench_model(cfg.robustbench, robustbench_dataset(cfg.dataset), cfg.threat_model)
    return build_model(cfg.model, info.num_classes, info.channels, info.image_size, cfg.width, info.mean, info.std)


# Evaluation batch sizes resolve_eval_batch_size measured, by what decides them: one measurement per process, so that
# every run of a process (reproduce's seeds, a step command then its run) gets the same size.
_AUTO_EVAL_BATCH: dict[tuple, int] = {}


def resolve_eval_batch_size(cfg: RiftConfig) -> RiftConfig:
    """``cfg`` with ``eval_batch_size`` sized from free GPU memory when ``cfg.auto_eval_batch_size`` is set, else ``cfg``.

    On CUDA the size is :func:`riftlab.evaluation.robust.eval_batch_size_for` of ``cfg``'s architecture on the run's
    device under ``cfg.precision`` (a power of two in [64, 4096] that fits half the free memory); elsewhere it is
    ``cfg.eval_batch_size`` itself. Under torchrun, where each rank attacks its slice of every batch, it is the
    smallest rank's size times the number of ranks. Measured once per process: later calls with the same settings
    return the same size. The stages' fingerprints and ``results.json``'s config hold the number, so a run resumed where
    the memory gives another size is refused by name (pass ``eval_batch_size`` as recorded).
    """
    if not cfg.auto_eval_batch_size:
        return cfg
    from ..compute import use_precision
    from ..data import dataset_info
    from ..evaluation.robust import eval_batch_size_for

    device = distributed.setup(cfg.device)  # the rank's own GPU under torchrun (prepare asks the same, at once)
    if device.type != "cuda":
        return cfg
    key = (cfg.dataset, cfg.model, cfg.width, cfg.robustbench, cfg.threat_model, cfg.precision, str(device))
    if key not in _AUTO_EVAL_BATCH:
        info = dataset_info(cfg.dataset)
        with use_precision(cfg.precision):
            size = eval_batch_size_for(to_device(architecture(cfg), device), (info.channels, info.image_size, info.image_size), device,
                                       default=cfg.eval_batch_size)
        if distributed.active():
            size = min(distributed.gather_objects(size)) * distributed.world_size()
        _AUTO_EVAL_BATCH[key] = size
    return dataclasses.replace(cfg, eval_batch_size=_AUTO_EVAL_BATCH[key])


def fold_params(cfg: RiftConfig) -> dict[str, Any]:
    """``fold_bn`` for the fingerprint of a stage that evaluates, only when set (so runs made before the setting existed
    keep their fingerprints, and a resume with the other setting is refused by name: folding changes rounding)."""
    return {"fold_bn": True} if cfg.fold_bn else {}


def training_batches(cfg: RiftConfig, splits: DataSplits, device: torch.device | str) -> Batches:
    """The training split in shuffled, crop-and-flip augmented batches of ``cfg.batch_size`` (AT and fine-tuning)."""
    return Batches(splits.train, cfg.batch_size, shuffle=True, augment=True, crop_padding=splits.info.crop_padding, device=device,
                   seed=cfg.seed)


def finetune_batches(cfg: RiftConfig, splits: DataSplits, device: torch.device | str) -> Batches:
    """The training batches fine-tuning sees: the images, order and crops of :func:`training_batches` (the images AT
    trained on, as in the reference code), padded with zeros, or mirrored at the border under the reference protocol
    (the reference code's ``RandomCrop(padding_mode="reflect")``; the padding is the dataset's, 4 on CIFAR, 8 on Tiny-ImageNet
    as there)."""
    return Batches(splits.train, cfg.batch_size, shuffle=True, augment=True, crop_padding=splits.info.crop_padding, device=device,
                   seed=cfg.seed, crop_mode="reflect" if cfg.ft_protocol == "reference" else "zeros")


def eval_batches(cfg: RiftConfig, images: ImageSet, device: torch.device | str) -> Batches:
    """``images`` in fixed-order batches of ``cfg.eval_batch_size`` (every evaluation and attack)."""
    return Batches(images, cfg.eval_batch_size, device=device)


def train_at(cfg: RiftConfig, model: nn.Module, train: Batches, val: Batches | None, state: StepState | None = None) -> TrainResult:
    """Adversarially train ``model`` in place with ``cfg``'s recipe: method, schedule, attack and validation."""
    return adversarial_train(model, train, val, epochs=cfg.at_epochs, lr=cfg.at_lr, milestones=cfg.at_schedule(), eps=cfg.eps,
                             step=cfg.at_attack_step, attack_steps=cfg.at_attack_steps, method=cfg.at_method, beta=cfg.at_beta,
                             eval_steps=cfg.eval_steps, eval_every=cfg.at_eval_every, seed=cfg.seed, state=state,
                             progress=cfg.progress, compile=cfg.compile, warmup_epochs=cfg.at_warmup_epochs)


def ft_milestones(cfg: RiftConfig) -> list[int]:
    """Fine-tuning's learning-rate drop (x0.1): halfway, as the paper's epoch 5 of 10."""
    return [max(1, cfg.ft_epochs // 2)]


def ft_params(cfg: RiftConfig) -> dict[str, Any]:
    """The fine-tuning protocol's settings for a stage's fingerprint, each only where it is not riftlab's default (so runs
    made before these settings existed keep their fingerprints, and a resume under another protocol is refused by name)."""
    given = {"ft_protocol": cfg.ft_protocol, "bn_recalibration_only": cfg.bn_recalibration_only,
             "report_test_selection": cfg.report_test_selection}
    defaults = {"ft_protocol": "riftlab", "bn_recalibration_only": False, "report_test_selection": False}
    return {k: v for k, v in given.items() if v != defaults[k]}


def finetune(cfg: RiftConfig, model: nn.Module, modules: str | Sequence[str], train: Batches, val: Batches | None,
             state: StepState | None = None) -> FinetuneResult:
    """Fine-tune ``modules`` of ``model`` (a copy) with ``cfg``'s schedule: ``ft_epochs`` at ``ft_lr``, x0.1 halfway; BatchNorm
    in train mode with ``update_bn_stats`` (the reference protocol), no weight trained with ``bn_recalibration_only``, and
    every epoch's changing tensors kept with ``report_test_selection`` (``train``: :func:`finetune_batches`)."""
    return finetune_module(model, modules, train, val, epochs=cfg.ft_epochs, lr=cfg.ft_lr, update_bn_stats=cfg.update_bn_stats,
                           milestones=ft_milestones(cfg), state=state, progress=cfg.progress, compile=cfg.compile,
                           train_weights=not cfg.bn_recalibration_only, keep_epochs=cfg.report_test_selection)


def reference_test_selection(cfg: RiftConfig, model: nn.Module, theta_at: dict[str, torch.Tensor],
                             epoch_states: Sequence[dict[str, torch.Tensor]], at_test: dict[str, torch.Tensor], test: Batches,
                             state: StepState | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the reference code would report for one fine-tuning run, chosen on the test split as it chooses, beside the
    gain that choosing alone makes when nothing changed (:func:`riftlab.evaluation.selection.reference_selection_report`).

    Each fine-tuning epoch's model (``epoch_states`` laid over ``theta_at``) is evaluated clean on ``test``; the best (the
    first of equals) is interpolated with the AT model on the reference code's 0.1 alpha grid and every point attacked as
    the test stage attacks (PGD-``eval_steps``, ``eval_restarts``, the test seed), alpha 0 being ``at_test`` (the AT
    model's per-image test results, ``clean`` and ``robust``). Alpha is the largest test clean gain with test robust
    accuracy at most ``cfg.threshold`` below AT's. ``model`` gives the architecture (its weights are restored);
    ``state`` keeps the curve's progress. Returns the report and the per-image results (``epochs``: (E, N) clean;
    ``alphas``, ``clean``, ``robust``: (A, N)). Cost: E clean passes and 10 attacked passes over ``test``.
    """
    state = ensure_state(state)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    on_device = [{k: v.to(theta_at[k].device) for k, v in kept.items()} for kept in epoch_states]
    if not on_device:
        raise ValueError("no fine-tuning epochs were kept: fine-tune with report_test_selection to report the test-selected result")
    try:
        epoch_clean = []
        for kept in on_device:
            model.load_state_dict({**theta_at, **kept})
            epoch_clean.append(clean_correct(model, test))
        epoch_clean_t = torch.stack(epoch_clean)
        best = max_selection(at_test["clean"], None, epoch_clean_t, None, float("inf"))["index"]
        alphas = [a for a in REFERENCE_ALPHAS if a > 0]
        _, masks = interpolation_curve(model, theta_at, {**theta_at, **on_device[best]}, test, cfg.eps, cfg.step, cfg.eval_steps,
                                       cfg.eval_restarts, alphas, seed=attack_seed(cfg, "test"), state=state.child("curve"),
                                       progress=cfg.progress, per_image=True, fold_bn=cfg.fold_bn)
    finally:
        model.load_state_dict(original)
    clean = torch.stack([at_test["clean"].bool().cpu(), *[m["clean"] for m in masks]])
    robust = torch.stack([at_test["robust"].bool().cpu(), *[m["robust"] for m in masks]])
    report = reference_selection_report(at_test["clean"].cpu(), at_test["robust"].cpu(), epoch_clean_t, list(range(1, len(on_device) + 1)),
                                        [0.0, *alphas], clean, robust, cfg.threshold, SELECTION_PERMUTATIONS, seed=cfg.seed)
    return report, {"epochs": epoch_clean_t, "alphas": [0.0, *alphas], "clean": clean, "robust": robust}


def choose_alpha(cfg: RiftConfig, model: nn.Module, theta_at: dict[str, torch.Tensor], theta_ft: dict[str, torch.Tensor],
                 val: Batches, state: StepState | None = None) -> tuple[pd.DataFrame, dict[str, float], list[dict[str, torch.Tensor]]]:
    """The validation curve over ``cfg.alphas`` (PGD-``eval_steps``, ``val_restarts``, the validation attack seed), the
    alpha the paper's rule picks on it (``cfg.threshold``), and each alpha's per-image results. ``model`` gives the
    architecture."""
    curve, masks = interpolation_curve(model, theta_at, theta_ft, val, cfg.eps, cfg.step, cfg.eval_steps, cfg.val_restarts, cfg.alphas,
                                       seed=attack_seed(cfg, "val"), state=state, progress=cfg.progress, per_image=True, fold_bn=cfg.fold_bn)
    return curve, select_alpha(curve, cfg.threshold), masks


def evaluate_split(cfg: RiftConfig, model: nn.Module, batches: Batches, split: str, per_image: bool = False,
                   state: StepState | None = None, restarts: int | None = None) -> dict[str, Any]:
    """Clean and PGD-``eval_steps`` accuracy of ``model`` on ``split`` as the pipeline measures it: worst of
    ``eval_restarts`` on test (``val_restarts`` on validation) and :func:`~riftlab.engine.config.attack_seed`'s starts."""
    restarts = restarts or (cfg.eval_restarts if split == "test" else cfg.val_restarts)
    return evaluate(model, batches, cfg.eps, cfg.step, cfg.eval_steps, restarts, seed=attack_seed(cfg, split), per_image=per_image,
                    state=state, progress=cfg.progress, fold_bn=cfg.fold_bn)


def compare_split(cfg: RiftConfig, model_a: nn.Module, model_b: nn.Module, batches: Batches, split: str,
                  state: StepState | None = None, restarts: int | None = None) -> dict[str, Any]:
    """:func:`evaluate_split`'s numbers for two models on the same images and random starts, with B - A's paired
    intervals (:func:`riftlab.compare`)."""
    restarts = restarts or (cfg.eval_restarts if split == "test" else cfg.val_restarts)
    return compare(model_a, model_b, batches, cfg.eps, cfg.step, cfg.eval_steps, restarts, seed=attack_seed(cfg, split), state=state,
                   progress=cfg.progress, fold_bn=cfg.fold_bn)


def without_masks(result: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's numbers without its per-image masks (for JSON)."""
    return {k: v for k, v in result.items() if not k.endswith("_correct")}


def checkpoint_meta(cfg: RiftConfig, model: nn.Module, stage: str, **extra: Any) -> dict[str, Any]:
    """What every riftlab checkpoint records: how to rebuild its model and what made it (checked on load)."""
    return {"riftlab": __version__, "dataset": cfg.dataset, "seed": cfg.seed, **getattr(model, "riftlab_config", {}),
            "robustbench": cfg.robustbench, "threat_model": cfg.threat_model, "model_dir": cfg.model_dir if cfg.robustbench else None,
            "at_method": cfg.at_method, "at_beta": cfg.at_beta, "stage": stage, **extra}


def relative_change(before: nn.Module, after: nn.Module, module: str) -> float:
    """How far fine-tuning moved ``module``'s weight: ||W_after - W_before|| / ||W_before|| (l2 over the tensor).

    MRC certifies the robust loss only within a relative radius (``mrc_eps``, 0.1 in the paper); a
    fine-tuned weight far outside it is where interpolation has to find its way back.
    """
    return relative_distance(get_weight_module(after, module).weight, get_weight_module(before, module).weight)


# ----------------------------------------------------------------------------------------------
# The stages


@dataclass(frozen=True)
class AtSource:
    """Where the AT model comes from: ``train`` (adversarial training here), ``checkpoint`` (a file, ``path``),
    ``robustbench`` (``cfg.robustbench``) or ``existing`` (the ``at`` stage an earlier command wrote into the run)."""

    kind: str = "train"
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("train", "checkpoint", "robustbench", "existing"):
            raise ValueError(f"internal: unknown AT source {self.kind!r}")


class RiftRun:
    """RiFT's stages in the run directory ``out_dir`` (the module docstring lists them).

    Data are loaded on first need, after every refusal the run directory can raise (so a refusal
    takes seconds, not the minutes of loading a dataset). ``log`` receives one line per stage.
    ``module`` fine-tunes that module instead of the least critical one; ``ft_from="existing"`` takes
    the fine-tuned model an earlier command wrote into the run, a path takes it from that file.
    ``adopt`` names stages whose finished results are used whatever settings made them: ``riftlab
    finetune`` adopts the MRC that ``riftlab mrc`` computed (its own settings are not MRC's).
    """

    def __init__(self, cfg: RiftConfig, out_dir: str | os.PathLike, at: AtSource = AtSource(), resume: bool = False,
                 overwrite: bool = False, log: Callable[[str], Any] = print, module: str | None = None, ft_from: str | None = None,
                 adopt: Sequence[str] = ()):
        self.cfg = resolve_eval_batch_size(cfg.resolved())
        self.at_source = at
        self.module_option = module if module is not None else self.cfg.ft_module
        self.ft_from = ft_from  # None: fine-tune here; "existing": the finetune stage an earlier command wrote; else a file
        self.adopt = set(adopt)  # stages whose finished results are taken as they are (the step commands' earlier steps)
        self.log = lambda *a, **k: log(*a, **k) if distributed.is_main() else None  # rank 0 speaks (decided when it speaks)
        self.dir = RunDir(out_dir, resume=resume, overwrite=overwrite, log=self.log, batch_save_interval=2.0)
        self._splits: DataSplits | None = None
        self._device: torch.device | None = None

    @property
    def out(self) -> Path:
        return self.dir.path

    # -- data and models --------------------------------------------------------------------------

    def data(self) -> tuple[DataSplits, torch.device]:
        if self._splits is None:
            self._splits, self._device = prepare(self.cfg)
        assert self._device is not None
        return self._splits, self._device

    def device_type(self) -> str:
        """``cpu`` or ``cuda``: known before the data are loaded (the stages' fingerprints hold the precision it implies)."""
        return self._device.type if self._device is not None else resolve_device(self.cfg.device).type

    def load_model(self, name: str) -> nn.Module:
        """``at.pt``, ``ft.pt`` or ``rift.pt`` of this run, on the run's device, in eval mode."""
        splits, device = self.data()
        model = build_for(self.cfg, splits)
        load_checkpoint(model, self.out / name)
        return to_device(model, device).eval()

    # -- stage declarations ----------------------------------------------------------------------

    def _common(self) -> dict[str, Any]:
        return {**data_params(self.cfg), **precision_params(self.cfg, self.device_type())}

    def at_stage(self) -> Stage:
        cfg, kind = self.cfg, self.at_source.kind
        outputs = ("at.pt", "at_history.csv") if kind == "train" else ("at.pt",)
        if kind == "existing":
            return Stage("at", {"source": "existing"}, self._missing_at, outputs=outputs, adopt=True)
        if kind == "checkpoint":
            path = Path(self.at_source.path or "")
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found; pass the AT model's file")
            params = {"source": "checkpoint", "sha1": file_digest(path), "model": cfg.model, "width": cfg.width,
                      "robustbench": cfg.robustbench, "dataset": cfg.dataset}
            return Stage("at", params, self._import_at, outputs=outputs)
        if kind == "robustbench":
            params = {"source": "robustbench", "robustbench": cfg.robustbench, "threat_model": cfg.threat_model, "dataset": cfg.dataset}
            return Stage("at", params, self._import_at, outputs=outputs)
        params = {"source": "train", **self._common(), "model": cfg.model, "width": cfg.width, "seed": cfg.seed,
                  "batch_size": cfg.batch_size, "at_epochs": cfg.at_epochs, "at_lr": cfg.at_lr, "at_milestones": cfg.at_schedule(),
                  "at_attack_steps": cfg.at_attack_steps, "at_attack_step": cfg.at_attack_step, "eps": cfg.eps,
                  "at_method": cfg.at_method, "at_beta": cfg.at_beta if cfg.at_method != "pgd" else None, "eval_steps": cfg.eval_steps,
                  "step": cfg.step, "eval_batch_size": cfg.eval_batch_size, "at_eval_every": cfg.at_eval_every, "compile": cfg.compile,
                  **({"cuda_graphs": True} if cfg.cuda_graphs else {}),  # only when set: runs from before these settings keep their fingerprint
                  **({"at_warmup_epochs": cfg.at_warmup_epochs} if cfg.at_warmup_epochs else {})}
        return Stage("at", params, self._train_at, outputs=outputs)

    def mrc_stage(self) -> Stage:
        cfg = self.cfg
        params = {**self._common(), "seed": cfg.seed, "mrc_examples": cfg.mrc_examples, "mrc_eps": cfg.mrc_eps, "mrc_passes": cfg.mrc_passes,
                  "mrc_step_size": cfg.mrc_step_size, "eps": cfg.eps, "step": cfg.step, "eval_steps": cfg.eval_steps,
                  "eval_batch_size": cfg.eval_batch_size}
        return Stage("mrc", params, self._mrc, inputs=("at",), outputs=("mrc.csv",))

    def finetune_module_name(self) -> tuple[str, bool]:
        """The module to fine-tune and whether MRC chose it (then the ``mrc`` stage must have finished)."""
        if self.module_option is not None:
            return self.module_option, False
        rec = self.dir.record("mrc")
        if rec is None or rec.get("status") != "done":
            raise FileNotFoundError(f"{self.out} has no finished MRC (mrc.csv): pass --module NAME or run `riftlab mrc` first")
        return str(self.dir.summary("mrc")["least"]), True

    def finetune_stage(self) -> Stage:
        cfg = self.cfg
        if self.ft_from == "existing":
            return Stage("finetune", {"source": "existing"}, self._missing_ft, inputs=("at",), outputs=("ft.pt",), adopt=True)
        if self.ft_from is not None:
            path = Path(self.ft_from)
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found; pass the fine-tuned model's file")
            return Stage("finetune", {"source": "checkpoint", "sha1": file_digest(path)}, self._import_ft, inputs=("at",),
                         outputs=("ft.pt",))
        module, from_mrc = self.finetune_module_name()
        params = {**self._common(), "seed": cfg.seed, "module": module, "module_from": "mrc" if from_mrc else "option",
                  "ft_epochs": cfg.ft_epochs, "ft_lr": cfg.ft_lr, "ft_milestones": ft_milestones(cfg), "update_bn_stats": cfg.update_bn_stats,
                  "batch_size": cfg.batch_size, "eval_batch_size": cfg.eval_batch_size, "compile": cfg.compile, **ft_params(cfg)}
        outputs = ("ft.pt", "finetune.csv") + (("ft_epochs.pt",) if cfg.report_test_selection else ())
        return Stage("finetune", params, self._finetune, inputs=("at", "mrc") if from_mrc else ("at",), outputs=outputs)

    def interpolate_stage(self) -> Stage:
        cfg = self.cfg
        params = {**self._common(), "seed": attack_seed(cfg, "val"), "alphas": list(cfg.alphas), "threshold": cfg.threshold,
                  "eps": cfg.eps, "step": cfg.step, "eval_steps": cfg.eval_steps, "val_restarts": cfg.val_restarts,
                  "eval_batch_size": cfg.eval_batch_size, **fold_params(cfg)}
        return Stage("interpolate", params, self._interpolate, inputs=("at", "finetune"),
                     outputs=("interpolation.csv", "interpolation_correct.pt", "alpha.json", "rift.pt"))

    def test_stage(self) -> Stage:
        cfg = self.cfg
        params = {**self._common(), "seed": attack_seed(cfg, "test"), "eps": cfg.eps, "step": cfg.step, "eval_steps": cfg.eval_steps,
                  "eval_restarts": cfg.eval_restarts, "eval_batch_size": cfg.eval_batch_size, **fold_params(cfg)}
        return Stage("test", params, self._test, inputs=("at", "interpolate"), outputs=("test.json", "test_correct.pt"))

    def test_selection_stage(self) -> Stage:
        cfg = self.cfg
        params = {**self._common(), "seed": attack_seed(cfg, "test"), "alphas": list(REFERENCE_ALPHAS), "threshold": cfg.threshold,
                  "eps": cfg.eps, "step": cfg.step, "eval_steps": cfg.eval_steps, "eval_restarts": cfg.eval_restarts,
                  "eval_batch_size": cfg.eval_batch_size, "permutations": SELECTION_PERMUTATIONS, "null_seed": cfg.seed, **fold_params(cfg)}
        return Stage("test_selection", params, self._test_selection, inputs=("at", "finetune", "test"),
                     outputs=("test_selection.json", "test_selection_correct.pt"))

    def stage(self, name: str) -> Stage:
        stage = {"at": self.at_stage, "mrc": self.mrc_stage, "finetune": self.finetune_stage, "interpolate": self.interpolate_stage,
                 "test": self.test_stage, "test_selection": self.test_selection_stage}[name]()
        if name not in self.adopt:
            return stage
        command = {"at": "train-at", "mrc": "mrc", "finetune": "finetune", "interpolate": "interpolate"}.get(name, name)

        def missing(ctx: StageContext) -> dict[str, Any]:
            raise FileNotFoundError(f"{self.out} has no finished {name} stage: run `riftlab {command}` first")

        return dataclasses.replace(stage, adopt=True, compute=missing)

    # -- running ---------------------------------------------------------------------------------

    def stages_until(self, until: str = "test") -> list[str]:
        """The stages a run up to ``until`` needs: MRC only when it chooses the module."""
        wanted = list(STAGES[: STAGES.index(until) + 1])
        if "finetune" in wanted and (self.module_option is not None or self.ft_from is not None):
            wanted.remove("mrc")
        if until == "test" and self.cfg.report_test_selection:
            if self.ft_from is not None:
                raise ValueError("report_test_selection (--report-test-selection, or --protocol reference) needs every fine-tuning "
                                 "epoch, which an imported fine-tuned model does not have: fine-tune in this run instead")
            wanted.append("test_selection")
        return wanted

    def check(self, until: str = "test") -> None:
        """Raise now, before any data are loaded, the refusal the run directory would raise for the stages up to ``until``.

        Stages whose settings depend on an earlier stage's result (the module MRC picks) are checked when they can be."""
        if self.module_option is not None and "finetune" in self.stages_until(until):
            self._check_module_name(self.module_option)  # a misspelt name is the error to report, before any other
        if (self.out / "results.json").is_file() and not self.dir.lock_path.is_file() and not self.dir.overwrite:
            raise FileExistsError(f"{self.out} holds a results.json but no riftlab.lock records how it was made (an older riftlab's "
                                  "or another program's run): pass --overwrite to start over there, or choose another --out")
        for name in self.stages_until(until):
            try:
                stage = self.stage(name)
            except FileNotFoundError:
                if name == "finetune" and self.module_option is None and self.ft_from is None:
                    return  # MRC has not run yet: it will choose the module
                raise
            self.dir.check(stage)

    def _check_module_name(self, name: str) -> None:
        """An unknown module name, raised from the architecture alone (no data, no weights)."""
        get_weight_module(architecture(self.cfg), name)

    def run(self, until: str = "test") -> dict[str, Any]:
        """Run (or reuse, or resume) the stages up to ``until``; with ``until="test"`` also write ``results.json``.

        Returns the summaries by stage (and ``"results"``)."""
        self.check(until)
        self._announce()
        done: dict[str, Any] = {}
        for name in self.stages_until(until):
            done[name] = self.dir.run(self.stage(name))
        if until == "test":
            done["results"] = self.results()
        return done

    def _announce(self) -> None:
        splits, device = self.data()
        cfg = self.cfg
        arch = f"RobustBench {cfg.robustbench}" if cfg.robustbench is not None else f"{cfg.model} (width {cfg.width or 'default'})"
        self.log(f"riftlab {__version__}: {arch} on {cfg.dataset} {splits.sizes()}, device {device}")

    # -- what each stage does -----------------------------------------------------------------------

    def _missing_at(self, ctx: StageContext) -> dict[str, Any]:
        raise FileNotFoundError(f"{self.out / 'at.pt'} not found; pass --checkpoint or run `riftlab train-at` first")

    def _train_at(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.cfg
        splits, device = self.data()
        seed_everything(cfg.seed)  # the initial weights come from the seed alone, whatever ran before in this process
        model = to_device(build_for(cfg, splits), device)
        self.log(f"adversarial training ({cfg.at_method}): {cfg.at_epochs} epochs, PGD-{cfg.at_attack_steps} "
                 f"(eps {cfg.eps:.4f}, step {cfg.at_attack_step:.4f})")
        result = train_at(cfg, model, training_batches(cfg, splits, device), eval_batches(cfg, splits.val, device), state=ctx.state)
        ctx.save_checkpoint("at.pt", {"model_state": model.state_dict(), "meta": checkpoint_meta(cfg, model, "at")})
        ctx.write_csv("at_history.csv", pd.DataFrame(result.history))
        best = result.history[result.best_epoch - 1] if result.best_epoch > 0 else result.history[-1]
        self.log(f"best AT epoch {result.best_epoch}: val {best}")
        return {"best_epoch": result.best_epoch, "best": best}

    def _import_at(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.cfg
        splits, device = self.data()
        model = build_for(cfg, splits)
        if self.at_source.kind == "checkpoint":
            load_checkpoint(model, self.at_source.path)
            where = str(self.at_source.path)
            self.log(f"loaded AT model from {where}")
        else:
            from ..zoo import load_robustbench_model, robustbench_dataset

            model.load_state_dict(load_robustbench_model(cfg.robustbench, robustbench_dataset(cfg.dataset), cfg.threat_model,
                                                         cfg.model_dir).state_dict())
            where = f"RobustBench {cfg.robustbench} ({cfg.threat_model}) from {cfg.model_dir}"
            self.log(f"AT model: {where}")
        ctx.save_checkpoint("at.pt", {"model_state": model.state_dict(), "meta": checkpoint_meta(cfg, model, "at", source=where)})
        return {"source": where}

    def _mrc(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.cfg
        splits, device = self.data()
        model = self.load_model("at.pt")
        source = eval_batches(cfg, splits.train.subset(cfg.mrc_examples, seed=cfg.seed), device)
        adv = adversarial_set(model, source, cfg.eps, cfg.step, cfg.eval_steps, seed=attack_seed(cfg, "train"), progress=cfg.progress)
        table = module_robust_criticality(model, adv, eps=cfg.mrc_eps, passes=cfg.mrc_passes, step_size=cfg.mrc_step_size, state=ctx.state,
                                          progress=cfg.progress)
        ctx.write_csv("mrc.csv", table)
        first, last = table.iloc[0], table.iloc[-1]
        self.log(f"MRC: least robust-critical {first['module']} ({first['mrc']:.4f}), most {last['module']} ({last['mrc']:.4f})")
        return {"least": str(first["module"]), "least_mrc": float(first["mrc"]), "least_params": int(first["params"]),
                "most": str(last["module"]), "most_mrc": float(last["mrc"])}

    def _finetune(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.cfg
        splits, device = self.data()
        module = str(ctx.stage.params["module"])
        at = self.load_model("at.pt")
        get_weight_module(at, module)  # a misspelt name is the error to report
        what = "BatchNorm recalibration alone (no weight trained), the schedule of" if cfg.bn_recalibration_only else "fine-tuning"
        self.log(f"{what} {module}: {cfg.ft_epochs} epochs at lr {cfg.ft_lr} ({cfg.ft_protocol} protocol)")
        ft = finetune(cfg, at, module, finetune_batches(cfg, splits, device), eval_batches(cfg, splits.val, device), state=ctx.state)
        moved = relative_change(at, ft.model, module)
        ctx.save_checkpoint("ft.pt", {"model_state": ft.model.state_dict(),
                                      "meta": checkpoint_meta(cfg, ft.model, "finetuned", module=module, best_epoch=ft.best_epoch)})
        ctx.write_csv("finetune.csv", pd.DataFrame(ft.history))
        if cfg.report_test_selection:  # each epoch's changing tensors: what choosing the epoch on test needs
            ctx.save_checkpoint("ft_epochs.pt", {"epochs": ft.epoch_states, "module": module})
        self.log(f"fine-tuned {module}: kept epoch {ft.best_epoch}; its weight moved by {moved:.3g} of its norm; "
                 f"MRC measured the robust loss within {cfg.mrc_eps:g}")
        return {"module": module, "best_epoch": ft.best_epoch, "relative_change": moved}

    def _missing_ft(self, ctx: StageContext) -> dict[str, Any]:
        raise FileNotFoundError(f"{self.out / 'ft.pt'} not found; pass --ft or run `riftlab finetune` first")

    def _import_ft(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.cfg
        splits, _ = self.data()
        model = build_for(cfg, splits)
        meta = load_checkpoint(model, self.ft_from)
        at = self.load_model("at.pt")
        changed = [n for n, t in model.state_dict().items() if not torch.equal(t, at.state_dict()[n].to(t.device))]
        module = meta.get("module") or "+".join(sorted({n.rsplit(".", 1)[0] for n in changed})) or "none"
        ctx.save_checkpoint("ft.pt", {"model_state": model.state_dict(), "meta": {**checkpoint_meta(cfg, model, "finetuned", module=module),
                                                                                  "source": str(self.ft_from)}})
        self.log(f"fine-tuned model from {self.ft_from} (module {module})")
        return {"module": module, "best_epoch": meta.get("best_epoch"), "relative_change": None}

    def _interpolate(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.cfg
        splits, device = self.data()
        at, ft = self.load_model("at.pt"), self.load_model("ft.pt")
        theta_at = {k: v.detach().clone() for k, v in at.state_dict().items()}
        curve, choice, masks = choose_alpha(cfg, at, theta_at, ft.state_dict(), eval_batches(cfg, splits.val, device), state=ctx.state)
        ctx.write_csv("interpolation.csv", curve)
        ctx.save_checkpoint("interpolation_correct.pt", {"alphas": list(cfg.alphas), "masks": masks})
        ctx.write_json("alpha.json", choice)
        module = ctx.inputs["finetune"].get("module")
        ctx.save_checkpoint("rift.pt", {"model_state": interpolate(theta_at, ft.state_dict(), choice["alpha"]),
                                        "meta": checkpoint_meta(cfg, at, "rift", module=module, alpha=choice["alpha"])})
        chosen = curve.loc[curve["alpha"] == choice["alpha"]].iloc[0]
        base = curve.loc[curve["alpha"] == 0.0].iloc[0]
        self.log(f"chosen alpha {choice['alpha']} on validation: clean {choice['clean_gain']:+.2f}, robust {choice['robust_change']:+.2f} points")
        return {"alpha": choice["alpha"], "choice": choice,
                "at": {"clean_acc": float(base["clean_acc"]), "robust_acc": float(base["robust_acc"])},
                "rift": {"clean_acc": choice["clean_acc"], "robust_acc": choice["robust_acc"]},
                "difference": {kind: {"diff": float(chosen[f"{kind}_change"]), "ci_low": float(chosen[f"{kind}_change_low"]),
                                      "ci_high": float(chosen[f"{kind}_change_high"]), "n": len(splits.val)} for kind in ("clean", "robust")},
                "seed": attack_seed(cfg, "val")}

    def _test(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.cfg
        splits, device = self.data()
        at, rift = self.load_model("at.pt"), self.load_model("rift.pt")
        result = compare_split(cfg, at, rift, eval_batches(cfg, splits.test, device), "test", state=ctx.state)
        ctx.save_checkpoint("test_correct.pt", {"at": {k: result["a"][f"{k}_correct"] for k in ("clean", "robust")},
                                                "rift": {k: result["b"][f"{k}_correct"] for k in ("clean", "robust")}})
        report = {"at": without_masks(result["a"]), "rift": without_masks(result["b"]),
                  "difference": {"clean": result["clean"], "robust": result["robust"]}}
        ctx.write_json("test.json", report)
        return report

    def _test_selection(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.cfg
        splits, device = self.data()
        at = self.load_model("at.pt")
        theta_at = {k: v.detach().clone() for k, v in at.state_dict().items()}
        epochs = read_checkpoint(self.out / "ft_epochs.pt")["epochs"]
        at_test = read_checkpoint(self.out / "test_correct.pt")["at"]
        report, masks = reference_test_selection(cfg, at, theta_at, epochs, at_test, eval_batches(cfg, splits.test, device), ctx.state)
        ctx.save_checkpoint("test_selection_correct.pt", masks)
        ctx.write_json("test_selection.json", report)
        null = report["null"]
        self.log(f"chosen on test as the reference code chooses: epoch {report['epoch']}, alpha {report['alpha']}, clean "
                 f"{report['clean_gain']:+.2f}, robust {report['robust_change']:+.2f} points; choosing alone, with no effect, reports "
                 f"{null['mean']:+.2f} on average (95th percentile {null['p95']:+.2f}; p = {null['p_value']:.3f})")
        return report

    # -- results.json ----------------------------------------------------------------------------

    def results(self) -> dict[str, Any]:
        """``results.json``: the run's configuration, choices, and AT vs AT+RiFT on validation and test with intervals."""
        from .runner import write_json

        splits, _ = self.data()
        info = splits.info
        s = {name: self.dir.summary(name) for name in STAGES if self.dir.record(name) is not None}
        mrc = s.get("mrc") or {}
        interp, ft = s["interpolate"], s["finetune"]
        results = {
            "riftlab": __version__,
            "config": dataclasses.asdict(self.cfg),
            "dataset": {"name": self.cfg.dataset, "description": info.description, "synthetic": info.synthetic, **splits.sizes()},
            "module": ft["module"],
            "mrc_least": {"module": mrc.get("least"), "mrc": mrc.get("least_mrc")},
            "mrc_most": {"module": mrc.get("most"), "mrc": mrc.get("most_mrc")},
            "alpha": interp["alpha"],
            "finetune_best_epoch": ft.get("best_epoch"),
            "finetune_relative_change": ft.get("relative_change"),
            "validation": {"at": interp["at"], "rift": interp["rift"], "difference": interp["difference"]},
            "test": s["test"],
            "seconds": {name: (self.dir.record(name) or {}).get("seconds") for name in STAGES},
        }
        if self.cfg.report_test_selection:  # beside the validation-selected result, never instead of it
            results["test_selected"] = self.dir.summary("test_selection")
            results["seconds"]["test_selection"] = (self.dir.record("test_selection") or {}).get("seconds")
        write_json(self.out / "results.json", results)
        self.log(results_table(results))
        return results


def run_rift(cfg: RiftConfig, out_dir: str | os.PathLike, at_checkpoint: str | os.PathLike | None = None,
             resume: bool = False, overwrite: bool = False, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run RiFT end to end in the run directory ``out_dir``; returns the results dict (``results.json``).

    Without ``at_checkpoint`` the AT model is trained first, unless ``cfg.robustbench`` names a
    RobustBench model to start from (read from ``cfg.model_dir``). Every stage saves its progress
    atomically (per epoch, per module, per alpha, per batch); ``resume=True`` continues a killed
    run from where it stopped, with the same final result; a finished stage with the same settings
    is reused, one with other settings refused (see :mod:`riftlab.engine.runner`).
    """
    source = (AtSource("checkpoint", str(at_checkpoint)) if at_checkpoint is not None
              else AtSource("robustbench") if cfg.robustbench is not None else AtSource("train"))
    return RiftRun(cfg, out_dir, at=source, resume=resume, overwrite=overwrite, log=log).run("test")["results"]


def results_table(results: dict[str, Any]) -> str:
    """The AT vs AT+RiFT table as text, with the RiFT - AT differences and their paired 95% intervals."""
    from ..evaluation.stats import format_difference

    v, t = results["validation"], results["test"]
    lines = [f"{'':10s} {'val clean':>10s} {'val robust':>11s} {'test clean':>11s} {'test robust':>12s}"]
    for key, label in (("at", "AT"), ("rift", "AT+RiFT")):
        lines.append(f"{label:10s} {v[key]['clean_acc']:10.2f} {v[key]['robust_acc']:11.2f} {t[key]['clean_acc']:11.2f} {t[key]['robust_acc']:12.2f}")
    for kind in ("clean", "robust"):
        lines.append(f"RiFT - AT, {kind:6s}: validation {format_difference(v['difference'][kind])}, "
                     f"test {format_difference(t['difference'][kind])} (points, 95% paired interval, images +gained/-lost)")
    lines.append(f"module {results['module']}, alpha {results['alpha']}; attack seeds {results['config']['seed']} (validation) "
                 f"and {t['at']['seed']} (test)")
    chosen = results.get("test_selected")
    if chosen:
        lines.append(f"chosen on test as the reference code chooses (epoch {chosen['epoch']}, alpha {chosen['alpha']}): clean "
                     f"{chosen['clean_gain']:+.2f}, robust {chosen['robust_change']:+.2f}; with no effect at all, that choice reports "
                     f"{chosen['null']['mean']:+.2f} on average (95th percentile {chosen['null']['p95']:+.2f})")
    return "\n".join(lines)
