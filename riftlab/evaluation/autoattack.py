"""Standard AutoAttack (Croce & Hein, ICML 2020), the evaluation RobustBench reports.

This runs the original implementation, packaged on PyPI as ``pyautoattack`` (module
``pyautoattack``): APGD-CE, APGD-T (9 target classes), FAB-T and Square (5000 queries), each on the
examples that the previous attacks left correctly classified. Its robust accuracy is a much
tighter upper bound on the true robust accuracy than PGD-10's, and a large gap between the two is
the classic sign of gradient masking (see :mod:`riftlab.sanity`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..attacks import eval_mode

__all__ = ["autoattack_accuracy", "AUTOATTACK_VERSIONS"]

AUTOATTACK_VERSIONS = ("standard", "plus", "rand")
_LOGGER = "auto-attack"  # the name pyautoattack logs under


def _import_autoattack():
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise ImportError("AutoAttack needs the package pyautoattack: pip install pyautoattack "
                          "(or reinstall riftlab, which depends on it)") from None
    return AutoAttack


class _Collect(logging.Handler):
    """Keeps the text of every warning AutoAttack's own checks emit (zero gradients, randomness...)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages:  # the same check fires once per restart and target class
            self.messages.append(message)


@contextlib.contextmanager
def _captured_log(log_path: str | os.PathLike | None) -> Iterator[_Collect]:
    """Route the ``auto-attack`` logger to ``log_path`` (everything, DEBUG up) or to nowhere,
    collecting its warnings either way; the logger's previous setup is restored afterwards."""
    logger = logging.getLogger(_LOGGER)
    saved = (logger.level, logger.propagate, list(logger.handlers))
    collect = _Collect()
    handlers: list[logging.Handler] = [collect]
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(file_handler)
    logger.handlers = handlers
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # nothing on the console: the caller reports the numbers
    try:
        yield collect
    finally:
        for handler in handlers:
            handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers = saved[2]


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside the block: FAB calls ``backward()``, which would otherwise
    fill (and accumulate into) every weight's ``.grad``."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def autoattack_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    version: str = "standard",
    seed: int = 0,
    log_path: str | os.PathLike | None = None,
    batch_size: int = 256,
    per_image: bool = False,
) -> dict[str, Any]:
    """Clean and AutoAttack robust accuracy (l_inf) of ``model`` on the images ``x``.

    The model runs in eval mode (each submodule's mode is restored afterwards) and its weights get
    no gradients. The attacks are seeded with ``seed``, so a run is repeatable; the global torch
    random state is left as it was.

    Args:
        model: maps images in [0, 1], (N, C, H, W), to logits (N, K); riftlab and RobustBench
            models normalise their inputs themselves.
        x: images in [0, 1], (N, C, H, W), on the model's device.
        y: labels, (N,), int64.
        eps: l_inf radius in pixel units (8/255 for CIFAR); at 0 no attack runs (robust = clean).
        version: ``standard`` (APGD-CE, APGD-T, FAB-T, Square: what RobustBench reports),
            ``plus`` (more restarts and attacks) or ``rand`` (for randomised defences, EOT).
        seed: seed of every attack's random choices.
        log_path: file that receives AutoAttack's own log (per-attack progress and checks);
            without it the log is discarded, apart from its warnings, which are returned.
        batch_size: images per forward pass.
        per_image: also return ``robust_correct``, a boolean CPU tensor (N,): correct on the clean
            image and on AutoAttack's returned image (for paired comparisons of two models).

    Returns:
        ``{"n", "eps", "version", "seed", "clean_acc", "robust_acc" (percent), "attacks" (the
        attacks run, in order), "warnings" (AutoAttack's check messages, each once), "seconds"}``.
    """
    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; valid versions: {', '.join(AUTOATTACK_VERSIONS)}")
    if not 0 <= eps <= 1:
        raise ValueError(f"eps must be in [0, 1] (pixel units, e.g. 8/255 = 0.0314), got {eps}")
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"expected images (N, C, H, W) and labels (N,) with N >= 1, got {tuple(x.shape)} and {tuple(y.shape)}")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError("images must lie in [0, 1] (models normalise internally); got values outside")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    AutoAttack = _import_autoattack()
    x, y = x.detach(), y.detach().long()
    started = time.perf_counter()
    # AutoAttack reseeds the global generators with manual_seed; fork them so the caller's stay put.
    devices = [x.device] if x.device.type == "cuda" else []
    with eval_mode(model), _frozen(model), torch.random.fork_rng(devices=devices), _captured_log(log_path) as log:
        with torch.no_grad():
            clean = torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size] for i in range(0, len(y), batch_size)])
            num_classes = model(x[:1]).shape[1]
        if eps == 0:  # nothing to search: the attacks' step sizes are fractions of eps
            y_adv, attacks = torch.where(clean, y, -1), []
        else:
            adversary = AutoAttack(model, norm="Linf", eps=float(eps), version=version, seed=seed, device=x.device)
            if num_classes - 1 < adversary.apgd_targeted.n_target_classes:
                # The standard version targets the 9 runner-up classes; a model with fewer classes has fewer.
                adversary.apgd_targeted.n_target_classes = num_classes - 1
                adversary.fab.n_target_classes = num_classes - 1
            _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
            attacks = list(adversary.attacks_to_run)
    robust = (y_adv.to(y.device) == y) & clean  # y_adv: the prediction on each returned image
    n = len(y)
    out = {"n": n, "eps": float(eps), "version": version, "seed": seed,
           "clean_acc": 100.0 * float(clean.sum()) / n, "robust_acc": 100.0 * float(robust.sum()) / n,
           "attacks": attacks, "warnings": log.messages, "seconds": time.perf_counter() - started}
    if per_image:
        out["robust_correct"] = robust.cpu()
    return out
