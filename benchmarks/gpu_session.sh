#!/usr/bin/env bash
# What one lent H100/H200 session runs (15 minutes of device time, start-up included), as two calls of at most
# about 6 minutes each, so that either can be repeated once:
#
#   bash benchmarks/gpu_session.sh study OUT   # the scale study's width-64 row, with tests/test_cuda.py beside it
#   bash benchmarks/gpu_session.sh speed OUT   # benchmarks/gpu_check.py without its tests: riftlab vs the baseline, WRN-34-10
#   bash benchmarks/gpu_session.sh speed2 OUT  # the CUDA-graph path: tests/test_cuda.py, then benchmarks/speed2.py (about 8 min)
#   bash benchmarks/gpu_session.sh decomposition OUT  # what RiFT's gain is made of at width 64 (see below; about 9 min)
#
# `study` runs the row in the background (its wall time is therefore not a benchmark: the CUDA tests share the GPU
# for their first minute or two) and the tests in the foreground; the row is resumable, so a second `study` call on
# the same (still warm) machine continues it. Its small files (results, curves, per-image test results, logs; not the
# checkpoints) come back as OUT/w64.tgz; here: `tar xzf w64.tgz -C runs` and
# `python benchmarks/scale_study.py summarize --big --gpu --root runs/scale_study_gpu --carry results/scale_study/study.json`.
#
# The data travels in the working tree: before the call, here,
#   mkdir -p runs/gpu-data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz runs/gpu-data/fashion-mnist/
# and carry `runs/gpu-data` (30 MB). ROW_LIMIT / TEST_LIMIT / SPEED_BUDGET / SPEED2_BUDGET (seconds) bound each part.
# `speed2` needs no data (synthetic CIFAR-shaped images) and fits one call of at most 10 minutes: the CUDA tests (at most
# TEST_LIMIT, 150 s), then speed2.py's parts until SPEED2_BUDGET (360 s) is spent, its JSON rewritten after each part in
# runs/speed2/ (ignored by git, so it stays on a warm machine: a second `speed2` call, with SKIP_TESTS=1, continues it)
# and copied to OUT at the end; here it goes to benchmarks/results/. SMOKE=1 runs it all at tiny sizes on the CPU.
# `decomposition` runs the scale study's decomposition at the paper's width on 10000 training images: 40 epochs of PGD-10
# AT with RiFT as riftlab runs it, then the authors' protocol and BatchNorm recalibration alone (ONLY= other jobs, SEED=),
# one after the other, resumable (a second call continues); its small files and the AT weights come back as
# OUT/decomposition.tgz; here: `tar xzf decomposition.tgz -C .` and `python benchmarks/scale_study.py export --decomposition
# --decomposition-at 64,10000 --at-epochs 40 --root runs/scale_study_gpu`.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: gpu_session.sh study|speed|speed2|decomposition OUT}
out=${2:?usage: gpu_session.sh study|speed|speed2|decomposition OUT}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export RIFTLAB_DATA=${RIFTLAB_DATA:-$PWD/runs/gpu-data}
PY=${PY:-python3}
started=$(date +%s)
"$PY" - <<'EOF' | tee "$out/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
EOF
case $what in
study)
    root=runs/scale_study_gpu
    row=${ROW:-w64-n55k-s0}
    (timeout "${ROW_LIMIT:-330}" "$PY" benchmarks/scale_study.py run --gpu --phase 1 --only "$row" --root "$root" --jobs 1 --threads 4 \
        ${SMOKE:+--smoke} >"$out/runner.log" 2>&1; echo "runner exit $?" >>"$out/runner.log") &
    runner=$!
    if [ -z "${SKIP_TESTS:-}" ]; then
        timeout "${TEST_LIMIT:-150}" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py >"$out/cuda-tests.log" 2>&1
        echo "cuda tests exit $? after $(( $(date +%s) - started )) s"
        tail -n 5 "$out/cuda-tests.log"
    fi
    wait "$runner"
    # the row's job, if the runner's time limit left it running (its progress is saved; a rerun resumes it); by its pid
    # file, never by name: other riftlab runs on the same machine are not ours to stop
    [ -f "$root/logs/$row.pid" ] && kill "$(cat "$root/logs/$row.pid")" 2>/dev/null && sleep 2
    tar czf "$out/w64.tgz" --exclude='*/at.pt' --exclude='*/ft.pt' --exclude='*/rift.pt' --exclude='*/progress' "$root" 2>/dev/null
    tail -n 3 "$out/runner.log"
    for log in "$root"/logs/*.log; do echo "== $log"; tail -n 15 "$log"; done
    ;;
decomposition)
    root=runs/scale_study_gpu
    at=64,10000 epochs=40 seeds=0
    [ -n "${SMOKE:-}" ] && at=16,1000 epochs=2  # the smoke's GPU configuration, on the CPU
    [ "${SEED:-0}" != 0 ] && seeds="0,$SEED"
    name="w${at%%,*}-n$(( ${at##*,} / 1000 ))k-e$epochs-s${SEED:-0}"
    only=${ONLY:-$name,$name:reference,$name:bn-only}
    timeout "${ROW_LIMIT:-540}" "$PY" benchmarks/scale_study.py run --phase 1 --decomposition --decomposition-at "$at" --at-epochs "$epochs" \
        --decomposition-seeds "$seeds" --only "$only" --root "$root" --jobs 1 --threads 4 ${SMOKE:+--smoke} >"$out/runner.log" 2>&1
    echo "runner exit $? after $(( $(date +%s) - started )) s"
    for pid in "$root"/logs/*.pid; do [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null; done  # ours, by pid file (a rerun resumes)
    tar czf "$out/decomposition.tgz" --exclude='*/ft.pt' --exclude='*/ft_epochs.pt' --exclude='*/rift.pt' --exclude='*/progress' "$root" 2>/dev/null
    tail -n 5 "$out/runner.log"
    for log in "$root"/logs/*.log; do echo "== $log"; tail -n 8 "$log"; done
    ;;
speed)
    # Full sizes for AT and evaluation; MRC on 5000 adversarial examples (the baseline's MRC, a deep copy of the network
    # per module, would take minutes at 10000) and no baseline pipeline; the WRN-34-10 epoch on 10000 images.
    "$PY" benchmarks/gpu_check.py --skip tests,mrc --budget "${SPEED_BUDGET:-330}" --out "$out" ${SMOKE:+--smoke --device cpu} \
        --speed-args "--mrc-examples ${MRC_EXAMPLES:-5000} --skip baseline-pipeline" --wrn-args "--train ${WRN_TRAIN:-10000}"
    for f in "$out"/gpu-check-*.json; do "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps({k: {m: v.get(m) for m in ('returncode', 'seconds', 'timed_out')} for k, v in r['steps'].items()}))" "$f"; done
    ;;
speed2)
    if [ -z "${SKIP_TESTS:-}" ]; then
        timeout "${TEST_LIMIT:-150}" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py >"$out/cuda-tests.log" 2>&1
        echo "cuda tests exit $? after $(( $(date +%s) - started )) s"
        tail -n 8 "$out/cuda-tests.log"
    fi
    work=runs/speed2
    mkdir -p "$work"
    slug=$("$PY" -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu').strip('-').lower())")
    # the budget inside, and a hard limit a little above it outside: the JSON keeps every finished part either way
    timeout $(( ${SPEED2_BUDGET:-360} + 60 )) "$PY" benchmarks/speed2.py --json "$work/speed2-$slug.json" --budget "${SPEED2_BUDGET:-360}" \
        --resume ${SMOKE:+--smoke --device cpu} >"$out/speed2.log" 2>&1
    echo "speed2 exit $?"
    cp "$work/speed2-$slug.json" "$out/"
    tail -n 30 "$out/speed2.log"
    ;;
*)
    echo "unknown part $what: study, speed, speed2 or decomposition" >&2
    exit 2
    ;;
esac
echo "gpu_session $what: $(( $(date +%s) - started )) s"
