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

__version__ = "0.1.0"

from .attacks import pgd
from .autoattack import autoattack_accuracy
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .compute import set_precision, to_device, use_precision
from .corruptions import CORRUPTIONS, REFERENCE_CORRUPTIONS, corrupt
from .criticality import adversarial_set, module_robust_criticality
from .data import Batches, DataSplits, DatasetNotFoundError, ImageSet, dataset_info, list_datasets, load_dataset, make_synthetic
from .evaluation import accuracy, compare, evaluate
from .finetune import FinetuneResult, finetune_module
from .interpolation import interpolate, interpolation_curve, select_alpha
from .losses import AT_METHODS, mart_loss, trades_loss
from .models import build_model, list_models, weight_modules
from .ood import OODResult, ood_accuracy
from .pipeline import PROFILES, RiftConfig, run_rift
from .sanity import CheckResult, gradient_masking_checks
from .training import TrainResult, adversarial_train
from .ablation import ablate

__all__ = [
    "pgd", "autoattack_accuracy", "CheckResult", "gradient_masking_checks",
    "CheckpointError", "load_checkpoint", "save_checkpoint", "adversarial_set", "module_robust_criticality",
    "Batches", "DataSplits", "DatasetNotFoundError", "ImageSet", "dataset_info", "list_datasets", "load_dataset",
    "make_synthetic", "accuracy", "compare", "evaluate", "FinetuneResult", "finetune_module", "interpolate", "interpolation_curve",
    "select_alpha", "build_model", "list_models", "weight_modules", "PROFILES", "RiftConfig", "run_rift",
    "TrainResult", "adversarial_train", "AT_METHODS", "mart_loss", "trades_loss", "ablate",
    "CORRUPTIONS", "REFERENCE_CORRUPTIONS", "corrupt", "OODResult", "ood_accuracy",
    "set_precision", "use_precision", "to_device",
]
