"""torch < 2.14's on-disk AOTAutograd cache keys on whether autocast is on, not on its dtype: an fp16
process that found a bf16 process's graph in the same cache folder trained in bf16
(:mod:`fastat.utils.compile_cache`). Three processes compile fastat's step: bf16 then fp16 on one cache
folder, and fp16 on a fresh one; the second's losses must be the third's. On torch >= 2.14 this checks
that upstream's fix holds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

CHILD = """
import json, sys, torch
from fastat.at.objective import ATObjective
from fastat.at.schedule import NoiseSchedule
from fastat.models import MLP
from fastat.step.engine import StepEngine

torch.set_num_threads(1)
torch.manual_seed(0)
obj = ATObjective(schedule=NoiseSchedule(T=100), mode="ddpm")  # one compiled graph: the model's
eng = StepEngine(MLP(3, hidden=32, depth=2, time_dim=16), obj, generator=torch.Generator().manual_seed(1),
                 lr=1e-3, precision=sys.argv[1], fast=True, log=lambda s: print(s, file=sys.stderr))
x = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))
print(json.dumps({"mode": eng.mode, "losses": [float(eng.step(x, 1e-3)["loss"]) for _ in range(2)]}))
"""


def start(precision: str, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("TORCHINDUCTOR_AUTOGRAD_CACHE", None)  # torch's default: on
    return subprocess.Popen([sys.executable, "-c", CHILD, precision], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err[-3000:]
    r = json.loads(out.strip().splitlines()[-1])
    assert r["mode"] == "compiled", err[-3000:]  # no fallback to the eager step
    return r


@pytest.mark.slow
def test_fp16_after_bf16_on_one_compile_cache_computes_fp16(tmp_path):
    shared, fresh = tmp_path / "shared", tmp_path / "fresh"
    bf16, fp16_fresh = start("bf16", shared), start("fp16", fresh)  # two independent compiles at once
    bf16, fp16_fresh = result(bf16), result(fp16_fresh)
    fp16_shared = result(start("fp16", shared))  # finds bf16's graphs in the cache
    assert bf16["losses"] != fp16_fresh["losses"]  # the two precisions are told apart at all
    assert fp16_shared["losses"] == fp16_fresh["losses"], (fp16_shared, fp16_fresh, bf16)
