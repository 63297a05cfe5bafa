"""torch.compile against eager mode on the CPU, in a process of its own (``tests/test_compute.py`` runs it).

Inductor's generated C++ kernels have crashed the whole interpreter under torch 2.14.1 on the CPU
(glibc: "double free", SIGABRT), now and then and on some machines only; in a child process such a
crash fails one test with its message instead of aborting the suite. One OpenMP thread from the start
(``OMP_NUM_THREADS=1``, set by the caller): the crash was seen with two. Writes a JSON of what both
modes learned and measured to ``sys.argv[1]``.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from riftlab import Batches, adversarial_train, evaluate
from riftlab.compute import compiled

from conftest import load_tiny_splits, make_model  # the caller puts tests/ on PYTHONPATH


def main(out: str) -> None:
    torch.set_num_threads(1)  # conftest's import asked for 2; no parallel region has run yet
    splits = load_tiny_splits()
    data = splits.train.subset(256, seed=0)
    result = {}
    models = {}
    for flag in (False, True):
        model = make_model(splits, width=4, seed=5)
        assert compiled(model, False) is model
        train = Batches(data, 64, shuffle=True, augment=True, seed=0)
        val = Batches(splits.val, 250)
        # Standard training: with PGD in the loop, float-order differences flip a few gradient signs
        # and the two runs drift apart by design; the attack path is compared on a fixed model below.
        out_ = adversarial_train(model, train, val, epochs=2, lr=0.05, attack_steps=0, compile=flag)
        models[flag] = model
        result["compiled" if flag else "eager"] = {"history": out_.history, "state_keys": list(model.state_dict())}
    model = models[False].eval()
    test = Batches(splits.test, 250)
    result["attack_eager"] = evaluate(model, test, 8 / 255, 2 / 255, steps=3, seed=0)
    result["attack_compiled"] = evaluate(compiled(model, True), test, 8 / 255, 2 / 255, steps=3, seed=0)
    with open(out, "w") as f:
        json.dump(result, f, default=float)
    sys.stdout.flush()
    os._exit(0)  # what was to be measured is written; skip the teardown of inductor's kernels


if __name__ == "__main__":
    main(sys.argv[1])
