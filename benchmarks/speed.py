"""Speed and scale: riftlab's path against a plain PyTorch baseline in the style of the published
RiFT reference code, side by side in one run, on the same model, data and device.

    python benchmarks/speed.py                      # full CIFAR-sized synthetic data, auto device
    python benchmarks/speed.py --smoke --device cpu # tiny sizes, about a minute on a small CPU

Measured (every number is a measurement of this run, never an extrapolation):

* PGD-10 adversarial training: images/s and seconds per epoch (after a short warm-up);
* MRC of every Conv2d / Linear weight: building the PGD-10 adversarial set of N examples, then
  ``--mrc-passes`` ascent passes over it for each module;
* PGD-10 evaluation (clean + robust accuracy) of the test images;
* the whole RiFT pipeline from an AT model: MRC + fine-tuning + 11-point interpolation curve on
  validation (the MRC row above is this pipeline's MRC stage);
* peak GPU memory per stage (CUDA only) and achieved TFLOP/s of training as a fraction of the
  device's bf16 dense peak.

The baseline re-implements the reference style inside this file: fp32, a DataLoader with CPU
transforms on PIL images, PGD whose ``loss.backward()`` also fills every weight's ``.grad``,
per-batch ``.item()`` logging, and one ``copy.deepcopy`` of the whole model per module for MRC.

riftlab's path runs as a user gets it: ``--precision auto`` (bf16 autocast and channels_last on
CUDA, fp32 on the CPU), optionally ``--compile``. When riftlab computes in bf16, the same AT model
is also evaluated in fp32 on the same images with the same random starts, and the difference in
clean and robust accuracy is reported (bf16 must agree with fp32 within noise).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

import riftlab
from riftlab._util import seed_everything
from riftlab.attacks import pgd
from riftlab.checkpoint import load_checkpoint
from riftlab.compute import PRECISIONS, precision_name, resolve_device, set_precision, to_device, use_precision
from riftlab.data import Batches, ImageSet, load_dataset
from riftlab.evaluation import evaluate
from riftlab.models import build_model, weight_modules
from riftlab.steps.criticality import adversarial_set, module_robust_criticality
from riftlab.steps.finetune import finetune_module
from riftlab.steps.interpolation import DEFAULT_ALPHAS, interpolation_curve, select_alpha
from riftlab.steps.training import adversarial_train

EPS, STEP = 8 / 255, 2 / 255
PARTS = ("at", "mrc", "eval", "pipeline")
# bf16 dense tensor-core peaks (TFLOP/s) by device-name substring; H200 has the same compute as H100 SXM.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
# Targets on an H100 at full sizes (issue 4): (metric, max seconds, min speedup over the baseline).
TARGETS = {"at_epoch_s": (6.0, 8.0), "mrc_total_s": (60.0, 10.0), "eval_s": (3.0, None), "pipeline_s": (180.0, None)}
FULL_SIZES = {"train": 50000, "test": 10000, "mrc_examples": 10000, "mrc_passes": 10, "ft_epochs": 10}


# ----------------------------------------------------------------------------------------------
# Timing


class Clock:
    """Wall-clock seconds of a region; on CUDA the queue is drained before and after, so the
    region's GPU work is inside the measurement. Also tracks the region's peak GPU memory."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = float("nan")
        self.peak_gib: float | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator["Clock"]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield self
        if cuda:
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - start
        if cuda:
            self.peak_gib = torch.cuda.max_memory_allocated(self.device) / 2**30


# ----------------------------------------------------------------------------------------------
# Baseline: the reference style, re-implemented here (deliberately plain; do not optimise it)


class PilImages(Dataset):
    """HWC uint8 arrays served as PIL images through torchvision transforms, like torchvision's CIFAR10."""

    def __init__(self, data: ImageSet, transform: Callable):
        self.images = data.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = data.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.images[i].squeeze(-1) if self.images.shape[-1] == 1 else self.images[i])
        return self.transform(img), self.labels[i]


def baseline_loader(data: ImageSet, batch: int, train: bool, workers: int, seed: int) -> DataLoader:
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor()]) \
        if train else transforms.ToTensor()
    return DataLoader(PilImages(data, tf), batch_size=batch, shuffle=train, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed))


