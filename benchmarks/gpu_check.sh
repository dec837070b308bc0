#!/usr/bin/env bash
# The one prepared GPU check: one device call, at most 8 minutes on an H100/H200, meant to pass the
# first time. Stages run in order of importance, each under its own timeout (together 450 s, 466 s with
# the kill grace), none stops the next; each appends one JSON line to $OUT/stages.jsonl as it finishes
# and the benchmarks rewrite their JSON after every row, so a timeout loses only what was unfinished.
# Ends with a short table (benchmarks/gpu_summary.py: stages, step times, the issue's targets).
# The limits are estimates, not measurements (no GPU has run this yet): kernel_cases makes ~123 Triton
# JIT compiles, each step bench two cold torch.compile graphs of the CIFAR-10 UNet (model and the
# attack's detached copy; a fresh process per batch size, so no dynamic-shape recompile).
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine (torch, triton, pytest installed)
#   SMOKE=1 bash benchmarks/gpu_check.sh          # on a CPU: the same plumbing at toy sizes, no install
#
# 1 install (no deps, no build isolation)  2 info  3 kernel cases natively  4 CUDA engine tests (captured
# step == eager step, replays under set_sync_debug_mode("error"), a real failed capture, uint8 batches
# prepared inside the graph, the loader placements on CUDA)  5 kernel bandwidth (cold L2)  6 step bench B=128 bf16 adv (naive, fastat,
# fastat DDPM, naive+torch.compile)  7 step bench B=32 (naive, fastat: a fresh static compile in a fresh
# process, no dynamic shapes)  8 data loader throughput (fastat bench data on a synthetic prepared set).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
: >"$OUT/stages.jsonl"
export PYTHONUNBUFFERED=1
status=0

stage() { # stage NAME LIMIT_SECONDS COMMAND...: run it, log to $OUT/NAME.log, append its JSON line
  local name=$1 limit=$2 t0 rc
  shift 2
  echo "== $name (limit ${limit}s) =="
  t0=$(date +%s.%N)
  timeout -k 2 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 4 "$OUT/$name.log"
  "$PY" - "$name" "$rc" "$t0" "$limit" "$OUT/$name.log" >>"$OUT/stages.jsonl" <<'EOF'
import json, sys, time
name, rc, t0, limit, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
lines = [x for x in open(log, errors="replace").read().splitlines() if x.strip()]
print(json.dumps({"stage": name, "rc": rc, "seconds": round(time.time() - t0, 1), "limit_s": limit,
                  "timed_out": rc in (124, 137), "last": lines[-1][:300] if lines else ""}))
EOF
  [ "$rc" -eq 0 ] || status=1
}

if [ "${SMOKE:-0}" = 1 ]; then # CPU: toy sizes, kernels under the interpreter
  export TRITON_INTERPRET=1
  STEP=(--model tiny --image-size 8 --device cpu --no-fast --steps 2 --warmup 1)
  KERNELS=(--smoke)
  LOADER_N=2000
else
  STEP=(--model cifar10 --precision bf16 --mode adv --steps 20 --warmup 5)
  KERNELS=()
  stage install 25 "$PY" -m pip install -q -e . --no-deps --no-build-isolation --disable-pip-version-check
fi
stage info 10 bash -c "date -u +%FT%TZ; git rev-parse --short HEAD 2>/dev/null; \
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; \
  $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, \
  \"cuda\", torch.cuda.is_available() and torch.cuda.get_device_name())'"
# CUDA-critical first: the kernels natively, then the captured step against the eager step.
stage kernel_cases 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py
stage engine_cuda 65 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_engine.py tests/test_train_images.py \
  tests/test_placement.py -k cuda
stage kernels_bench 35 "$PY" benchmarks/bench_kernels.py ${KERNELS[@]+"${KERNELS[@]}"} --json "$OUT/kernels.json"
# naive first, fastat next (the speed-up survives a timeout), naive+torch.compile last
stage step_b128 130 "$PY" -m fastat.bench "${STEP[@]}" --batch-size 128 \
  --runs naive fastat fastat_ddpm naive_compiled --json "$OUT/bench_b128.json"
stage step_b32 65 "$PY" -m fastat.bench "${STEP[@]}" --batch-size 32 --runs naive fastat \
  --json "$OUT/bench_b32.json"
# issue 11's loader benchmark: 200k synthetic 32x32 images, each placement for 4 s
stage loader 30 bash -c "[ -f benchmarks/bench_storage.py ] || { echo 'skipped: benchmarks/bench_storage.py is not in the tree'; exit 0; }; \
  $PY -c \"import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); from bench_storage import make_npy; \
  make_npy(Path('/tmp/fastat-loader-32'), ${LOADER_N:-200000}, 32)\" && \
  $PY -m fastat bench data /tmp/fastat-loader-32 --seconds 4 --json $OUT/loader-32.json; rc=\$?; \
  rm -rf /tmp/fastat-loader-32; exit \$rc"
"$PY" benchmarks/gpu_summary.py "$OUT" | tee "$OUT/table.txt"
exit $status
