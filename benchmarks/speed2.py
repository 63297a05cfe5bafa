"""Speed of the CUDA-graph path against the eager path and the reference-style baseline, side by side in one run.

    python benchmarks/speed2.py --json benchmarks/results/speed2.json        # one GPU, full sizes (about 6 minutes on an H200)
    python benchmarks/speed2.py --device cpu --smoke --json /tmp/speed2.json # tiny sizes: checks the script (a minute or two)

Parts, in this order, each written to ``--json`` as soon as it is done (a run stopped by a time limit keeps what it
measured; ``--resume`` skips the parts the file already holds), each skipped when less than its usual time is left of
``--budget``:

* ``at128``: one PGD-10 AT epoch at batch 128 (ResNet-18, CIFAR-shaped synthetic data): the reference-style baseline
  (``speed.py``'s: fp32, DataLoader, weight gradients in every attack step), riftlab eager and riftlab with every batch
  step a CUDA graph replay (after a warm-up of a few batches that captures the graph; the weights are restored after
  it, so the eager and graph epochs start from the same weights, data order and random starts and end with models
  that are compared on the test images);
* ``at512``: the same at batch 512 with the learning rate scaled to 0.4 (the throughput profile): baseline and graphs;
* ``eval``: PGD-10 evaluation of the test images: eager and graphs (first call, which captures, and second), each
  with and without BatchNorm folded into the convolutions (``--fold-bn``) at the evaluation batch, and with graphs
  at the batch riftlab sizes from free GPU memory (``--auto-eval-batch-size``), folded and not; images/s of each;
* ``mrc``: MRC's adversarial set and the ascent of every module on ``--mrc-examples``: eager and graphs;
* ``rift``: RiFT from the AT model: MRC, fine-tuning, the interpolation curve and the choice of alpha: eager and graphs;
* ``profile``: ``torch.profiler``'s top operations over a graph-path stretch of the AT epoch;
* ``recipe``: batch 128 (lr 0.1) against the throughput profile (batch 512, lr 0.4, warm-up) on the same epochs, both
  with graphs, and their test accuracies.

``cudnn.benchmark`` is on throughout; every comparison is at one batch size. The targets of the graph path
(ResNet-18 on an H100 / H200, full sizes) are checked in ``targets``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the baseline and the clock, shared with speed.py)

import riftlab  # noqa: E402
from riftlab._util import seed_everything  # noqa: E402
from riftlab.compute import PRECISIONS, fold_batchnorm, precision_name, resolve_device, set_precision, to_device  # noqa: E402
from riftlab.data import Batches, load_dataset  # noqa: E402
from riftlab.evaluation import evaluate  # noqa: E402
from riftlab.evaluation.robust import eval_batch_size_for  # noqa: E402
from riftlab.graphs import use_cuda_graphs  # noqa: E402
from riftlab.models import build_model  # noqa: E402
from riftlab.steps._graph import GraphedPGDTraining  # noqa: E402
from riftlab.steps.criticality import adversarial_set, module_robust_criticality  # noqa: E402
from riftlab.steps.finetune import finetune_module  # noqa: E402
from riftlab.steps.interpolation import interpolation_curve, select_alpha  # noqa: E402
from riftlab.steps.training import adversarial_train  # noqa: E402

EPS, STEP = speed.EPS, speed.STEP
PARTS = ("at128", "at512", "eval", "mrc", "rift", "profile", "recipe")
# Seconds each part usually takes at full size on an H200 (a part starts only if this much of the budget is left).
USUAL_S = {"at128": 100, "at512": 50, "eval": 25, "mrc": 40, "rift": 80, "profile": 10, "recipe": 110}
FULL = {"train": 50000, "test": 10000, "mrc_examples": 10000, "mrc_passes": 10, "ft_epochs": 10}
# The graph path's targets on an H100 / H200 at full sizes: (part, figure, at most, at least).
TARGETS = [("at128", "graph_epoch_s", 10.0, None), ("at128", "speedup_vs_baseline", None, 4.0), ("at512", "graph_epoch_s", 6.0, None),
           ("eval", "graph_s", 1.0, None), ("mrc", "graph_total_s", 20.0, None), ("rift", "graph_s", 20.0, None)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--json", type=Path, required=True, help="where the results go (rewritten after every part)")
    p.add_argument("--resume", action="store_true", help="keep the parts --json already holds and run the others")
    p.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {', '.join(PARTS)}")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all parts (default 420)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (width 4, 320 train, 128 test, 64 MRC examples, 1 pass, 1 epoch, PGD-2)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--train", type=int, default=FULL["train"])
    p.add_argument("--val", type=int, default=5000)
    p.add_argument("--test", type=int, default=FULL["test"])
    p.add_argument("--mrc-examples", type=int, default=FULL["mrc_examples"])
    p.add_argument("--mrc-passes", type=int, default=FULL["mrc_passes"])
    p.add_argument("--ft-epochs", type=int, default=FULL["ft_epochs"])
    p.add_argument("--recipe-epochs", type=int, default=6, help="epochs of each recipe in the recipe part")
    p.add_argument("--steps", type=int, default=10, help="PGD steps of training, evaluation and MRC (default 10)")
    p.add_argument("--eval-batch", type=int, default=512)
    p.add_argument("--profile-batches", type=int, default=100)
    p.add_argument("--warmup-batches", type=int, default=4, help="batches before timing (the graph path captures in them)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the baseline")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.smoke:
        args.width, args.train, args.val, args.test = 4, 320, 64, 128
        args.mrc_examples, args.mrc_passes, args.ft_epochs, args.recipe_epochs, args.steps = 64, 1, 1, 1, 2
        args.eval_batch, args.profile_batches, args.warmup_batches, args.workers = 64, 2, 3, 0
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(PARTS):
        p.error(f"unknown --skip part {sorted(skip - set(PARTS))[0]!r}; parts: {', '.join(PARTS)}")
    args.parts = [part for part in PARTS if part not in skip]
    return args


class Bench:
    """The run's data, models and report, and the helpers the parts share."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.perf_counter()  # the budget counts the data's generation too
        self.device = resolve_device(args.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes everywhere: each tuned once
        set_precision(args.precision)
        self.name = speed.device_name(self.device)
        self.clock = speed.Clock(self.device)
        self.splits = load_dataset("synthetic-cifar10", synthetic_sizes=(args.train + args.val, args.test), val_size=args.val,
                                   split_seed=args.seed)
        self.info = self.splits.info
        old = json.loads(args.json.read_text()) if args.resume and args.json.is_file() else {}
        self.report: dict[str, Any] = {
            "device": self.name, "torch": torch.__version__, "riftlab": riftlab.__version__, "precision": precision_name(self.device),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "config": {k: (str(v) if isinstance(v, Path) else v)
                                                                                for k, v in vars(args).items()},
            "sizes": {"train": len(self.splits.train), "val": len(self.splits.val), "test": len(self.splits.test)},
            "parts": old.get("parts", {}), "skipped": {}, "targets": [], "finished": False}
        self.at_state_path = args.json.with_name(args.json.stem + ".at.pt")  # the AT model the later parts start from (for --resume)
        self.current: str | None = None  # the part running now

    # -- bookkeeping -------------------------------------------------------------------------------------------------

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.started)

    def save(self) -> None:
        self.report["seconds"] = round(time.perf_counter() - self.started, 1)
        self.report["targets"] = self.targets()
        tmp = self.args.json.with_name(self.args.json.name + ".tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=float))
        os.replace(tmp, self.args.json)

    def save_partial(self, figures: dict[str, Any]) -> None:
        """The running part's figures so far, marked unfinished (a run stopped inside a long part keeps them)."""
        self.report["parts"][self.current] = {**{k: v for k, v in figures.items() if k != "model"}, "finished": False}
        self.save()

    def full_size(self) -> bool:
        a = self.args
        return (a.width is None and a.steps == 10 and a.train == FULL["train"] and a.test == FULL["test"]
                and a.mrc_examples == FULL["mrc_examples"] and a.mrc_passes == FULL["mrc_passes"] and a.ft_epochs == FULL["ft_epochs"])

    def targets(self) -> list[dict[str, Any]]:
        applicable = self.full_size() and ("H100" in self.name or "H200" in self.name)
        out = []
        for part, figure, most, least in TARGETS:
            value = self.report["parts"].get(part, {}).get(figure)
            met = None
            if applicable and value is not None:
                met = bool((most is None or value <= most) and (least is None or value >= least))
            out.append({"part": part, "figure": figure, "at_most": most, "at_least": least, "value": value, "met": met})
        return out

    # -- models, data, timing ----------------------------------------------------------------------------------------

    def model(self) -> nn.Module:
        seed_everything(self.args.seed)
        return to_device(build_model("resnet18", self.info.num_classes, self.info.channels, self.info.image_size, self.args.width,
                                     self.info.mean, self.info.std), self.device)

    def train_batches(self, batch: int, images=None) -> Batches:
        return Batches(images if images is not None else self.splits.train, batch, shuffle=True, augment=True,
                       crop_padding=self.info.crop_padding, device=self.device, seed=self.args.seed)

    def timed(self, fn: Callable[[], Any]) -> tuple[Any, float, float | None]:
        with self.clock():
            out = fn()
        return out, self.clock.seconds, self.clock.peak_gib

    def accuracies(self, model: nn.Module, graphs: bool = False, batch: int | None = None) -> dict[str, float]:
        with use_cuda_graphs(graphs):
            test = Batches(self.splits.test, batch or self.args.eval_batch, device=self.device)
            r = evaluate(model.eval(), test, EPS, STEP, self.args.steps, seed=self.args.seed)
        return {"clean_acc": r["clean_acc"], "robust_acc": r["robust_acc"]}

    def baseline_epoch(self, batch: int, lr: float) -> float:
        """speed.py's reference-style epoch (fp32, DataLoader, weight gradients in every attack step), after a warm-up."""
        base = build_model("resnet18", self.info.num_classes, self.info.channels, self.info.image_size, self.args.width, self.info.mean,
                           self.info.std).to(self.device)
        base.load_state_dict(self.model().state_dict())
        loader = speed.baseline_loader(self.splits.train, batch, True, self.args.workers, self.args.seed)
        warm = copy.deepcopy(base)
        speed.baseline_train_epoch(warm, loader, torch.optim.SGD(warm.parameters(), lr=lr, momentum=0.9), self.device, self.args.steps,
                                   max_batches=self.args.warmup_batches)
        del warm
        opt = torch.optim.SGD(base.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        _, seconds, _ = self.timed(lambda: speed.baseline_train_epoch(base, loader, opt, self.device, self.args.steps))
        return seconds

    def graph_epoch(self, batch: int, lr: float, profile_batches: int | None = None) -> dict[str, Any]:
        """One PGD-10 AT epoch as CUDA graph replays (GraphedPGDTraining), after a warm-up that captures the graph; the
        weights, BatchNorm statistics and momentum are restored after the warm-up, so the epoch starts from the same
        state as the eager one. ``profile_batches``: profile that many batches instead and return the table."""
        model = self.model().train()
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        runner = GraphedPGDTraining(model, opt, EPS, STEP, self.args.steps)
        warm = self.train_batches(batch, self.splits.train.subset(self.args.warmup_batches * batch, seed=self.args.seed + 5))
        _, capture_s, _ = self.timed(lambda: runner.epoch(warm, torch.Generator(self.device).manual_seed(1)))
        with torch.no_grad():  # in place: the graph keeps reading these tensors
            for k, v in model.state_dict().items():
                v.copy_(start[k])
            for m in runner.momenta:
                m.zero_()
        train = self.train_batches(batch)
        train.set_epoch(0)
        gen = torch.Generator(self.device).manual_seed(self.args.seed * 7919)  # adversarial_train's epoch-0 starts
        if profile_batches is not None:
            return {"table": profile_top_ops(lambda: runner.epoch(_first(train, profile_batches), gen), self.device),
                    "batches": profile_batches, "replays": runner.graphs.replays}
        stats, seconds, peak = self.timed(lambda: runner.epoch(train, gen))
        return {"model": model, "epoch_s": seconds, "warmup_and_capture_s": capture_s, "peak_gib": peak, "train_loss": stats["loss"],
                "graphs": len(runner.graphs.graphs), "replays": runner.graphs.replays}

    def eager_epoch(self, batch: int, lr: float) -> dict[str, Any]:
        """riftlab's eager PGD-10 AT epoch (adversarial_train, graphs off), after a warm-up on a copy."""
        model = self.model()
        warm = self.train_batches(batch, self.splits.train.subset(self.args.warmup_batches * batch, seed=self.args.seed + 5))
        settings = dict(epochs=1, lr=lr, attack_steps=self.args.steps, eps=EPS, step=STEP, seed=self.args.seed)
        adversarial_train(copy.deepcopy(model), warm, None, **settings)
        result, seconds, peak = self.timed(lambda: adversarial_train(model, self.train_batches(batch), None, **settings))
        return {"model": model, "epoch_s": seconds, "peak_gib": peak, "train_loss": result.history[0]["train_loss"]}

    def at_model(self) -> nn.Module:
        """The AT model of the later parts: the graph path's at128 model, or the one a resumed run saved."""
        model = self.model()
        if self.at_state_path.is_file():
            model.load_state_dict(torch.load(self.at_state_path, map_location=self.device))
            self.report["at_model"] = "at128's graph-path model (one epoch)"
        else:
            self.report["at_model"] = "randomly initialised (at128 did not run)"
        return model.eval()


def _first(batches: Batches, n: int):
    for i, batch in enumerate(batches):
        if i >= n:
            return
        yield batch


def profile_top_ops(fn: Callable[[], Any], device: torch.device, rows: int = 15) -> list[dict[str, Any]]:
    """torch.profiler over ``fn()``: the ``rows`` operations that took the most device time (CPU time on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()

    def device_us(e) -> float:
        return float(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) or 0.0)

    key = device_us if device.type == "cuda" else (lambda e: float(e.cpu_time_total))
    return [{"name": e.key, "calls": int(e.count), "device_ms": round(device_us(e) / 1e3, 3), "cpu_ms": round(e.cpu_time_total / 1e3, 3)}
            for e in sorted(events, key=key, reverse=True)[:rows]]


# ----------------------------------------------------------------------------------------------
# The parts


def part_at(b: Bench, batch: int, lr: float, eager: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"batch": batch, "lr": lr}
    out["baseline_epoch_s"] = b.baseline_epoch(batch, lr)
    b.save_partial(out)
    if eager:
        e = b.eager_epoch(batch, lr)
        out.update(eager_epoch_s=e["epoch_s"], eager_peak_gib=e["peak_gib"], eager_train_loss=e["train_loss"])
        b.save_partial(out)
    g = b.graph_epoch(batch, lr)
    out.update(graph_epoch_s=g["epoch_s"], graph_warmup_and_capture_s=g["warmup_and_capture_s"], graph_peak_gib=g["peak_gib"],
               graph_train_loss=g["train_loss"], graphs=g["graphs"], replays=g["replays"])
    out["speedup_vs_baseline"] = out["baseline_epoch_s"] / g["epoch_s"]
    if eager:
        out["speedup_vs_eager"] = out["eager_epoch_s"] / g["epoch_s"]
        # The same start, data, order and random starts: the two models differ by rounding only.
        out["eager_test"], out["graph_test"] = b.accuracies(e["model"]), b.accuracies(g["model"])
        out["graph_minus_eager"] = {k: out["graph_test"][k] - out["eager_test"][k] for k in out["eager_test"]}
        torch.save(g["model"].state_dict(), b.at_state_path)
    images = len(b.splits.train)
    out["graph_images_per_s"] = images / g["epoch_s"]
    if b.device.type == "cuda":
        flops = speed.at_flops_per_image(g["model"], b.train_batches(batch), b.args.steps)
        out["graph_tflops"] = flops * images / g["epoch_s"] / 1e12
        peak = speed.bf16_peak(b.name, None)
        if peak is not None:
            out["graph_peak_fraction"] = out["graph_tflops"] / peak
    return out


def part_eval(b: Bench) -> dict[str, Any]:
    """PGD evaluation of the test images, each way three times under graphs (the first call captures the bucket shapes'
    graphs at their second call, the third replays them all): unfolded and folded (``fold_bn``) side by side at one
    batch, then at the memory-sized batch; the accuracies of each against eager unfolded (the reference)."""
    model = b.at_model()
    images = len(b.splits.test)
    test = Batches(b.splits.test, b.args.eval_batch, device=b.device)

    def run(batches: Batches, fold: bool) -> dict[str, Any]:
        return evaluate(model, batches, EPS, STEP, b.args.steps, seed=b.args.seed, fold_bn=fold)

    warm = Batches(b.splits.test.subset(min(b.args.eval_batch, images)), b.args.eval_batch, device=b.device)
    for fold in (False, True):  # cudnn's tuning for the eager path (the folded convolutions have a bias: their own kernels)
        run(warm, fold)
    out: dict[str, Any] = {"batch": b.args.eval_batch, "images": images, "folded_batchnorms": fold_batchnorm(model).folded_batchnorms}
    result: dict[str, dict[str, Any]] = {}
    result["eager"], out["eager_s"], _ = b.timed(lambda: run(test, False))
    result["eager_fold"], out["eager_fold_s"], _ = b.timed(lambda: run(test, True))
    with use_cuda_graphs():
        for tag, fold in (("graph", False), ("graph_fold", True)):
            result[f"{tag}_first"], out[f"{tag}_first_s"], _ = b.timed(lambda: run(test, fold))
            _, out[f"{tag}_second_s"], _ = b.timed(lambda: run(test, fold))
            result[tag], out[f"{tag}_s"], out[f"{tag}_peak_gib"] = b.timed(lambda: run(test, fold))
        b.save_partial(out)
        big = eval_batch_size_for(model, (b.info.channels, b.info.image_size, b.info.image_size), b.device, default=b.args.eval_batch)
        out["memory_sized_batch"] = big
        if big != b.args.eval_batch:
            big_test = Batches(b.splits.test, big, device=b.device)
            for tag, fold in (("graph_big", False), ("graph_big_fold", True)):
                _, out[f"{tag}_first_s"], _ = b.timed(lambda: run(big_test, fold))
                run(big_test, fold)
                result[tag], out[f"{tag}_s"], out[f"{tag}_peak_gib"] = b.timed(lambda: run(big_test, fold))
    eager = result["eager"]
    for tag in result:
        if tag != "eager":
            out[f"{tag}_minus_eager"] = {k: result[tag][k] - eager[k] for k in ("clean_acc", "robust_acc")}
    out["eager"] = {k: eager[k] for k in ("clean_acc", "robust_acc")}
    out["images_per_s"] = {tag: images / out[f"{tag}_s"] for tag in ("eager", "eager_fold", "graph", "graph_fold", "graph_big", "graph_big_fold")
                           if f"{tag}_s" in out}
    out["speedup_vs_eager"] = out["eager_s"] / out["graph_s"]
    out["fold_speedup"] = {"eager": out["eager_s"] / out["eager_fold_s"], "graph": out["graph_s"] / out["graph_fold_s"]}
    if "graph_big_s" in out:
        out["memory_sized_speedup_vs_graph"] = out["graph_s"] / out["graph_big_s"]
    return out


def part_mrc(b: Bench) -> dict[str, Any]:
    model = b.at_model()
    data = b.splits.train.subset(b.args.mrc_examples, seed=b.args.seed)
    out: dict[str, Any] = {"examples": len(data), "passes": b.args.mrc_passes, "batch": b.args.eval_batch}
    tables = {}
    for mode in ("eager", "graph"):
        with use_cuda_graphs(mode == "graph"):
            adv, out[f"{mode}_adv_s"], _ = b.timed(lambda: adversarial_set(model, Batches(data, b.args.eval_batch, device=b.device), EPS,
                                                                          STEP, b.args.steps, seed=b.args.seed))
            tables[mode], out[f"{mode}_ascent_s"], out[f"{mode}_peak_gib"] = b.timed(
                lambda: module_robust_criticality(model, adv, passes=b.args.mrc_passes))
        out[f"{mode}_total_s"] = out[f"{mode}_adv_s"] + out[f"{mode}_ascent_s"]
        out[f"{mode}_least_critical"] = str(tables[mode]["module"].iloc[0])
        del adv
    merged = tables["eager"].merge(tables["graph"], on="module", suffixes=("_eager", "_graph"))
    out["modules"] = len(merged)
    out["rank_correlation"] = float(merged["mrc_eager"].rank().corr(merged["mrc_graph"].rank()))
    out["max_abs_mrc_difference"] = float((merged["mrc_eager"] - merged["mrc_graph"]).abs().max())
    out["speedup_vs_eager"] = out["eager_total_s"] / out["graph_total_s"]
    return out


def part_rift(b: Bench) -> dict[str, Any]:
    model = b.at_model()
    theta_at = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = b.splits.train.subset(b.args.mrc_examples, seed=b.args.seed)
    val = Batches(b.splits.val, b.args.eval_batch, device=b.device)
    out: dict[str, Any] = {"mrc_examples": len(data), "ft_epochs": b.args.ft_epochs, "alphas": 11}

    def rift() -> dict[str, Any]:
        adv = adversarial_set(model, Batches(data, b.args.eval_batch, device=b.device), EPS, STEP, b.args.steps, seed=b.args.seed)
        module = str(module_robust_criticality(model, adv, passes=b.args.mrc_passes)["module"].iloc[0])
        del adv
        ft = finetune_module(model, module, b.train_batches(128), val, epochs=b.args.ft_epochs)
        curve = interpolation_curve(model, theta_at, ft.model.state_dict(), val, EPS, STEP, b.args.steps, seed=b.args.seed)
        return {"module": module, **select_alpha(curve)}

    for mode in ("graph", "eager"):
        if mode == "eager" and b.left() < out["graph_s"] * 3:
            out["eager_skipped"] = "not enough of the budget left"
            break
        with use_cuda_graphs(mode == "graph"):
            choice, out[f"{mode}_s"], out[f"{mode}_peak_gib"] = b.timed(rift)
        out[f"{mode}_choice"] = choice
        b.save_partial(out)
    if "eager_s" in out:
        out["speedup_vs_eager"] = out["eager_s"] / out["graph_s"]
    return out


def part_recipe(b: Bench) -> dict[str, Any]:
    """Batch 128 (lr 0.1) against batch 512 (lr 0.4, linear warm-up) on the same epochs, both with graphs."""
    epochs = b.args.recipe_epochs
    warmup = min(2, epochs - 1)
    out: dict[str, Any] = {"epochs": epochs, "milestones": [max(1, epochs - 1)] if epochs > 1 else []}
    for batch, lr, w in ((128, 0.1, 0), (512, 0.4, warmup)):
        model = b.model()
        with use_cuda_graphs():
            result, seconds, _ = b.timed(lambda: adversarial_train(
                model, b.train_batches(batch), None, epochs=epochs, lr=lr, milestones=out["milestones"], attack_steps=b.args.steps, eps=EPS,
                step=STEP, seed=b.args.seed, warmup_epochs=w))
        out[f"b{batch}"] = {"lr": lr, "warmup_epochs": w, "seconds": seconds, "train_loss": result.history[-1]["train_loss"],
                            "test": b.accuracies(model, graphs=True)}
        b.save_partial(out)
    out["b512_minus_b128"] = {k: out["b512"]["test"][k] - out["b128"]["test"][k] for k in ("clean_acc", "robust_acc")}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        b = Bench(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = {"at128": lambda: part_at(b, 128, 0.1, eager=True), "at512": lambda: part_at(b, 512, 0.4, eager=False),
            "eval": lambda: part_eval(b), "mrc": lambda: part_mrc(b), "rift": lambda: part_rift(b),
            "profile": lambda: {"batch": 128, **b.graph_epoch(128, 0.1, profile_batches=args.profile_batches)},
            "recipe": lambda: part_recipe(b)}
    b.save()
    for name in args.parts:
        if b.report["parts"].get(name, {}).get("finished"):
            continue
        usual = USUAL_S[name] if not args.smoke else 0
        if b.left() < usual:
            b.report["skipped"][name] = f"{b.left():.0f} s of the budget left, the part usually takes {usual} s"
            b.save()
            continue
        b.current = name
        t0 = time.perf_counter()
        try:
            figures = runs[name]()
            figures["finished"] = True
        except Exception as err:  # noqa: BLE001 - record and go on: the other parts still count
            figures = {**b.report["parts"].get(name, {}), "error": f"{type(err).__name__}: {err}"[:500],
                       "traceback": traceback.format_exc()[-2000:], "finished": False}
        figures["part_s"] = round(time.perf_counter() - t0, 1)
        b.report["parts"][name] = figures
        b.save()
        if b.device.type == "cuda":
            torch.cuda.empty_cache()
        shown = {k: v for k, v in figures.items() if isinstance(v, (int, float, str)) and k != "traceback"}
        print(f"{name}: {json.dumps(shown, default=float)[:600]}", flush=True)
    b.report["finished"] = all(b.report["parts"].get(p, {}).get("finished") for p in args.parts)
    b.save()
    errors = [p for p, f in b.report["parts"].items() if "error" in f]
    print(f"wrote {args.json} ({b.report['seconds']:.0f} s); " + (f"errors in: {', '.join(errors)}" if errors else "no errors")
          + (f"; skipped: {', '.join(b.report['skipped'])}" if b.report["skipped"] else ""))
    for t in b.report["targets"]:
        print(f"  target {t['part']}.{t['figure']}: {t['value']} (at most {t['at_most']}, at least {t['at_least']}): "
              + {None: "n/a (not a full-size H100/H200 run)", True: "met", False: "NOT met"}[t["met"]])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
