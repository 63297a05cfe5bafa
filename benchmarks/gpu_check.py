"""One prepared GPU check: riftlab's CUDA tests and its speed against the reference-style baseline, as JSON.

    python benchmarks/gpu_check.py                    # on a GPU machine: all steps at full size
    python benchmarks/gpu_check.py --device cpu --smoke   # the same steps at tiny sizes (the test suite runs it)

Steps, each with its own time limit so that a slow or failing one cannot eat the others' time:

1. the device: name, compute capability, memory, torch and CUDA versions, the precision ``auto`` picks;
2. ``pytest tests/test_cuda.py`` (bf16 and fp16 against fp32, channels_last, compile against eager,
   MRC through cached activations against the whole network, exact eps = 0 sanity check, SyncBatchNorm);
3. ``benchmarks/speed.py`` at full size (ResNet-18 on CIFAR-sized data, batch 128): PGD-10 AT epoch,
   MRC of every module, PGD-10 evaluation and the RiFT pipeline from an AT model, riftlab against the
   baseline in the same run, with ratios;
4. the MRC sweep with and without cached activations (same model and adversarial set);
5. a WRN-34-10 PGD-10 AT epoch (riftlab only: the issue asks for the figure, not a target).

Measured on one H200 (2026-12-04, ``benchmarks/results/gpu-check-nvidia-h200-2026-12-04.json``): the CUDA tests 88 s;
``speed.py`` with MRC on 5000 examples and no baseline pipeline 191 s; the WRN-34-10 epoch on 10000 images 27 s (what
``benchmarks/gpu_session.sh`` runs to fit a 15-minute lease; the full-size baseline MRC and pipeline would add minutes).

Everything lands in ``--out`` (default ``benchmarks/results/``) as ``gpu-check-<device>-<date>.json``,
rewritten after every step, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def _device_info(device: str) -> dict[str, Any]:
    from riftlab.compute import native_bf16, precision_name

    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, capability=list(torch.cuda.get_device_capability(0)), memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, native_bf16=native_bf16("cuda"), auto_precision=precision_name("cuda"))
    else:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
        info.update(name=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), auto_precision=precision_name("cpu"))
    return info


def _run(cmd: list[str], timeout: float) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        out = {"returncode": proc.returncode, "tail": (proc.stdout + proc.stderr)[-4000:]}
    except subprocess.TimeoutExpired as err:
        out = {"returncode": None, "timed_out": True, "tail": ((err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes)
                                                                else (err.stdout or ""))[-4000:]}
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def _mrc_cache(device: str, smoke: bool) -> dict[str, Any]:
    """The MRC sweep of every module of a ResNet-18 with and without cached activations: seconds and agreement."""
    from riftlab import Batches, adversarial_set, build_model, load_dataset, module_robust_criticality
    from riftlab.compute import to_device

    width, examples, passes, batch = (4, 64, 1, 64) if smoke else ((64, 10000, 10, 512) if device == "cuda" else (16, 1000, 2, 256))
    splits = load_dataset("synthetic-cifar10", synthetic_sizes=(examples + 100, 100), val_size=100)
    torch.manual_seed(0)
    model = to_device(build_model("resnet18", 10, 3, 32, width, splits.info.mean, splits.info.std), device).eval()
    adv = adversarial_set(model, Batches(splits.train.subset(examples), batch, device=device), 8 / 255, 2 / 255, 10 if not smoke else 2)
    times, tables = {}, {}
    for cached in (True, False, True, False):  # A B A B: the machine's drift shows in the spread
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tables[cached] = module_robust_criticality(model, adv, passes=passes, reuse_activations=cached)
        if device == "cuda":
            torch.cuda.synchronize()
        times.setdefault(cached, []).append(time.perf_counter() - t0)
    merged = tables[True].merge(tables[False], on="module", suffixes=("_cached", "_whole"))
    return {"model": f"resnet18 width {width}", "examples": examples, "passes": passes, "batch": batch, "device": device,
            "seconds_cached": times[True], "seconds_whole": times[False], "speedup": min(times[False]) / min(times[True]),
            "identical": bool((merged["mrc_cached"] == merged["mrc_whole"]).all()),
            "max_abs_difference": float((merged["mrc_cached"] - merged["mrc_whole"]).abs().max())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds to a minute on a CPU): checks the script itself")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together (default: 8 minutes)")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip: tests, speed, mrc, wrn")
    parser.add_argument("--speed-args", default="", help="extra options for benchmarks/speed.py (e.g. '--skip baseline-pipeline')")
    parser.add_argument("--wrn-args", default="", help="extra options for the WRN-34-10 epoch (e.g. '--train 10000')")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; pass --device cpu (with --smoke for a quick check)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    info = _device_info(args.device)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", info["name"]).strip("-").lower()[:40] + ("-smoke" if args.smoke else "")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-check-{slug}-{datetime.date.today().isoformat()}.json"
    report: dict[str, Any] = {"device": info, "command": " ".join(["python", *sys.argv]), "started": datetime.datetime.now().isoformat(timespec="seconds"),
                              "steps": {}}

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - started, 1)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, path)

    def left() -> float:
        return args.budget - (time.perf_counter() - started)

    save()
    if "tests" not in skip:
        report["steps"]["tests"] = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                                        timeout=min(150.0, max(10.0, left())))
        save()
    if "speed" not in skip:
        speed_json = args.out / f".speed-{slug}.json"
        cmd = [sys.executable, "benchmarks/speed.py", "--device", args.device, "--json", str(speed_json)]
        if args.smoke:
            cmd.append("--smoke")
        cmd += args.speed_args.split()
        report["steps"]["speed"] = _run(cmd, timeout=min(300.0, max(10.0, left() - 90)))
        if speed_json.is_file():
            report["steps"]["speed"]["results"] = json.loads(speed_json.read_text())
            speed_json.unlink()
        save()
    if "mrc" not in skip and left() > 30:
        t0 = time.perf_counter()
        try:
            report["steps"]["mrc_cache"] = _mrc_cache(args.device, args.smoke)
        except Exception as err:  # noqa: BLE001 - record and go on: the other steps still count
            report["steps"]["mrc_cache"] = {"error": f"{type(err).__name__}: {err}"}
        report["steps"]["mrc_cache"]["seconds"] = round(time.perf_counter() - t0, 1)
        save()
    if "wrn" not in skip and left() > 30:
        wrn_json = args.out / f".wrn-{slug}.json"
        cmd = [sys.executable, "benchmarks/speed.py", "--device", args.device, "--model", "wrn34_10", "--skip", "mrc,eval,pipeline,baseline",
               "--json", str(wrn_json)]
        if args.smoke:
            cmd += ["--smoke"]
        cmd += args.wrn_args.split()
        report["steps"]["wrn34_10_at_epoch"] = _run(cmd, timeout=max(10.0, left()))
        if wrn_json.is_file():
            report["steps"]["wrn34_10_at_epoch"]["results"] = json.loads(wrn_json.read_text())
            wrn_json.unlink()
        save()
    failed = [name for name, step in report["steps"].items() if step.get("returncode") not in (0, None) or "error" in step]
    cut = [name for name, step in report["steps"].items() if step.get("timed_out")]  # stopped at its time limit: partial figures
    report["failed"], report["cut_short"] = failed, cut
    save()
    outcome = []
    if failed:
        outcome.append(f"failed: {', '.join(failed)}")
    if cut:
        outcome.append(f"cut short by the time limit: {', '.join(cut)}")
    print(f"wrote {path} ({report['seconds']:.0f} s); " + ("; ".join(outcome) or "every step ran to its end"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
