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


@pytest.mark.slow
def test_speed2_smoke_on_the_cpu_runs_every_part_and_resumes(tmp_path):
    """benchmarks/speed2.py (the CUDA-graph path against eager and the baseline) at tiny sizes on the CPU, where the
    graph path runs its step eagerly: every part finishes and lands in the JSON; at128's eager and graph epochs start
    from the same weights, data and random starts, so on the CPU they end with the same loss; a second run with
    --resume keeps the finished parts and runs only what --skip left out before."""
    out = tmp_path / "speed2.json"
    cmd = [sys.executable, "benchmarks/speed2.py", "--device", "cpu", "--smoke", "--json", str(out)]
    first = subprocess.run(cmd + ["--skip", "recipe"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert set(parts) == {"at128", "at512", "eval", "mrc", "rift", "profile"} and all(p["finished"] for p in parts.values())
    at = parts["at128"]
    assert at["baseline_epoch_s"] > 0 and at["eager_epoch_s"] > 0 and at["graph_epoch_s"] > 0 and at["replays"] == 0  # no CUDA: eager
    assert at["graph_train_loss"] == at["eager_train_loss"] and at["graph_minus_eager"] == {"clean_acc": 0.0, "robust_acc": 0.0}
    ev = parts["eval"]
    assert ev["graph_minus_eager"] == {"clean_acc": 0.0, "robust_acc": 0.0}
    # --fold-bn beside it at the same batch: 20 BatchNorms folded, each accuracy within one image of 128 of eager's;
    # the memory-sized batch is the evaluation batch off CUDA
    assert ev["folded_batchnorms"] == 20 and ev["memory_sized_batch"] == ev["batch"] and "graph_big_s" not in ev
    assert all(abs(ev[f"{tag}_minus_eager"][k]) <= 100 / 128 for tag in ("eager_fold", "graph_fold") for k in ("clean_acc", "robust_acc"))
    assert set(ev["images_per_s"]) == {"eager", "eager_fold", "graph", "graph_fold"} and all(v > 0 for v in ev["images_per_s"].values())
    assert parts["mrc"]["max_abs_mrc_difference"] == 0.0 and parts["mrc"]["modules"] == 21
    assert parts["rift"]["graph_choice"] == parts["rift"]["eager_choice"]
    assert parts["profile"]["table"] and all(t["met"] is None for t in report["targets"])  # targets: full size on an H100/H200 only
    second = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stdout + second.stderr
    resumed = json.loads(out.read_text())
    assert resumed["finished"] and resumed["parts"]["at128"] == at and resumed["parts"]["recipe"]["finished"]
    assert "at128:" not in second.stdout and "recipe:" in second.stdout
