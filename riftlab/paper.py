"""The paper's published numbers, as data: Table 1 and the modules the authors fine-tuned.

Source: Zhu, Hu, Wang, Xie, Yang, "Improving Generalization of Adversarial Training via Robust
Critical Fine-Tuning", ICCV 2023 (arXiv 2308.02533), Table 1 (mean of 3 seeds). ``std`` is clean
test accuracy, ``ood`` the mean accuracy on the common corruptions (CIFAR10-C, CIFAR100-C,
Tiny-ImageNet-C) and ``adv`` PGD-10 robust accuracy (l_inf, eps 8/255), all in percent.

These are the paper's numbers, typed in; riftlab did not compute them. The book's results page
shows them beside the numbers of the runs that this repository actually made.
"""

from __future__ import annotations

import pandas as pd

__all__ = ["CITATION", "DATASETS", "MODELS", "METRICS", "TABLE1", "LEAST_CRITICAL_MODULES", "MRC_EXAMPLES",
           "table1", "table1_wide", "least_critical_modules"]

CITATION = ("Zhu, Hu, Wang, Xie, Yang. Improving Generalization of Adversarial Training via Robust Critical "
            "Fine-Tuning. ICCV 2023 (arXiv 2308.02533), Table 1")

#: riftlab dataset name -> the paper's column label
DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "tinyimagenet": "Tiny-ImageNet"}
#: riftlab model name -> the paper's row label
MODELS = {"resnet18": "ResNet18", "resnet34": "ResNet34", "wrn34_10": "WRN34-10"}
#: metric key -> what it means
METRICS = {"std": "clean accuracy", "ood": "corruption (OOD) accuracy", "adv": "PGD-10 robust accuracy"}

# (model, method) -> dataset -> (std, ood, adv)
TABLE1: dict[tuple[str, str], dict[str, tuple[float, float, float]]] = {
    ("resnet18", "AT"): {"cifar10": (81.46, 73.56, 53.63), "cifar100": (57.10, 46.43, 30.15), "tinyimagenet": (49.10, 27.68, 23.28)},
    ("resnet18", "AT+RiFT"): {"cifar10": (83.44, 75.69, 53.65), "cifar100": (58.74, 48.06, 30.17), "tinyimagenet": (50.61, 28.73, 23.34)},
    ("resnet34", "AT"): {"cifar10": (84.23, 75.37, 55.31), "cifar100": (58.67, 48.24, 30.50), "tinyimagenet": (50.96, 27.91, 24.27)},
    ("resnet34", "AT+RiFT"): {"cifar10": (85.41, 77.15, 55.34), "cifar100": (60.88, 49.97, 30.58), "tinyimagenet": (52.54, 30.07, 24.37)},
    ("wrn34_10", "AT"): {"cifar10": (87.41, 78.75, 55.40), "cifar100": (62.35, 50.61, 31.66), "tinyimagenet": (52.78, 31.81, 26.07)},
    ("wrn34_10", "AT+RiFT"): {"cifar10": (87.89, 79.31, 55.41), "cifar100": (64.56, 52.69, 31.64), "tinyimagenet": (55.31, 33.86, 26.17)},
}

#: model -> dataset -> the module the authors found least robust-critical (and fine-tuned)
LEAST_CRITICAL_MODULES: dict[str, dict[str, str]] = {
    "resnet18": {"cifar10": "layer2.1.conv2", "cifar100": "layer2.1.conv2", "tinyimagenet": "layer3.1.conv2"},
    "resnet34": {"cifar10": "layer2.3.conv2", "cifar100": "layer2.3.conv2", "tinyimagenet": "layer3.5.conv2"},
    "wrn34_10": {"cifar10": "block1.layer.3.conv2", "cifar100": "block1.layer.2.conv2", "tinyimagenet": "block1.layer.2.conv2"},
}

#: ResNet18 on CIFAR10: MRC and the robust-accuracy drop (points) the paper reports for two modules
MRC_EXAMPLES = {"layer2.1.conv2": {"mrc": 0.09, "robust_drop": 2.86}, "layer4.1.conv1": {"mrc": 12.94, "robust_drop": 53.03}}


def table1() -> pd.DataFrame:
    """Table 1 in long form: one row per (model, method, dataset) with columns std, ood, adv."""
    rows = []
    for (model, method), by_dataset in TABLE1.items():
        for dataset, (std, ood, adv) in by_dataset.items():
            rows.append({"model": model, "method": method, "dataset": dataset, "std": std, "ood": ood, "adv": adv})
    return pd.DataFrame(rows)


def table1_wide() -> pd.DataFrame:
    """Table 1 laid out as in the paper: rows (model, method), columns (dataset, metric)."""
    frame = table1().set_index(["model", "method", "dataset"])[["std", "ood", "adv"]].unstack("dataset")
    frame = frame.swaplevel(0, 1, axis=1).reindex(columns=pd.MultiIndex.from_product([list(DATASETS), ["std", "ood", "adv"]]))
    frame = frame.rename(index=MODELS, level="model").rename(columns=DATASETS, level=0)
    frame.columns = frame.columns.set_names(["dataset", "metric"])
    order = [(MODELS[m], meth) for m in MODELS for meth in ("AT", "AT+RiFT")]
    return frame.reindex(order)


def least_critical_modules() -> pd.DataFrame:
    """The module fine-tuned by the authors, per model (rows) and dataset (columns)."""
    frame = pd.DataFrame(LEAST_CRITICAL_MODULES).T.reindex(columns=list(DATASETS))
    return frame.rename(index=MODELS, columns=DATASETS)
