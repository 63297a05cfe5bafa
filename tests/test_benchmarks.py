"""The prepared GPU check runs end to end on the CPU (tiny sizes) and writes its JSON (benchmarks/gpu_check.py)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_check_smoke_on_the_cpu_writes_every_step(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--smoke", "--out", str(tmp_path), "--skip", "wrn"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("gpu-check-*-smoke-*.json")
    report = json.loads(path.read_text())
    assert report["device"]["auto_precision"] == "fp32" and report["failed"] == []
    assert report["steps"]["tests"]["returncode"] == 0 and "skipped" in report["steps"]["tests"]["tail"]  # no CUDA here: every CUDA test skips
    speed = report["steps"]["speed"]["results"]
    assert speed["metrics"] and all(m["riftlab"] is not None for m in speed["metrics"].values() if m["unit"] != "GiB")
    mrc = report["steps"]["mrc_cache"]
    assert mrc["identical"] and mrc["speedup"] > 0 and len(mrc["seconds_cached"]) == 2
