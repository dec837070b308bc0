#!/usr/bin/env bash
# The one prepared GPU check: in a single call on a CUDA machine, install fastat, run the CUDA tests
# (the kernel cases run natively there), the kernel benchmarks and, when present, the step benchmark.
# Writes logs, JSON and a short table under $OUT (default benchmarks/out).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine (torch, triton preinstalled)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

python3 -m pip install -q -e . --no-deps --no-build-isolation >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{
  echo "date: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} | tee "$OUT/summary.txt"

echo "== tests (CUDA) ==" | tee -a "$OUT/summary.txt"
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_ops.py \
  tests/test_objective.py tests/test_engine.py tests/test_train_images.py tests/test_placement.py 2>&1 | tee "$OUT/tests.log" | tail -3 | tee -a "$OUT/summary.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== kernels ==" | tee -a "$OUT/summary.txt"
timeout 180 python3 benchmarks/bench_kernels.py --json "$OUT/kernels.json" 2>&1 | tee -a "$OUT/summary.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== data loader (fastat bench data, synthetic prepared sets) ==" | tee -a "$OUT/summary.txt"
for spec in "32 200000" "256 8000"; do
  set -- $spec
  timeout 240 python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from bench_storage import make_npy; make_npy(Path('/tmp/fastat-loader-$1'), $2, $1)" &&
  timeout 120 python3 -m fastat bench data "/tmp/fastat-loader-$1" --seconds 5 --json "$OUT/loader-$1.json" \
    2>&1 | tee -a "$OUT/summary.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  rm -rf "/tmp/fastat-loader-$1"
done

if [ -f benchmarks/bench_step.sh ]; then
  echo "== training step ==" | tee -a "$OUT/summary.txt"
  timeout 300 bash benchmarks/bench_step.sh "$OUT" 2>&1 | tee -a "$OUT/summary.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
exit $status
