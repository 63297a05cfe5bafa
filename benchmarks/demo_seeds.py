"""Does RiFT win in the demo? Run the demo profile for several seeds and print, per seed, what the
selection rule chose and how many validation images the chosen interpolation gained and lost.

    python benchmarks/demo_seeds.py --seeds 0 1 2 --threads 2
    python benchmarks/demo_seeds.py --seeds 0 --set update_bn_stats=true --set at_epochs=20

A net clean gain of a few images out of 1000 is within what the training's floating-point
chaos moves between machines and thread counts; the flip counts (gained/lost) show whether a gain
is one-sided. Each seed takes about 5.5 minutes on a 2-core CPU. Runs go to --out/seed<N>.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import time
from pathlib import Path

import torch

from riftlab import PROFILES, RiftConfig, run_rift
from riftlab.checkpoint import load_checkpoint
from riftlab.data import Batches
from riftlab.engine.pipeline import build_for, prepare


def _override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    fields = {f.name for f in dataclasses.fields(RiftConfig)}
    if key not in fields:
        raise argparse.ArgumentTypeError(f"unknown setting {key!r}; RiftConfig has {sorted(fields)}")
    value = {"true": "True", "false": "False", "none": "None"}.get(value.lower(), value)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


@torch.no_grad()
def _clean_correct(model: torch.nn.Module, batches: Batches) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x).argmax(1) == y for x, y in batches])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--set", type=_override, action="append", default=[], metavar="KEY=VALUE",
                        help="override a demo setting, e.g. update_bn_stats=true or at_milestones=(15,18)")
    parser.add_argument("--out", default="runs/demo-seeds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = dict(args.set)
    print(f"demo profile, {args.threads} threads, overrides {overrides or 'none'}")
    header = f"{'seed':>4} {'AT val clean/rob':>17} {'module':>22} {'alpha':>5} {'val clean':>9} {'flips':>7} {'val rob':>7} " \
             f"{'test clean':>10} {'test rob':>8} {'time':>6}"
    print(header, flush=True)
    for seed in args.seeds:
        cfg = RiftConfig(**{**PROFILES["demo"], **overrides, "seed": seed, "progress": False})
        out = Path(args.out) / f"seed{seed}"
        start = time.perf_counter()
        res = run_rift(cfg, out, overwrite=True, log=lambda *_: None)
        seconds = time.perf_counter() - start
        # Which validation images the chosen model gets right that the AT model did not, and back.
        splits, _ = prepare(cfg.resolved())
        val = Batches(splits.val, cfg.eval_batch_size)
        correct = []
        for name in ("at.pt", "rift.pt"):
            model = build_for(cfg, splits)
            load_checkpoint(model, out / name)
            correct.append(_clean_correct(model, val))
        gained, lost = int((correct[1] & ~correct[0]).sum()), int((correct[0] & ~correct[1]).sum())
        v, t = res["validation"], res["test"]
        print(f"{seed:>4} {v['at']['clean_acc']:>8.1f}/{v['at']['robust_acc']:<8.1f} {res['module']:>22} {res['alpha']:>5} "
              f"{v['rift']['clean_acc'] - v['at']['clean_acc']:>+9.1f} {f'+{gained}/-{lost}':>7} "
              f"{v['rift']['robust_acc'] - v['at']['robust_acc']:>+7.1f} {t['rift']['clean_acc'] - t['at']['clean_acc']:>+10.1f} "
              f"{t['rift']['robust_acc'] - t['at']['robust_acc']:>+8.1f} {seconds:>5.0f}s", flush=True)


if __name__ == "__main__":
    main()
