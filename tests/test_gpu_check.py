"""benchmarks/gpu_check.sh fits one device call, and its closing table reads what the stages write.
(The script's plumbing end to end: ``SMOKE=1 bash benchmarks/gpu_check.sh`` on a CPU, ~3 minutes.)"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_summary  # noqa: E402


def stages():
    text = SCRIPT.read_text().replace("\\\n", " ")
    return [
        (m.group(1), int(m.group(2)), m.group(3))
        for m in re.finditer(r"^\s*stage (\w+) (\d+) (.*)$", text, re.M)
    ]


def test_stages_fit_one_call_in_order_of_importance():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    st = stages()
    names = [n for n, _, _ in st]
    assert names == [
        "install",
        "info",
        "kernel_cases",
        "engine_cuda",
        "kernels_bench",
        "step_b128",
        "step_b32",
        "loader",
    ]
    total = sum(limit for _, limit, _ in st)
    assert total + 2 * len(st) < 480, total  # the limits plus each one's kill grace: 8 minutes
    cmd = dict((n, c) for n, _, c in st)
    assert "--no-deps --no-build-isolation --disable-pip-version-check" in cmd["install"]
    assert " -x" not in cmd["kernel_cases"] + cmd["engine_cuda"]  # one failure must not hide the others
    assert all("--json" in cmd[n] for n in ("kernels_bench", "step_b128", "step_b32"))
    assert "--batch-size 128" in cmd["step_b128"] and "naive_compiled" in cmd["step_b128"]
    assert "test_train_images.py" in cmd["engine_cuda"] and "test_placement.py" in cmd["engine_cuda"]


def _bench_json(tmp_path, batch, speedup, **extra):
    from fastat.bench import BenchSetting, run_bench

    r = run_bench(BenchSetting(model="tiny", image_size=8, batch_size=2, steps=1, warmup=1, device="cpu"),
                  fast=False, log=lambda s: None, runs=("naive", "fastat"))  # fmt: skip
    r["setting"]["batch_size"] = batch
    r["info"]["device"], r["info"]["gpu"] = "cuda:0", "NVIDIA H200"  # as a GPU run writes it
    r.update(speedup_vs_naive=speedup, **extra)
    (tmp_path / f"bench_b{batch}.json").write_text(json.dumps([r]))


def test_summary_judges_the_targets_from_the_stage_outputs(tmp_path):
    lines = [
        {"stage": "kernel_cases", "rc": 0, "seconds": 50.0, "limit_s": 85, "timed_out": False, "last": "ok"},
        {"stage": "step_b32", "rc": 124, "seconds": 45.2, "limit_s": 45, "timed_out": True, "last": ""},
    ]
    (tmp_path / "stages.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    _bench_json(tmp_path, 128, 3.1, speedup_vs_naive_compiled=1.2, at_overhead=2.5)
    kernels = {"rows": [{"size": "lsun256", "frac_of_copy": 0.9}, {"size": "lsun256", "frac_of_copy": 0.8},
                        {"size": "cifar10", "frac_of_copy": 0.1}]}  # fmt: skip
    (tmp_path / "kernels.json").write_text(json.dumps(kernels))
    text, data = gpu_summary.summary(tmp_path)
    t = data["targets"]
    assert t["speedup_b128"] == {"measured": 3.1, "target": ">= 2.5", "met": True}
    assert t["speedup_compiled_b128"]["met"] is False and t["at_overhead_b128"]["met"] is True
    assert t["kernel_frac_of_copy_lsun256"]["measured"] == pytest.approx(0.8)  # the worst kernel
    assert (
        t["speedup_b32"]["measured"] is None and t["speedup_b32"]["met"] is None
    )  # not measured: no verdict
    assert "TIMEOUT" in text and "MISSED" in text and "B=128 fastat" in text
    assert gpu_summary.main([str(tmp_path)]) == 0 and (tmp_path / "summary.json").exists()


def test_summary_of_an_empty_folder_says_nothing_was_measured(tmp_path):
    text, data = gpu_summary.summary(tmp_path)
    assert all(v["measured"] is None for v in data["targets"].values()) and "MISSED" not in text
