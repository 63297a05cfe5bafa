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
    assert report["device"]["auto_precision"] == "fp32" and report["failed"] == [] and report["cut_short"] == []
    assert report["steps"]["tests"]["returncode"] == 0 and "skipped" in report["steps"]["tests"]["tail"]  # no CUDA here: every CUDA test skips
    speed = report["steps"]["speed"]["results"]
    assert speed["finished"] and speed["parts_done"] == ["at", "eval", "mrc", "pipeline"]
    assert speed["metrics"] and all(m["riftlab"] is not None for m in speed["metrics"].values() if m["unit"] != "GiB")
    mrc = report["steps"]["mrc_cache"]
    assert mrc["identical"] and mrc["speedup"] > 0 and len(mrc["seconds_cached"]) == 2


@pytest.mark.slow
def test_speed_killed_midway_keeps_the_parts_it_measured(tmp_path):
    """speed.py rewrites its JSON after every part, so a run stopped by a time limit (the GPU check's, or a lease's)
    still leaves valid figures for the parts it finished, marked unfinished."""
    import os
    import signal
    import time

    out = tmp_path / "speed.json"
    proc = subprocess.Popen([sys.executable, "benchmarks/speed.py", "--device", "cpu", "--smoke", "--json", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    partial = None
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if out.is_file():
                report = json.loads(out.read_text())  # written atomically: never half a file
                if not report["finished"]:
                    partial = report
                    break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert partial is not None, "speed.py never wrote an unfinished report before it ended"
    assert partial["parts_done"] in (["at"], ["at", "eval"])
    kept = json.loads(out.read_text())  # what the killed run left
    assert not kept["finished"] and kept["parts_done"][:len(partial["parts_done"])] == partial["parts_done"]
    assert kept["metrics"]["at_epoch_s"]["riftlab"] > 0 and kept["metrics"]["at_epoch_s"]["baseline"] > 0
