#!/usr/bin/env bash
# Training-step throughput on CUDA (called by gpu_check.sh with the output folder as $1):
# the CIFAR-10 DDPM UNet in bf16 at batch 32 and 128, modes adv and pgd (3 steps), each against naive
# eager AT and fastat's own DDPM step.
set -euo pipefail
out=${1:-benchmarks/out}
python3 -m fastat.bench --model cifar10 --precision bf16 --batch-size 128 32 --mode adv pgd --pgd-steps 3 \
  --steps 30 --warmup 5 --json "$out/bench_step.json"
