"""Shared fixtures: small synthetic data and small models trained once per session (seconds on CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from riftlab import Batches, MemoryState, adversarial_train, build_model, load_dataset

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]


def riftlab_commands(*arg_lists: list[str], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run ``python -m riftlab ARGS`` for each list, side by side (most of each is Python and torch starting up)."""
    procs = [subprocess.Popen([sys.executable, "-m", "riftlab", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for args in arg_lists]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


class KillAfter(MemoryState):
    """A resume state that dies, as a killed process would, right after its ``n``-th save (its progress is kept)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def save(self, progress):
        super().save(progress)
        if self.saves == self.n:
            raise KeyboardInterrupt


def riftlab_command(*args: str) -> subprocess.CompletedProcess:
    """``python -m riftlab ARGS`` as a real process: exit code, stdout and stderr."""
    return riftlab_commands(list(args))[0]


def load_tiny_splits():
    """synthetic-cifar10: 1250 train / 250 val / 500 test images (also for test scripts run as a process of their own)."""
    return load_dataset("synthetic-cifar10", synthetic_sizes=(1500, 500), val_size=250)


@pytest.fixture(scope="session")
def tiny_splits():
    """synthetic-cifar10: 1250 train / 250 val / 500 test images."""
    return load_tiny_splits()


def make_model(splits, width: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    info = splits.info
    return build_model("resnet18", info.num_classes, info.channels, info.image_size, width, info.mean, info.std)


@pytest.fixture(scope="session")
def standard_model(tiny_splits):
    """A resnet18 (width 8) trained normally for a few epochs: accurate on clean data, not robust."""
    model = make_model(tiny_splits, width=8)
    train = Batches(tiny_splits.train, 64, shuffle=True, augment=True, seed=0)
    adversarial_train(model, train, None, epochs=10, lr=0.1, attack_steps=0, milestones=[7])
    return model.eval()


@pytest.fixture(scope="session")
def at_model(tiny_splits):
    """A resnet18 (width 8) adversarially trained for a few epochs (PGD-2, eps 8/255).

    Width 8, not 4: at width 4 its robust accuracy sat near chance (13.6% under torch 2.14 with
    2 threads), too close to 10% for the tests that need a robust model."""
    model = make_model(tiny_splits, width=8, seed=1)
    train = Batches(tiny_splits.train, 64, shuffle=True, augment=True, seed=0)
    adversarial_train(model, train, None, epochs=6, lr=0.1, attack_steps=2, step=4 / 255, milestones=[5])
    return model.eval()
