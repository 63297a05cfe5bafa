"""Soak test: kill an adversarial-training run with SIGKILL at random moments, resume it each
time, and check that it ends with the same weights as an uninterrupted run.

    python benchmarks/soak_resume.py --kills 5 --epochs 8

Prints one line per kill and a final verdict; exits non-zero if the weights differ.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from riftlab.checkpoint import read_checkpoint


def command(out: Path, epochs: int, resume: bool) -> list[str]:
    return [sys.executable, "-m", "riftlab", "train-at", "--dataset", "synthetic-cifar10", "--width", "4",
            "--train-subset", "1500", "--val-subset", "200", "--test-subset", "100", "--epochs", str(epochs),
            "--attack-steps", "2", "--batch-size", "64", "--device", "cpu", "--seed", "1", "--no-progress", "--out", str(out)] + (
        ["--resume"] if resume else [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the run (at least kills + 2, so each kill lands mid-run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="riftlab-soak-"))
    t0 = time.time()
    subprocess.run(command(work / "clean", args.epochs, False), check=True, capture_output=True)
    clean_seconds = time.time() - t0
    print(f"uninterrupted run: {clean_seconds:.1f} s")
    out = work / "killed"
    last = out / "at" / "last.pt"
    epoch_seconds = clean_seconds / args.epochs  # an upper bound: it includes start-up
    kills = 0

    def epochs_done() -> int:
        try:
            return read_checkpoint(last)["epoch"] + 1 if last.is_file() else 0
        except Exception:  # caught mid-rename: not there yet
            return 0

    while True:
        proc = subprocess.Popen(command(out, args.epochs, resume=kills > 0), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # kill once this run has finished at least one more epoch (so every resume makes progress),
        # at a random moment inside the epoch after it, until the planned number of kills is reached
        if kills < args.kills and epochs_done() < args.epochs - 1:
            start = epochs_done()
            while proc.poll() is None and epochs_done() <= start:
                time.sleep(0.05)
            if proc.poll() is None:
                delay = rng.uniform(0.05, 0.95) * epoch_seconds
                time.sleep(delay)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    print(f"kill {kills}: SIGKILL {delay:.1f} s into epoch {epochs_done() + 1}; {epochs_done()} epoch(s) saved")
                    continue
        if proc.wait() != 0:
            print(proc.stderr.read().decode(), file=sys.stderr)
            return 1
        break
    a = read_checkpoint(work / "clean" / "at.pt")["model_state"]
    b = read_checkpoint(out / "at.pt")["model_state"]
    same = all(torch.equal(a[k], b[k]) for k in a)
    print(f"{kills} kills; final weights {'bit-identical to' if same else 'DIFFERENT from'} the uninterrupted run")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
