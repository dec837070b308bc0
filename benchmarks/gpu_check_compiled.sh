#!/usr/bin/env bash
# The optional second GPU call: naive AT + torch.compile against fastat at B=128 (bf16, adv), the issue's
# "fastat / naive+torch.compile >= 1.5" target. Apart from benchmarks/gpu_check.sh because the naive
# loop's compiled input-gradient graph is one more cold Inductor compile of the CIFAR-10 UNet, which the
# first call's 8 minutes cannot also hold. Same stages, logs and table (benchmarks/gpu_stages.sh): $OUT
# ends with stages.jsonl, logs.txt and summary.json. PLAN: 425 s, 431 s with the kill graces. The
# compile cache of a first call on the same machine (/tmp/fastat-inductor) makes fastat's compile a
# cache load; on a fresh machine both compiles are cold (estimates: 40-120 s each on an H100).
#
#   bash benchmarks/gpu_check_compiled.sh                 # on the GPU machine, after gpu_check.sh
#   SMOKE=1 bash benchmarks/gpu_check_compiled.sh         # on a CPU: the plumbing at toy sizes
set -uo pipefail
cd "$(dirname "$0")/.."
PLAN=(install:20 info:5 compiled_b128:400)
OPTIONAL=
source benchmarks/gpu_stages.sh
setup
# naive + torch.compile first (the new measurement), then fastat for the ratio; fewer timed steps
stage compiled_b128 "$PY" -m fastat.app.bench "${STEP[@]}" --steps 10 --warmup 4 --batch-size 128 \
  --runs naive_compiled fastat --json "$OUT/bench_b128_compiled.json"
finish