def baseline_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    """PGD as the reference writes it: ``loss.backward()`` (weight grads computed too, then thrown away)."""
    was_training = model.training
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_()
        loss = F.cross_entropy(model(x_adv), y)
        loss.backward()
        x_adv = x_adv.detach() + STEP * x_adv.grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
        model.zero_grad()
    model.train(was_training)
    return x_adv.detach()


def baseline_train_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer, device: torch.device,
                         steps: int, max_batches: int | None = None) -> float:
    model.train()
    train_loss, correct, total = 0.0, 0, 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        x_in = baseline_pgd(model, x, y, steps) if steps > 0 else x
        out = model(x_in)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_loss += loss.item()  # the reference logs every batch (a host sync per step)
        correct += out.argmax(1).eq(y).sum().item()
        total += len(y)
    return 100.0 * correct / max(total, 1)


def baseline_evaluate(model: nn.Module, loader: DataLoader, device: torch.device, steps: int) -> dict[str, float]:
    """Clean accuracy and PGD robust accuracy over every image (the reference attacks all of them)."""
    model.eval()
    clean = robust = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            clean += model(x).argmax(1).eq(y).sum().item()
        if steps > 0:
            x_adv = baseline_pgd(model, x, y, steps)
            with torch.no_grad():
                robust += model(x_adv).argmax(1).eq(y).sum().item()
        total += len(y)
    return {"clean_acc": 100.0 * clean / total, "robust_acc": 100.0 * robust / total}


def baseline_adversarial_set(model: nn.Module, loader: DataLoader, device: torch.device, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out.append((baseline_pgd(model, x, y, steps), y))
    return out


def baseline_mrc(model: nn.Module, adv: list[tuple[torch.Tensor, torch.Tensor]], passes: int, eps: float = 0.1) -> list[tuple[str, float]]:
    """MRC as the reference computes it: a deepcopy of the whole model per module, ascent with
    ``loss.backward()`` on every parameter, the ball enforced once per pass, the max loss over passes."""
    model.eval()
    with torch.no_grad():
        base = sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in adv) / sum(len(y) for _, y in adv)
    step_size = 2.5 / max(1, passes * len(adv))
    results = []
    for name, _ in weight_modules(model):
        probe = copy.deepcopy(model)
        weight = dict(probe.named_modules())[name].weight
        original = weight.detach().clone()
        radius = eps * original.norm()
        worst = -float("inf")
        for _ in range(passes):
            total, n = 0.0, 0
            for x, y in adv:
                loss = F.cross_entropy(probe(x), y)
                loss.backward()
                with torch.no_grad():
                    weight.add_(weight.grad * (step_size * radius / weight.grad.norm().clamp_min(1e-12)))
                probe.zero_grad()
                total += loss.item() * len(y)
                n += len(y)
            with torch.no_grad():
                delta = weight - original
                weight.copy_(original + delta * torch.clamp(radius / delta.norm().clamp_min(1e-30), max=1.0))
            worst = max(worst, total / n)
        results.append((name, worst - base))
        del probe
    return sorted(results, key=lambda r: r[1])


