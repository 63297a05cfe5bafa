"""Soak test: kill a whole `riftlab rift` run with SIGKILL once inside every stage (adversarial training,
MRC, fine-tuning, the interpolation curve, the test evaluation), resume it each time, and check that
it ends bit-identical to an uninterrupted run: the same weights in at.pt, ft.pt and rift.pt, the same
mrc.csv, interpolation.csv, test.json and per-image results.

    python benchmarks/soak_resume.py            # one kill per stage (5), a few minutes on a 2-core CPU
    python benchmarks/soak_resume.py --seed 3   # other kill moments

Each kill waits until the stage has saved some progress (its file under progress/), then a random
0-1 s more, so the resumed stage really continues from partial work. Prints one line per kill and
a verdict; exits non-zero if anything differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from riftlab.checkpoint import read_checkpoint

STAGES = ("at", "mrc", "finetune", "interpolate", "test")
ARGS = ["rift", "--dataset", "synthetic-cifar10", "--synthetic-sizes", "900,300", "--val-size", "300", "--width", "4",
        "--train-subset", "600", "--val-subset", "256", "--test-subset", "256", "--batch-size", "50", "--eval-batch-size", "64",
        "--at-epochs", "5", "--at-attack-steps", "2", "--mrc-examples", "256", "--mrc-passes", "2", "--ft-epochs", "4", "--ft-lr", "0.01",
        "--eval-steps", "3", "--eval-restarts", "2", "--device", "cpu", "--seed", "1", "--no-progress"]


def command(out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "riftlab", *ARGS, "--out", str(out)] + (["--resume"] if resume else [])


def _running_stage(out: Path) -> str | None:
    """The stage the lock file says is running and that has saved some progress, if any."""
    try:
        stages = json.loads((out / "riftlab.lock").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return None
    for name, record in stages.items():
        if record.get("status") == "started" and any((out / "progress").glob(f"{name}*")):
            return name
    return None


def _same_outputs(a: Path, b: Path) -> list[str]:
    differ = []
    for name in ("at.pt", "ft.pt", "rift.pt"):
        sa, sb = read_checkpoint(a / name)["model_state"], read_checkpoint(b / name)["model_state"]
        if set(sa) != set(sb) or not all(torch.equal(sa[k], sb[k]) for k in sa):
            differ.append(name)
    for name in ("mrc.csv", "interpolation.csv", "finetune.csv", "at_history.csv", "alpha.json", "test.json"):
        if (a / name).read_text() != (b / name).read_text():
            differ.append(name)
    ta, tb = read_checkpoint(a / "test_correct.pt"), read_checkpoint(b / "test_correct.pt")
    if not all(torch.equal(ta[m][k], tb[m][k]) for m in ta for k in ta[m]):
        differ.append("test_correct.pt")
    return differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="riftlab-soak-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    reference = subprocess.Popen(command(work / "uninterrupted", False), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim_dir = work / "killed"
    killed: list[str] = []
    resume = False
    while True:
        proc = subprocess.Popen(command(victim_dir, resume), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        target = next((s for s in STAGES if s not in killed), None)
        while proc.poll() is None:
            stage = _running_stage(victim_dir)
            if target is not None and stage == target:
                time.sleep(rng.uniform(0.0, 1.0))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    killed.append(target)
                    print(f"{time.time() - t0:7.1f} s  killed inside stage {target}", flush=True)
                break
            time.sleep(0.05)
        if proc.returncode == 0:
            break
        if proc.returncode != -signal.SIGKILL:
            print(f"the run failed (exit {proc.returncode}):\n{proc.stderr.read()}")
            return 1
        resume = True
    if reference.wait() != 0:
        print(f"the uninterrupted run failed:\n{reference.stderr.read()}")
        return 1
    differ = _same_outputs(work / "uninterrupted", victim_dir)
    missed = [s for s in STAGES if s not in killed]
    print(f"{len(killed)} kills ({', '.join(killed)}); {time.time() - t0:.0f} s in all; runs in {work}")
    if missed:
        print(f"note: stages finished before a kill could land in them: {', '.join(missed)}")
    if differ:
        print(f"DIFFERENT from the uninterrupted run: {', '.join(differ)}")
        return 1
    print("bit-identical to the uninterrupted run: at.pt, ft.pt, rift.pt, mrc.csv, interpolation.csv, finetune.csv, at_history.csv, "
          "alpha.json, test.json, test_correct.pt")
    return 0 if not missed else 2


if __name__ == "__main__":
    sys.exit(main())
