# Sourced by benchmarks/gpu_check.sh (not run): stages under a time plan, their logs and JSON lines, the
# install and the closing table. The caller sets PLAN (every stage NAME:LIMIT_SECONDS in the order they
# run) and OPTIONAL (stages whose failure fails nothing), sources this file, calls `setup`, then
# `stage NAME COMMAND...` for each stage, then `finish`.
#
# A stage runs until the plan's running total at NAME: its own limit plus what the stages before it left
# unused, never beyond, so a whole run ends within the plan whatever happens. Each appends its log to
# $OUT/logs.txt and one JSON line to $OUT/stages.jsonl. `finish` prints the table
# (benchmarks/gpu_summary.py) and folds the result files into $OUT/summary.json, leaving 3 files; there
# are never more than 8 in $OUT (the device tool returns at most 8).
OUT=${OUT:-benchmarks/out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
: >"$OUT/stages.jsonl"
: >"$OUT/logs.txt"
TMPD=$(mktemp -d /tmp/fastat-gpu-check.XXXXXX)
export PYTHONUNBUFFERED=1 PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore
# one compile cache for every stage and process, kept between calls. Not the AOTAutograd cache: torch
# < 2.14 keys it on autocast on/off, not its dtype (an fp16 process loaded bf16 graphs and trained in
# bf16; fastat.utils.compile_cache), and an environment setting beats fastat's own. The FX graph cache
# keys on the dtypes and still spares the later processes Inductor's code generation.
export TORCHINDUCTOR_CACHE_DIR=/tmp/fastat-inductor TRITON_CACHE_DIR=/tmp/fastat-triton
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=0
T0=$(date +%s)
status=0

planned() { # planned NAME [limit]: the plan's running total up to and including NAME, or NAME's limit
  local e sum=0
  for e in "${PLAN[@]}"; do
    sum=$((sum + ${e#*:}))
    if [ "${e%%:*}" = "$1" ]; then
      [ "${2:-}" = limit ] && echo "${e#*:}" || echo "$sum"
      return
    fi
  done
  echo "gpu_stages.sh: $1 is not in PLAN" >&2
  exit 3
}

record() { # record NAME RC START LIMIT EFFECTIVE LOG [NOTE]: one JSON line on stages.jsonl
  "$PY" - "$@" >>"$OUT/stages.jsonl" <<'EOF'
import json, re, sys, time
name, rc, t0, limit, eff, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
try:
    lines = [x for x in open(log, errors="replace").read().splitlines() if x.strip()]
except OSError:
    lines = []
row = {"stage": name, "rc": rc, "seconds": round(time.time() - t0, 1), "limit_s": limit,
       "effective_limit_s": eff, "timed_out": rc in (124, 137), "last": lines[-1][:300] if lines else ""}
# pytest's closing line ("3 passed, 1 skipped in 2.1s"; "no tests ran in 0.1s"): the summary counts it
tests = [x for x in lines if re.search(r"(\d+ \w+|no tests ran)( \w+)? in \d[\d.]*s\b", x)]
if tests:
    row["tests"] = tests[-1].strip(" =")[:300]
cuda = [x[len("cuda: "):].strip() for x in lines if name == "info" and x.startswith("cuda: ")]
if cuda:  # the info stage: the device's name, or "none" without CUDA
    row["cuda"] = None if cuda[-1] == "none" else cuda[-1]
if len(sys.argv) > 7:
    row["note"] = sys.argv[7]
print(json.dumps(row))
EOF
}

stage() { # stage NAME COMMAND...: run it until the plan's running total at NAME (its limit + left over)
  local name=$1 t0 rc eff log="$TMPD/$1.log"
  shift
  eff=$(($(planned "$name") - ($(date +%s) - T0)))
  t0=$(date +%s.%N)
  echo "== $name (limit $(planned "$name" limit) s; ${eff} s with what earlier stages left) =="
  if [ "$eff" -lt 1 ]; then
    echo "no time left in the plan" >"$log"
    rc=124
  else
    timeout -k 2 "$eff" "$@" >"$log" 2>&1
    rc=$?
  fi
  { echo "===== $name (rc=$rc) ====="; cat "$log"; } >>"$OUT/logs.txt"
  tail -n 4 "$log"
  record "$name" "$rc" "$t0" "$(planned "$name" limit)" "$eff" "$log"
  [ "$rc" -eq 0 ] || [[ " ${OPTIONAL:-} " == *" $name "* ]] || status=1
  return "$rc"
}

finish() {
  "$PY" benchmarks/gpu_summary.py "$OUT" --merge || status=1
  rm -rf "$TMPD"
  exit "$status"
}

setup() { # the step settings; the install (not in SMOKE); stop with one line if fastat cannot be imported
  if [ "${SMOKE:-0}" = 1 ]; then # CPU: toy sizes, kernels under the interpreter
    export TRITON_INTERPRET=1
    STEP=(--model tiny --image-size 8 --device cpu --no-fast --steps 2 --warmup 1)
    KERNELS=(--smoke)
    XDIST=()
    LOADER_N=2000
  else
    STEP=(--model cifar10 --precision bf16 --mode adv --steps 20 --warmup 5)
    KERNELS=()
    XDIST=()
    "$PY" -c "import xdist" >/dev/null 2>&1 && XDIST=(-n 4)
    if ! stage install "$PY" -m pip install -q -e . --no-deps --no-build-isolation --disable-pip-version-check; then
      # run from this copy of the source tree instead (fastat.kernels lives in kernels/: a link here)
      ln -sfn ../kernels fastat/kernels && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
  fi
  if ! (cd / && "$PY" -c "import fastat.kernels, triton") >"$TMPD/import.log" 2>&1; then
    record import_check 1 "$(date +%s)" 0 0 "$TMPD/import.log" \
      "STOPPED: fastat.kernels cannot be imported, so no later stage can run (see logs.txt)"
    { echo "===== import_check ====="; cat "$TMPD/import.log"; } >>"$OUT/logs.txt"
    status=1
    finish
  fi
  stage info bash -c "date -u +%FT%TZ; git rev-parse --short HEAD 2>/dev/null; echo cpus: \$(nproc); \
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; \
    $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__); \
    print(\"cuda:\", torch.cuda.get_device_name() if torch.cuda.is_available() else \"none\")'; \
    echo 'pytest-xdist: ${XDIST[*]:-no}'"
}
