"""RobustBench models as RiFT starting points.

RobustBench's model zoo holds adversarially trained models by name (``Sehwag2021Proxy_R18``,
``Wong2020Fast``...). ``robustbench.utils.load_model`` reads ``<model_dir>/<dataset>/<threat>/<name>.pt``
and downloads it first when it is missing. Like riftlab's own models, RobustBench models take images
in [0, 1] (those that need normalisation do it inside), so riftlab's attacks, MRC, fine-tuning
and interpolation apply unchanged; module names are RobustBench's own (``layer2.1.conv2``,
``block1.layer.3.conv2``...).

A riftlab checkpoint of such a model records ``robustbench`` (the name), ``threat_model`` and
``robustbench_dataset`` in its metadata; :func:`build_robustbench_model` rebuilds the bare
architecture from them (no file read, no download) so the checkpoint's weights can be loaded.

RobustBench is an optional dependency: ``pip install riftlab[robustbench]``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch.nn as nn

__all__ = ["load_robustbench_model", "build_robustbench_model", "robustbench_dataset", "robustbench_model_path",
           "MissingDependencyError", "THREAT_MODELS"]

THREAT_MODELS = ("Linf", "L2", "corruptions")
# riftlab dataset -> RobustBench dataset. The synthetic sets have the real sets' shapes, so a
# RobustBench model runs on them (useful for tests and the demo; its accuracy there means nothing).
_DATASETS = {"cifar10": "cifar10", "synthetic-cifar10": "cifar10", "cifar100": "cifar100", "synthetic-cifar100": "cifar100"}
_INSTALL = "pip install 'riftlab[robustbench]'"


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message says what to install."""


def _robustbench() -> Any:
    """Import ``robustbench.utils`` (and its model zoo), working around two packaging problems.

    robustbench 1.1.1 on PyPI imports ``autoattack`` (the GitHub package's module name) but
    declares the dependency ``pyautoattack``, the same code under the module name ``pyautoattack``:
    when ``autoattack`` is absent, that module is registered under the name robustbench expects.
    It also imports ``pkg_resources``, which setuptools 81 removed (the extra pins setuptools<81).
    """
    if importlib.util.find_spec("robustbench") is None:
        raise MissingDependencyError(f"RobustBench models need the robustbench package: {_INSTALL}")
    if "autoattack" not in sys.modules and importlib.util.find_spec("autoattack") is None:
        try:
            pyautoattack = importlib.import_module("pyautoattack")
            state = importlib.import_module("pyautoattack.state")
        except ImportError:
            raise MissingDependencyError(f"robustbench needs AutoAttack (the pyautoattack package): {_INSTALL}") from None
        sys.modules["autoattack"] = pyautoattack
        sys.modules["autoattack.state"] = state
    try:
        with warnings.catch_warnings():  # its imports warn about deprecated torch and setuptools APIs
            warnings.simplefilter("ignore")
            return importlib.import_module("robustbench.utils")
    except ModuleNotFoundError as err:
        if err.name == "pkg_resources":
            raise MissingDependencyError("robustbench imports pkg_resources, which setuptools 81 removed: "
                                         f"pip install 'setuptools<81' (or {_INSTALL})") from None
        raise MissingDependencyError(f"robustbench cannot be imported (missing module {err.name!r}): {_INSTALL}") from None


def robustbench_dataset(dataset: str) -> str:
    """The RobustBench dataset (``cifar10`` / ``cifar100``) whose models run on riftlab's ``dataset``."""
    if dataset not in _DATASETS:
        raise ValueError(f"RobustBench has no models for dataset {dataset!r}; datasets with RobustBench models: {', '.join(_DATASETS)}")
    return _DATASETS[dataset]


def _check_threat_model(threat_model: str) -> None:
    if threat_model not in THREAT_MODELS:
        raise ValueError(f"unknown threat model {threat_model!r}; valid threat models: {', '.join(THREAT_MODELS)}")


def _zoo_entry(name: str, dataset: str, threat_model: str) -> tuple[Any, dict[str, Any] | None, str]:
    """(robustbench.utils, the zoo entry or None for a timm-hosted model, timm's name for it)."""
    _check_threat_model(threat_model)
    utils = _robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    models = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    timm_name = f"{name.lower().replace('-', '_')}_{dataset}_{threat_model.lower()}"
    if name in models:
        return utils, models[name], timm_name
    if utils.timm.is_model(timm_name):
        return utils, None, timm_name
    raise ValueError(f"unknown RobustBench model {name!r} for {dataset} / {threat_model}; valid names: {', '.join(models)}")


def _tag(model: nn.Module, name: str, dataset: str, threat_model: str) -> nn.Module:
    # What riftlab checkpoints record about the architecture (see load_checkpoint's meta check).
    model.riftlab_config = {"model": f"robustbench:{name}", "robustbench": name, "threat_model": threat_model,
                            "robustbench_dataset": dataset}
    return model


def robustbench_model_path(name: str, dataset: str = "cifar10", threat_model: str = "Linf",
                           model_dir: str | os.PathLike = "models") -> Path:
    """Where ``robustbench.utils.load_model`` looks for the weights: ``model_dir/<dataset>/<threat>/<name>.pt``."""
    _check_threat_model(threat_model)
    return Path(model_dir) / dataset / threat_model / f"{name}.pt"


def load_robustbench_model(name: str, dataset: str = "cifar10", threat_model: str = "Linf",
                           model_dir: str | os.PathLike = "models") -> nn.Module:
    """A RobustBench model with its published weights, in eval mode, through ``robustbench.utils.load_model``.

    Args:
        name: the RobustBench name, e.g. ``Sehwag2021Proxy_R18`` (a ResNet-18, PGD-AT on CIFAR-10).
        dataset: RobustBench's dataset, ``cifar10`` or ``cifar100`` (see :func:`robustbench_dataset`).
        threat_model: ``Linf`` (riftlab's attacks), ``L2`` or ``corruptions``.
        model_dir: RobustBench's model folder; the weights are ``model_dir/<dataset>/<threat>/<name>.pt``
            and RobustBench downloads them there when the file is missing (needs internet).
    """
    utils, _, _ = _zoo_entry(name, dataset, threat_model)
    path = robustbench_model_path(name, dataset, threat_model, model_dir)
    existed = path.is_file()
    try:
        model = utils.load_model(model_name=name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)
    except Exception as err:
        if existed:
            raise ValueError(f"cannot load RobustBench model {name} from {path}: {type(err).__name__}: {err}") from None
        raise FileNotFoundError(f"RobustBench model {name} is not in {path} and could not be downloaded "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                                "put the file there or retry where the internet is reachable") from None
    return _tag(model.eval(), name, dataset, threat_model)


def build_robustbench_model(name: str, dataset: str = "cifar10", threat_model: str = "Linf") -> nn.Module:
    """The architecture of a RobustBench model, randomly initialised: reads no file, downloads nothing.

    For loading a riftlab checkpoint (MRC, fine-tuning, interpolation results) of that model.
    """
    utils, entry, timm_name = _zoo_entry(name, dataset, threat_model)
    if entry is None:
        from robustbench.model_zoo.enums import BenchmarkDataset

        model = utils.timm.create_model(timm_name, num_classes=utils.DATASET_CLASSES[BenchmarkDataset(dataset)], pretrained=False)
    else:
        model = entry["model"]()
    return _tag(model.eval(), name, dataset, threat_model)
