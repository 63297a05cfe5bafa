"""riftlab: Robust Critical Fine-Tuning (RiFT, ICCV 2023), step by step.

The four steps, each usable alone::

    from riftlab import (load_dataset, build_model, Batches, adversarial_train, adversarial_set,
                         module_robust_criticality, finetune_module, interpolation_curve, select_alpha,
                         interpolate, evaluate, pgd)

Images are always float tensors in [0, 1] shaped (N, C, H, W); models normalise internally, so
attack budgets (eps, step) are in pixel units. On CUDA, move models with ``to_device`` (channels_last)
and riftlab computes in bf16 autocast (``set_precision("fp32")`` to turn it off); under
``torchrun`` the same functions run across the ranks (:mod:`riftlab.distributed`).
"""

from ._version import __version__

from .attacks import pgd
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .compute import set_precision, to_device, use_precision
from .data import Batches, DataSplits, DatasetNotFoundError, ImageSet, dataset_info, list_datasets, load_dataset, make_synthetic
from .models import build_model, list_models, weight_modules
from .resume import MemoryState, StepState
from .evaluation.robust import accuracy, compare, evaluate
from .evaluation.stats import over_seeds, paired_difference
from .evaluation.autoattack import autoattack_accuracy
from .evaluation.corruptions import CORRUPTIONS, REFERENCE_CORRUPTIONS, corrupt
from .evaluation.ood import OODResult, ood_accuracy
from .evaluation.sanity import CheckResult, gradient_masking_checks
from .steps.criticality import adversarial_set, module_robust_criticality
from .steps.finetune import FinetuneResult, finetune_module
from .steps.interpolation import interpolate, interpolation_curve, select_alpha
from .steps.losses import AT_METHODS, mart_loss, trades_loss
from .steps.training import TrainResult, adversarial_train
from .engine.config import PROFILES, RiftConfig
from .engine.pipeline import run_rift
from .engine.ablation import ablate

__all__ = [
    "__version__",
    "pgd", "autoattack_accuracy", "CheckResult", "gradient_masking_checks",
    "CheckpointError", "load_checkpoint", "save_checkpoint", "adversarial_set", "module_robust_criticality",
    "Batches", "DataSplits", "DatasetNotFoundError", "ImageSet", "dataset_info", "list_datasets", "load_dataset",
    "make_synthetic", "accuracy", "compare", "evaluate", "paired_difference", "over_seeds", "FinetuneResult", "finetune_module",
    "interpolate", "interpolation_curve", "select_alpha", "build_model", "list_models", "weight_modules", "PROFILES", "RiftConfig",
    "run_rift", "TrainResult", "adversarial_train", "AT_METHODS", "mart_loss", "trades_loss", "ablate",
    "CORRUPTIONS", "REFERENCE_CORRUPTIONS", "corrupt", "OODResult", "ood_accuracy",
    "set_precision", "use_precision", "to_device", "StepState", "MemoryState",
]
