"""Measuring models: clean and PGD robust accuracy and paired comparisons (``robust``), their
statistics (``stats``), what choosing on the test split would report (``selection``), AutoAttack (``autoattack``), gradient-masking checks (``sanity``) and
common corruptions (``corruptions``, ``ood``)."""

from .robust import accuracy, compare, evaluate
from .stats import over_seeds, paired_difference

__all__ = ["accuracy", "evaluate", "compare", "paired_difference", "over_seeds"]
