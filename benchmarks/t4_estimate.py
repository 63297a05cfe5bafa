"""How long RiFT takes on a free Colab T4: FLOPs counted stage by stage, divided by what a T4 sustains.

    python benchmarks/t4_estimate.py                      # prints the table, writes benchmarks/results/t4-estimate.json

The FLOPs are measured, not guessed: each kind of step riftlab runs (a PGD step, a training step,
a fine-tuning step of one module, an MRC ascent step of each module through its cached activations,
a clean forward pass) is run once on a small CIFAR-shaped batch under ``torch.utils.flop_counter``,
per image, with ResNet-18 at full width; the counts of each stage come from the profile's settings
(images, epochs, passes, alphas, restarts). The time is FLOPs / sustained rate. No T4 was available
where this was written, so the rate is an assumption, stated in the output: a T4 peaks at 65
TFLOP/s in fp16 on tensor cores; convolution networks of this size sustain a fraction of it, and the
estimate is given at 8 and at 20 TFLOP/s (a slow and a typical case) with the same FLOPs. Attacks
that stop early (evaluation attacks only what is still correct) make the real count smaller; the
estimate counts every image at every step, an upper bound.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from riftlab import build_model, weight_modules
from riftlab.engine.config import PROFILES, RiftConfig
from riftlab.steps.criticality import _Rest

REPO = Path(__file__).resolve().parents[1]
RATES = (8.0, 20.0)  # TFLOP/s sustained on a T4 in fp16 (peak 65): a slow and a typical case


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def per_image_flops(batch: int = 8) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3, 32, None).eval()
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def pgd_step():
        xa = x.clone().requires_grad_(True)
        for p in model.parameters():
            p.requires_grad_(False)
        F.cross_entropy(model(xa), y).backward()  # (FlopCounterMode cannot follow autograd.grad: same kernels, input grad only)
        for p in model.parameters():
            p.requires_grad_(True)

    def train_step():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    out = {"forward": _flops(lambda: model(x)) / batch, "pgd_step": _flops(pgd_step) / batch, "train_step": _flops(train_step) / batch}
    names = [n for n, _ in weight_modules(model)]
    for p in model.parameters():
        p.requires_grad_(False)
    rest = _Rest(model)
    mrc = []
    for name in names:
        forward = rest.for_module(model, name, [(x, y)], amp=False)
        weight = dict(weight_modules(model))[name].weight
        weight.requires_grad_(True)
        mrc.append(_flops(lambda: F.cross_entropy(forward(0, x), y).backward()) / batch)
        weight.grad = None
        weight.requires_grad_(False)
    out["mrc_step_mean_over_modules"] = sum(mrc) / len(mrc)
    out["mrc_step_all_modules"] = sum(mrc)
    out["finetune_step_layer2.1.conv2"] = _ft_flops(model, "layer2.1.conv2", x, y) / batch
    return out


def _ft_flops(model, name, x, y) -> float:
    weight = dict(weight_modules(model))[name].weight
    weight.requires_grad_(True)
    flops = _flops(lambda: F.cross_entropy(model(x), y).backward())
    weight.grad = None
    weight.requires_grad_(False)
    return flops


def stages(f: dict[str, float], cfg: RiftConfig, train: int, val: int, test: int, from_scratch: bool) -> dict[str, float]:
    """FLOPs of each stage of a run with ``cfg`` (every image attacked at every step: an upper bound)."""
    pgd_eval = cfg.eval_steps * f["pgd_step"] + 2 * f["forward"]
    out = {}
    if from_scratch:
        out["adversarial training"] = cfg.at_epochs * train * (cfg.at_attack_steps * f["pgd_step"] + f["train_step"])
        out["validation during AT"] = len(range(cfg.at_eval_every, cfg.at_epochs + 1, cfg.at_eval_every)) * val * pgd_eval
    out["MRC adversarial set"] = cfg.mrc_examples * cfg.eval_steps * f["pgd_step"]
    out["MRC (every module)"] = cfg.mrc_passes * cfg.mrc_examples * f["mrc_step_all_modules"]
    out["fine-tuning"] = cfg.ft_epochs * (train * f["finetune_step_layer2.1.conv2"] + val * f["forward"])
    out["interpolation curve"] = len(cfg.alphas) * val * cfg.val_restarts * pgd_eval
    out["test (AT and AT+RiFT)"] = 2 * test * cfg.eval_restarts * pgd_eval
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "t4-estimate.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    f = per_image_flops()
    train, val, test = 45000, 5000, 10000  # CIFAR-10 with riftlab's validation split
    scenarios = {
        "chapter 7 from a RobustBench ResNet-18 (paper profile's MRC, fine-tuning and curve; one test start)":
            stages(f, RiftConfig(**{**PROFILES["paper"], "eval_restarts": 1}), train, val, test, from_scratch=False),
        "colab profile, from scratch": stages(f, RiftConfig(**PROFILES["colab"]), train, val, test, from_scratch=True),
    }
    report = {"per_image_gflops": {k: v / 1e9 for k, v in f.items()}, "rates_tflops": RATES, "assumption": __doc__.split("\n\n")[2],
              "scenarios": {}}
    for name, parts in scenarios.items():
        total = sum(parts.values())
        report["scenarios"][name] = {"pflops": {k: v / 1e15 for k, v in parts.items()}, "total_pflops": total / 1e15,
                                     "minutes": {f"{rate:g} TFLOP/s": total / (rate * 1e12) / 60 for rate in RATES}}
        print(f"\n{name}: {total / 1e15:.1f} PFLOP")
        for k, v in parts.items():
            print(f"  {k:28s} {v / 1e15:7.2f} PFLOP")
        print("  " + ", ".join(f"{m:.0f} min at {r}" for r, m in report["scenarios"][name]["minutes"].items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
