"""The four RiFT steps, as functions of models, data and settings (nothing about files).

``training`` (adversarial training, with ``losses``: PGD-AT, TRADES, MART), ``criticality``
(module robust criticality and its fixed adversarial set), ``finetune`` (one module's weight on
clean data) and ``interpolation`` (the line between AT and fine-tuned weights, and the choice of
alpha). Each long step takes an optional ``state`` (:mod:`riftlab.resume`) to continue after a kill.
"""

from .criticality import adversarial_set, module_robust_criticality
from .finetune import FinetuneResult, finetune_module
from .interpolation import DEFAULT_ALPHAS, interpolate, interpolation_curve, select_alpha
from .training import TrainResult, adversarial_train

__all__ = ["adversarial_train", "TrainResult", "adversarial_set", "module_robust_criticality", "finetune_module", "FinetuneResult",
           "interpolate", "interpolation_curve", "select_alpha", "DEFAULT_ALPHAS"]