def baseline_finetune(model: nn.Module, module: str, loader: DataLoader, val_loader: DataLoader, device: torch.device,
                      epochs: int) -> nn.Module:
    """Deepcopy, freeze all but one weight, fine-tune in train mode (BN statistics drift, as in the reference)."""
    tuned = copy.deepcopy(model)
    for p in tuned.parameters():
        p.requires_grad = False
    weight = dict(tuned.named_modules())[module].weight
    weight.requires_grad = True
    opt = torch.optim.SGD([weight], lr=0.001, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, epochs // 2)], gamma=0.1)
    best, best_state = -1.0, None
    for _ in range(epochs):
        baseline_train_epoch(tuned, loader, opt, device, steps=0)
        sched.step()
        acc = baseline_evaluate(tuned, val_loader, device, steps=0)["clean_acc"]
        if acc > best:
            best, best_state = acc, copy.deepcopy(tuned.state_dict())
    tuned.load_state_dict(best_state)
    return tuned


def baseline_interpolation(model: nn.Module, theta_at: dict, theta_ft: dict, val_loader: DataLoader, device: torch.device,
                           steps: int) -> list[dict[str, float]]:
    probe = copy.deepcopy(model)
    rows = []
    for alpha in DEFAULT_ALPHAS:
        probe.load_state_dict({k: (1 - alpha) * v + alpha * theta_ft[k] if v.is_floating_point() else v for k, v in theta_at.items()})
        rows.append({"alpha": alpha, **baseline_evaluate(probe, val_loader, device, steps)})
    return rows


# ----------------------------------------------------------------------------------------------
# The benchmark


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"CPU {model or platform.processor()} ({torch.get_num_threads()} torch threads)"


def bf16_peak(name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None) if "CPU" not in name else None


def at_flops_per_image(model: nn.Module, batches: Batches, steps: int) -> float:
    """FLOPs of one PGD-AT step, per image, counted by FlopCounterMode on one real batch: ``steps`` attack
    steps (forward + input-only gradient, as riftlab's pgd does) and one forward + backward of the update.
    Used as the useful work of both paths.

    FlopCounterMode cannot follow ``autograd.grad`` to a leaf, so one attack step is counted on a
    non-leaf copy of the input (the same kernels as pgd's step) and multiplied by ``steps``.
    """
    probe = copy.deepcopy(model)
    x, y = next(iter(batches))
    with FlopCounterMode(display=False) as counter:
        probe.eval()
        x_in = x.clone().requires_grad_(True) * 1.0
        torch.autograd.grad(F.cross_entropy(probe(x_in), y, reduction="sum"), x_in)
    attack_step = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        probe.train()
        F.cross_entropy(probe(x), y).backward()
    return (steps * attack_step + counter.get_total_flops()) / len(y)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--model", default="resnet18", choices=["resnet18", "wrn34_10"])
    p.add_argument("--width", type=int, default=None, help="first-stage channels (ResNet) or widen factor (WRN); default: the paper's")
    p.add_argument("--train", type=int, default=FULL_SIZES["train"], help="training images per AT / fine-tuning epoch")
    p.add_argument("--val", type=int, default=5000, help="validation images (fine-tuning selection, interpolation curve)")
    p.add_argument("--test", type=int, default=FULL_SIZES["test"], help="images in the PGD evaluation")
    p.add_argument("--mrc-examples", type=int, default=FULL_SIZES["mrc_examples"], help="adversarial examples for MRC (from the training split)")
    p.add_argument("--mrc-passes", type=int, default=FULL_SIZES["mrc_passes"], help="ascent passes over the adversarial set per module")
    p.add_argument("--ft-epochs", type=int, default=FULL_SIZES["ft_epochs"], help="fine-tuning epochs in the pipeline")
    p.add_argument("--steps", type=int, default=10, help="PGD steps for training, MRC and evaluation")
    p.add_argument("--batch", type=int, default=128, help="training batch size")
    p.add_argument("--eval-batch", type=int, default=512, help="batch size of evaluation and MRC (both paths)")
    p.add_argument("--epochs-measured", type=int, default=1, help="AT epochs timed (after the warm-up)")
    p.add_argument("--warmup-batches", type=int, default=5, help="training batches run before timing (each path)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline")
    p.add_argument("--checkpoint", default=None, help="AT checkpoint to start MRC / evaluation / pipeline from "
                   "(default: the model after riftlab's timed AT epochs)")
    p.add_argument("--skip", default="", help=f"comma-separated parts to skip: {', '.join(PARTS)}, baseline (all baseline "
                   "parts) or baseline-<part>")
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 dense peak, TFLOP/s (default: known GPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="riftlab's precision (the baseline is always fp32; default auto)")
    p.add_argument("--compile", action="store_true", help="riftlab trains through torch.compile (AT and fine-tuning)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny preset: width 4, 512 train, 128 val, 256 test, 64 MRC examples, "
                   "1 pass, 1 fine-tuning epoch, 2 warm-up batches")
    args = p.parse_args(argv)
    if args.smoke:
        args.width, args.train, args.val, args.test = 4, 512, 128, 256
        args.mrc_examples, args.mrc_passes, args.ft_epochs, args.warmup_batches = 64, 1, 1, 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    valid = set(PARTS) | {"baseline"} | {f"baseline-{part}" for part in PARTS}
    if skip - valid:
        p.error(f"unknown --skip entry {sorted(skip - valid)[0]!r}; valid: {', '.join(sorted(valid))}")
    args.run = {part: part not in skip for part in PARTS}
    args.run_baseline = {part: args.run[part] and "baseline" not in skip and f"baseline-{part}" not in skip for part in PARTS}
    for name in ("train", "val", "test", "mrc_examples", "mrc_passes", "ft_epochs", "batch", "eval_batch", "epochs_measured"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = device_name(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # both paths: fixed batch shapes, each tuned once (as riftlab's runs do)
    set_precision(args.precision)
    low = precision_name(device)  # bf16, fp16 or fp32
    riftlab_dtype = {"bf16": "bfloat16 autocast", "fp16": "float16 autocast"}.get(low, "float32")
    splits = load_dataset("synthetic-cifar10", synthetic_sizes=(args.train + args.val, args.test), val_size=args.val, split_seed=args.seed)
    info = splits.info
    mrc_data = splits.train.subset(args.mrc_examples, seed=args.seed)

    def fresh_model() -> nn.Module:
        """riftlab's path: channels_last on CUDA (to_device); the baseline moves its copies with a plain .to(device)."""
        seed_everything(args.seed)
        return to_device(build_model(args.model, info.num_classes, info.channels, info.image_size, args.width, info.mean, info.std), device)

    def baseline_model() -> nn.Module:
        seed_everything(args.seed)
        return build_model(args.model, info.num_classes, info.channels, info.image_size, args.width, info.mean, info.std).to(device)

    metrics: dict[str, dict[str, Any]] = {}
    notes: list[str] = []

    def record(key: str, label: str, unit: str, riftlab_value: float | None, baseline_value: float | None, higher_is_better: bool = False):
        ratio = None
        if riftlab_value is not None and baseline_value is not None and riftlab_value > 0 and baseline_value > 0:
            ratio = riftlab_value / baseline_value if higher_is_better else baseline_value / riftlab_value
        metrics[key] = {"label": label, "unit": unit, "riftlab": riftlab_value, "baseline": baseline_value, "ratio": ratio}

    def save() -> dict[str, Any]:
        """The report so far; with --json, written there (atomically) after every part, so that a run stopped by a time
        limit keeps the parts it measured (``finished`` says whether every part ran)."""
        report = {
            "device": name, "torch": torch.__version__, "riftlab": riftlab.__version__, "dtype": f"riftlab {riftlab_dtype}, baseline float32",
            "config": {k: v for k, v in vars(args).items() if k not in ("run", "run_baseline")},
            "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test), "mrc_examples": len(mrc_data)},
            "metrics": metrics, "notes": notes, "targets": targets(metrics, args, name), "parts_done": list(done),
            "finished": all(part in done for part in PARTS if args.run[part]),
        }
        if args.json:
            tmp = f"{args.json}.tmp"
            with open(tmp, "w") as fh:
                json.dump(report, fh, indent=2)
            os.replace(tmp, args.json)
        return report

    done: list[str] = []
    clock = Clock(device)
    train_batches = Batches(splits.train, args.batch, shuffle=True, augment=True, crop_padding=info.crop_padding, device=device, seed=args.seed)
    warm = Batches(splits.train.subset(args.warmup_batches * args.batch, seed=args.seed + 5), args.batch, shuffle=True, augment=True,
                   crop_padding=info.crop_padding, device=device, seed=args.seed)
    at_model: nn.Module | None = None

    # --- PGD-10 adversarial training --------------------------------------------------------
    if args.run["at"]:
        model = fresh_model()
        init_state = copy.deepcopy(model.state_dict())
        if args.warmup_batches > 0:
            adversarial_train(copy.deepcopy(model), warm, None, epochs=1, attack_steps=args.steps, eps=EPS, step=STEP, seed=args.seed,
                              compile=args.compile)
        with clock():
            adversarial_train(model, train_batches, None, epochs=args.epochs_measured, attack_steps=args.steps, eps=EPS, step=STEP,
                              seed=args.seed, compile=args.compile)
        r_epoch, r_mem = clock.seconds / args.epochs_measured, clock.peak_gib
        at_model = model
        b_epoch = b_mem = None
        if args.run_baseline["at"]:
            base = baseline_model()
            base.load_state_dict(init_state)
            opt = torch.optim.SGD(base.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
            loader = baseline_loader(splits.train, args.batch, True, args.workers, args.seed)
            if args.warmup_batches > 0:
                warm_model = copy.deepcopy(base)
                baseline_train_epoch(warm_model, loader, torch.optim.SGD(warm_model.parameters(), lr=0.1, momentum=0.9),
                                     device, args.steps, max_batches=args.warmup_batches)
                del warm_model
            with clock():
                for _ in range(args.epochs_measured):
                    baseline_train_epoch(base, loader, opt, device, args.steps)
            b_epoch, b_mem = clock.seconds / args.epochs_measured, clock.peak_gib
            del base, opt
        n = len(splits.train)
        record("at_epoch_s", f"AT epoch, PGD-{args.steps} (s)", "s", r_epoch, b_epoch)
        record("at_images_per_s", "AT throughput (images/s)", "images/s", n / r_epoch, n / b_epoch if b_epoch else None, higher_is_better=True)
        record("at_peak_gib", "AT peak GPU memory (GiB)", "GiB", r_mem, b_mem)
        flops = at_flops_per_image(at_model, train_batches, args.steps)
        peak = bf16_peak(name, args.peak_tflops)
        r_tf, b_tf = flops * n / r_epoch / 1e12, (flops * n / b_epoch / 1e12 if b_epoch else None)
        record("at_tflops", "AT achieved TFLOP/s (useful FLOPs)", "TFLOP/s", r_tf, b_tf, higher_is_better=True)
        if peak is not None:  # a fraction of an unknown peak is no figure: left out (the note below says why)
            record("at_peak_fraction", "AT fraction of bf16 peak", "fraction", r_tf / peak, b_tf / peak if b_tf else None,
                   higher_is_better=True)
        notes.append(f"useful FLOPs per AT image: {flops / 1e9:.3f} GFLOP (FlopCounterMode on one riftlab PGD-{args.steps} step; "
                     "the baseline's extra weight gradients in PGD are not counted as useful work)")
        if peak is None:
            notes.append("bf16 peak unknown for this device (n/a); pass --peak-tflops to set one")
        done.append("at")
        save()

    # The AT model the other stages start from (the same weights for both paths).
    source = fresh_model()
    if args.checkpoint:
        load_checkpoint(source, args.checkpoint, map_location=device)
        notes.append(f"MRC / evaluation / pipeline start from {args.checkpoint}")
    elif at_model is not None:
        source.load_state_dict(at_model.state_dict())
        notes.append(f"MRC / evaluation / pipeline start from the model after riftlab's {args.epochs_measured} timed AT epoch(s), "
                     "a stand-in for a finished AT checkpoint")
    else:
        notes.append("MRC / evaluation / pipeline start from a randomly initialised model (AT skipped, no --checkpoint)")
    source.eval()
    del at_model
    theta_at = {k: v.detach().clone() for k, v in source.state_dict().items()}

    # --- PGD-10 evaluation of the test images ------------------------------------------------
    if args.run["eval"]:
        test_batches = Batches(splits.test, args.eval_batch, device=device)
        evaluate(source, Batches(splits.test.subset(min(args.eval_batch, len(splits.test))), args.eval_batch, device=device),
                 EPS, STEP, args.steps)  # warm-up
        with clock():
            r_result = evaluate(source, test_batches, EPS, STEP, args.steps, restarts=1, seed=args.seed)
        r_eval, r_mem = clock.seconds, clock.peak_gib
        # The same work as the baseline (every image attacked), with riftlab's pgd and device batches,
        # so the attack implementations are compared apart from evaluate's skipping of wrong images.
        gen = torch.Generator(device=device).manual_seed(args.seed)
        with clock(), torch.no_grad():
            for x, y in test_batches:
                source(x).argmax(1)
                with torch.enable_grad():
                    x_adv = pgd(source, x, y, EPS, STEP, args.steps, generator=gen)
                source(x_adv).argmax(1)
        r_all = clock.seconds
        b_eval = b_mem = b_result = None
        if args.run_baseline["eval"]:
            loader = baseline_loader(splits.test, args.eval_batch, False, args.workers, args.seed)
            with clock():
                b_result = baseline_evaluate(source, loader, device, args.steps)
            b_eval, b_mem = clock.seconds, clock.peak_gib
        record("eval_s", f"PGD-{args.steps} eval of {len(splits.test)} (s)", "s", r_eval, b_eval)
        record("eval_all_s", f"PGD-{args.steps} eval, every image attacked (s)", "s", r_all, b_eval)
        record("eval_peak_gib", "eval peak GPU memory (GiB)", "GiB", r_mem, b_mem)
        record("eval_clean_acc", "eval clean accuracy (%)", "%", r_result["clean_acc"], b_result["clean_acc"] if b_result else None)
        record("eval_robust_acc", "eval robust accuracy (%)", "%", r_result["robust_acc"], b_result["robust_acc"] if b_result else None)
        metrics["eval_clean_acc"]["ratio"] = metrics["eval_robust_acc"]["ratio"] = None  # sanity checks, not speed
        if low != "fp32":  # the same model, images and random starts in fp32: how much does 16-bit arithmetic move the numbers?
            with use_precision("fp32"):
                fp32_result = evaluate(source, test_batches, EPS, STEP, args.steps, restarts=1, seed=args.seed)
            for key, label in (("clean_acc", "clean"), ("robust_acc", "robust")):
                record(f"{low}_minus_fp32_{key}", f"{low} - fp32 {label} accuracy (points)", "points", r_result[key] - fp32_result[key], None)
        notes.append(f"riftlab's evaluate attacks only the clean-correct images ({r_result['clean_acc']:.1f}% here); the baseline "
                     "attacks all of them, as the reference does: the eval speed-up depends on the model's clean accuracy; "
                     "the 'every image attacked' row runs riftlab's pgd on all images for a like-for-like comparison")
        done.append("eval")
        save()

    # --- MRC and the whole pipeline (MRC + fine-tuning + interpolation on validation) ---------
    if args.run["mrc"] or args.run["pipeline"]:
        val_batches = Batches(splits.val, args.eval_batch, device=device)
        stages: dict[str, dict[str, float | None]] = {"riftlab": {}, "baseline": {}}
        peaks: dict[str, float | None] = {}
        chosen: dict[str, str] = {}
        model = source

        def record_mrc() -> None:
            r, b = stages["riftlab"], stages["baseline"]
            n_mod = len(weight_modules(source))
            record("mrc_adv_s", f"MRC adversarial set, PGD-{args.steps} on {len(mrc_data)} (s)", "s", r["adv"], b.get("adv"))
            record("mrc_ascent_s", f"MRC ascent, {n_mod} modules x {args.mrc_passes} passes (s)", "s", r["ascent"], b.get("ascent"))
            record("mrc_total_s", "MRC all modules, total (s)", "s", r["mrc"], b.get("mrc"))
            if args.run["pipeline"]:
                record("pipeline_s", f"pipeline: MRC + {args.ft_epochs} FT epochs + {len(DEFAULT_ALPHAS)}-point curve (s)", "s",
                       r["pipeline"], b.get("pipeline"))
            record("mrc_pipeline_peak_gib", "MRC/pipeline peak GPU memory (GiB)", "GiB", peaks.get("riftlab"), peaks.get("baseline"))

        with clock():
            t0 = time.perf_counter()
            adv = adversarial_set(model, Batches(mrc_data, args.eval_batch, device=device), EPS, STEP, args.steps, seed=args.seed)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            table = module_robust_criticality(model, adv, passes=args.mrc_passes)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            chosen["riftlab"] = str(table["module"].iloc[0])
            del adv
            if args.run["pipeline"]:
                ft = finetune_module(model, chosen["riftlab"], train_batches, val_batches, epochs=args.ft_epochs, compile=args.compile)
                curve = interpolation_curve(model, theta_at, ft.model.state_dict(), val_batches, EPS, STEP, args.steps, seed=args.seed)
                select_alpha(curve)
        stages["riftlab"] = {"adv": t1 - t0, "ascent": t2 - t1, "mrc": t2 - t0, "pipeline": clock.seconds if args.run["pipeline"] else None}
        peaks["riftlab"] = clock.peak_gib
        record_mrc()  # riftlab's figures now, so that a run stopped during the (slower) baseline keeps them
        save()
        if args.run_baseline["mrc"] or (args.run_baseline["pipeline"] and args.run["pipeline"]):
            model = baseline_model()
            model.load_state_dict(source.state_dict())
            model.eval()
            with clock():
                t0 = time.perf_counter()
                adv = baseline_adversarial_set(model, baseline_loader(mrc_data, args.eval_batch, False, args.workers, args.seed), device, args.steps)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t1 = time.perf_counter()
                ranking = baseline_mrc(model, adv, args.mrc_passes)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t2 = time.perf_counter()
                chosen["baseline"] = ranking[0][0]
                del adv
                if args.run_baseline["pipeline"] and args.run["pipeline"]:
                    val_loader = baseline_loader(splits.val, args.eval_batch, False, args.workers, args.seed)
                    tuned = baseline_finetune(model, chosen["baseline"], baseline_loader(splits.train, args.batch, True, args.workers, args.seed),
                                              val_loader, device, args.ft_epochs)
                    baseline_interpolation(model, theta_at, tuned.state_dict(), val_loader, device, args.steps)
            stages["baseline"] = {"adv": t1 - t0, "ascent": t2 - t1, "mrc": t2 - t0,
                                  "pipeline": clock.seconds if args.run_baseline["pipeline"] and args.run["pipeline"] else None}
            peaks["baseline"] = clock.peak_gib
        record_mrc()
        notes.append(f"chosen module: riftlab {chosen.get('riftlab')}, baseline {chosen.get('baseline', 'n/a')}"
                     + (" (they differ: the fine-tuning costs differ with the module's depth)"
                        if "baseline" in chosen and chosen["baseline"] != chosen["riftlab"] else ""))

        done.extend(part for part in ("mrc", "pipeline") if args.run[part])
    report = save()
    print(render(report))
    return 0


def targets(metrics: dict[str, dict[str, Any]], args: argparse.Namespace, name: str) -> list[dict[str, Any]]:
    """Issue 4's H100 targets, checked only on an H100/H200 at full sizes and width."""
    full = all(getattr(args, k) == v for k, v in FULL_SIZES.items()) and args.width is None and args.model == "resnet18" and args.steps == 10
    applicable = full and ("H100" in name or "H200" in name)
    out = []
    for key, (max_s, min_speedup) in TARGETS.items():
        m = metrics.get(key)
        entry = {"metric": key, "max_seconds": max_s, "min_speedup": min_speedup, "met": None}
        if applicable and m is not None and m["riftlab"] is not None:
            ok = m["riftlab"] <= max_s and (min_speedup is None or (m["ratio"] is not None and m["ratio"] >= min_speedup))
            entry["met"] = bool(ok)
        out.append(entry)
    return out


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}" if abs(v) < 1000 else f"{v:,.0f}"


def render(report: dict[str, Any]) -> str:
    lines = [f"device: {report['device']} | torch {report['torch']} | riftlab {report['riftlab']} | dtype {report['dtype']}",
             f"sizes: {report['sizes']}, batch {report['config']['batch']}, eval batch {report['config']['eval_batch']}, "
             f"model {report['config']['model']} width {report['config']['width'] or 'default'}",
             "ratio = baseline/riftlab for times and memory, riftlab/baseline for rates (> 1: riftlab better)", ""]
    width = max([len(m["label"]) for m in report["metrics"].values()] + [10])
    lines.append(f"{'metric':{width}s}  {'riftlab':>10s}  {'baseline':>10s}  {'ratio':>7s}")
    for m in report["metrics"].values():
        lines.append(f"{m['label']:{width}s}  {_fmt(m['riftlab']):>10s}  {_fmt(m['baseline']):>10s}  {_fmt(m['ratio']):>7s}")
    lines += ["", "targets on an H100 at full sizes (resnet18, 50k train, 10k test, 10k MRC examples, 10 passes, 10 FT epochs):"]
    for t in report["targets"]:
        want = f"<= {t['max_seconds']:g} s" + (f" and >= {t['min_speedup']:g}x baseline" if t["min_speedup"] else "")
        status = "n/a (not an H100/H200 full-size run)" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"  {t['metric']:14s} {want:32s} {status}")
    lines += ["", "notes:"] + [f"  - {n}" for n in report["notes"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
