"""benchmarks/gpu_check.sh fits one device call (the naive+compile row included), leaves at most
8 files, survives a stage that hangs or an install that fails, and its closing table reads what the
stages write. The plumbing runs here end to end on a scaled-down
plan with a stand-in ``python`` (real Python for the script's own helpers, instant fakes for the rest);
``SMOKE=1 bash benchmarks/gpu_check.sh`` runs the real commands at toy sizes on a CPU (~4 minutes)."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_summary  # noqa: E402

CALL_S = 480  # one device call of 8 minutes: the whole GPU check


def plan(name="gpu_check.sh", text=None):
    text = (ROOT / "benchmarks" / name).read_text() if text is None else text
    body = re.search(r"^PLAN=\((.*?)\)", text, re.M | re.S).group(1)
    return [(stage, int(limit)) for stage, limit in re.findall(r"(\w+):(\d+)", body)]


def stage_commands():
    text = "\n".join((ROOT / "benchmarks" / n).read_text() for n in ("gpu_check.sh", "gpu_stages.sh"))
    text = text.replace("\\\n", " ")
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s*(?:if ! )?stage (\w+) (.*)$", text, re.M)}


def test_plan_fits_one_call_and_every_planned_stage_runs():
    for script in ("gpu_check.sh", "gpu_stages.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)]).returncode == 0
    names = [n for n, _ in plan()]
    total = sum(limit for _, limit in plan())
    assert total + 2 * len(names) < CALL_S, total  # the limits plus each one's kill grace
    # the arithmetic written in the script is the plan's
    text = SCRIPT.read_text()
    said = re.search(r"limits (\d+) \+ a 2 s kill grace for each of the (\d+) stages += (\d+) < (\d+)", text)
    assert said and [int(x) for x in said.groups()] == [total, len(names), total + 2 * len(names), CALL_S]
    for line in re.findall(r"^#   ((?:\w+ \d+ \+ )*\w+ \d+) += +(\d+)", text, re.M):
        parts = dict((n, int(v)) for n, v in (x.split() for x in line[0].split(" + ")))
        assert all(dict(plan())[n] == v for n, v in parts.items()) and sum(parts.values()) == int(line[1])
    assert set(stage_commands()) == set(names)  # every planned stage runs, none unplanned
    assert "--no-deps --no-build-isolation --disable-pip-version-check" in stage_commands()["install"]
    # every file the stages write to $OUT, plus summary.json and its temporary: at most 8 (the device tool)
    text = " ".join((ROOT / "benchmarks" / n).read_text() for n in ("gpu_check.sh", "gpu_stages.sh"))
    written = set(re.findall(r"\$OUT/(\w+(?:\.\w+)*)", text))
    assert len(written | {"summary.json", "summary.json.tmp"}) <= 8, written


def test_plan_in_order_of_importance():
    names = [n for n, _ in plan()]
    assert names == ["install", "info", "kernel_cases", "engine_cuda", "nccl", "kernels_bench", "step_b128",
                     "step_b32", "loader"]  # fmt: skip
    limits = dict(plan())
    # room for cold compiles: the CUDA engine tests hold ~10 tiny-model compiles, the step benches two
    # UNet graphs per batch size and naive+compile one more (warmed in the background, see the script)
    assert limits["engine_cuda"] >= 100 and limits["step_b128"] >= 160 and limits["step_b32"] >= 40
    cmd = stage_commands()
    assert [n for n in cmd if n not in ("install", "info")] == names[2:]  # in the plan's order (the
    # install and info stages are in gpu_stages.sh's setup, which runs first)
    assert " -x" not in cmd["kernel_cases"] + cmd["engine_cuda"]  # one failure must not hide the others
    assert "tests/kernel_cases.py" in cmd["kernel_cases"]
    assert "test_train_images.py" in cmd["engine_cuda"] and "test_placement.py" in cmd["engine_cuda"]
    assert "tests/test_distributed.py -k cuda" in cmd["nccl"]
    assert all("--json" in cmd[n] for n in ("kernels_bench", "step_b128", "step_b32"))
    # naive and fastat first (the speed-up survives a timeout), then naive+compile, DDPM last
    step_b128 = " ".join(cmd["step_b128"].split())
    assert "--batch-size 128 --runs naive fastat naive_compiled fastat_ddpm --json" in step_b128


def test_warm_processes_compile_what_the_timed_stages_run():
    """The background compiles hit the timed stages' graphs only if they run the same settings."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    warm = re.search(r'"\$PY" -m fastat.app.bench "\$\{STEP\[@\]\}" --steps 1 --warmup 1 --batch-size', text)
    assert warm, "the warm processes run fastat.app.bench with the timed stages' STEP settings"
    warmed = set(re.findall(r"^warm warm_\w+ (\d+) (.*) &$", text, re.M))
    assert warmed == {("128", "fastat"), ("32", "fastat"), ("128", "naive_compiled")}
    cmd = stage_commands()
    for batch, run in warmed:
        stage = cmd["step_b128" if batch == "128" else "step_b32"]
        assert f"--batch-size {batch} " in stage and f" {run} " in stage
    stages = (ROOT / "benchmarks" / "gpu_stages.sh").read_text()
    assert "TORCHINDUCTOR_CACHE_DIR=" in stages  # shared
    assert "TORCHINDUCTOR_AUTOGRAD_CACHE=0" in stages  # torch < 2.14 mixes bf16 and fp16 graphs in it


STUB = r"""#!/usr/bin/env bash
# A stand-in python for gpu_check.sh: real Python for the script's helpers, instant fakes for the rest.
case "$1" in
  -|benchmarks/gpu_summary.py) exec "$REAL_PY" "$@" ;;
  -c) [[ "$2" == *"import fastat.kernels"* ]] && exit "${STUB_IMPORT_RC:-0}"
      [[ "$2" == *"cuda"* ]] && echo "cuda: ${STUB_CUDA:-NVIDIA H200}"; exit 0 ;;
  benchmarks/bench_kernels.py) echo '{"rows": []}' >"${@: -1}"; echo "kernel table"; exit 0 ;;
esac
args="$*"
[[ "$args" == *"-m pip"* ]] && { echo "pip says no"; exit "${STUB_PIP_RC:-0}"; }
[[ -n "${STUB_HANG:-}" && "$args" == *"$STUB_HANG"* ]] && exec sleep 60
if [[ "$args" == *"--json"* ]]; then
  out="${args##*--json }"; out="${out%% *}"
  if [[ "$args" == *"bench data"* ]]; then echo '{"results": []}' >"$out"; else echo '[]' >"$out"; fi
fi
[[ -n "${STUB_SKIPS:-}" && "$args" == *"$STUB_SKIPS"* ]] && { echo "9 skipped, 29 deselected in 0.1s"; exit; }
echo "3 passed in 0.01s"
"""


def run_script(tmp_path, scale_to, name="gpu_check.sh", **env):
    """The script on a plan whose every limit is ``scale_to`` seconds, with the stand-in python."""
    (tmp_path / "benchmarks").mkdir(parents=True)
    text = (ROOT / "benchmarks" / name).read_text()
    shrink = lambda m: "PLAN=(" + re.sub(r":\d+", f":{scale_to}", m.group(1)) + ")"  # noqa: E731
    scaled = re.sub(r"^PLAN=\((.*?)\)", shrink, text, flags=re.M | re.S)
    (tmp_path / "benchmarks" / name).write_text(scaled)
    for helper in ("gpu_summary.py", "gpu_stages.sh"):
        shutil.copy(ROOT / "benchmarks" / helper, tmp_path / "benchmarks")
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(stub), "REAL_PY": sys.executable, "OUT": str(out), **env}
    t0 = time.perf_counter()
    p = subprocess.run(["bash", str(tmp_path / "benchmarks" / name)], env=env, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    return p, out, time.perf_counter() - t0, sum(scale_to for _ in plan(text=scaled))


def test_a_hanging_stage_is_stopped_within_the_plan_and_the_rest_still_run(tmp_path):
    p, out, seconds, planned = run_script(tmp_path, 2, STUB_HANG="tests/test_engine.py")
    assert p.returncode == 1, p.stdout + p.stderr  # the hung stage fails the check
    stages = [json.loads(x) for x in (out / "stages.jsonl").read_text().splitlines()]
    by_name = {s["stage"]: s for s in stages}
    assert set(by_name) == {n for n, _ in plan()} | {"warm_b128", "warm_b32", "warm_c128"}
    hung = by_name["engine_cuda"]
    assert hung["timed_out"] and hung["effective_limit_s"] >= 2  # its limit and what the others left
    assert all(s["rc"] == 0 for n, s in by_name.items() if n != "engine_cuda"), stages
    assert seconds < planned + 15, (seconds, planned)  # the plan bounds the run
    # the device tool returns at most 8 files: after the summary, three, holding every result
    assert sorted(f.name for f in out.iterdir()) == ["logs.txt", "stages.jsonl", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"kernels.json", "loader.json", "bench_b128.json", "bench_b32.json"}
    table = "\n".join(summary["table"])
    assert "TIMEOUT" in table and "stages not ok: engine_cuda" in table and table in p.stdout
    assert "CUDA checks passed: kernel_cases, nccl;" in table and summary["cuda"] == "NVIDIA H200"
    assert "===== engine_cuda (rc=124) =====" in (out / "logs.txt").read_text()


def test_an_install_that_leaves_fastat_unimportable_stops_with_one_line(tmp_path):
    p, out, _, _ = run_script(tmp_path, 2, STUB_PIP_RC="1", STUB_IMPORT_RC="1")
    assert p.returncode == 1
    stages = [json.loads(x) for x in (out / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == ["install", "import_check"] and stages[0]["rc"] == 1
    assert "STOPPED: fastat.kernels cannot be imported" in p.stdout
    # pip failed but the source tree imports: the run goes on from it
    p2, out2, _, _ = run_script(tmp_path / "again", 1, STUB_PIP_RC="1")
    names = [json.loads(x)["stage"] for x in (out2 / "stages.jsonl").read_text().splitlines()]
    assert "import_check" not in names and "loader" in names and p2.returncode == 1


def _bench_json(tmp_path, batch, runs, name=None):
    from fastat.app.bench import BenchSetting, run_bench

    r = run_bench(BenchSetting(model="tiny", image_size=8, batch_size=2, steps=1, warmup=1, device="cpu"),
                  fast=False, log=lambda s: None, runs=("naive", "fastat"))  # fmt: skip
    r["setting"]["batch_size"] = batch
    r["info"]["device"], r["info"]["gpu"] = "cuda:0", "NVIDIA H200"  # as a GPU run writes it
    template = r["runs"]["fastat"]
    r["runs"] = {k: {**template, "median_ms": ms, "mfu": 0.3} for k, ms in runs.items()}
    (tmp_path / f"bench_b{name or batch}.json").write_text(json.dumps([r]))


def test_summary_judges_the_targets_from_the_stage_outputs(tmp_path):
    lines = [
        {"stage": "kernel_cases", "rc": 0, "seconds": 50.0, "limit_s": 85, "timed_out": False, "last": "ok"},
        {"stage": "step_b32", "rc": 124, "seconds": 45.2, "limit_s": 45, "timed_out": True, "last": ""},
    ]
    (tmp_path / "stages.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    _bench_json(tmp_path, 128, {"naive": 31.0, "fastat": 10.0, "fastat_ddpm": 4.0})
    _bench_json(tmp_path, 128, {"naive_compiled": 12.0}, name="128_compiled")  # another process's file
    kernels = {"rows": [{"size": "lsun256", "frac_of_copy": 0.9}, {"size": "lsun256", "frac_of_copy": 0.8},
                        {"size": "lsun256", "frac_of_copy": 0.5, "fastat_kernels_only": False},
                        {"size": "cifar10", "frac_of_copy": 0.1}]}  # fmt: skip
    (tmp_path / "kernels.json").write_text(json.dumps(kernels))
    text, data = gpu_summary.summary(tmp_path)
    t = data["targets"]
    assert t["speedup_b128"] == {"measured": pytest.approx(3.1), "target": ">= 2.5", "met": True}
    assert t["speedup_compiled_b128"]["measured"] == pytest.approx(1.2)  # from the two files' medians
    assert t["speedup_compiled_b128"]["met"] is False and t["at_overhead_b128"]["met"] is True
    assert t["kernel_frac_of_copy_lsun256"]["measured"] == pytest.approx(0.8)  # fastat's worst kernel
    assert t["speedup_b32"] == {"measured": None, "target": ">= 4.0", "met": None}  # not measured: no verdict
    assert "TIMEOUT" in text and "MISSED" in text and "B=128 fastat" in text
    assert gpu_summary.main([str(tmp_path), "--merge"]) == 0
    assert sorted(f.name for f in tmp_path.iterdir()) == ["stages.jsonl", "summary.json"]
    merged = json.loads((tmp_path / "summary.json").read_text())
    assert set(merged["results"]) == {"kernels.json", "bench_b128.json", "bench_b128_compiled.json"}


def test_summary_of_an_empty_folder_says_nothing_was_measured(tmp_path):
    text, data = gpu_summary.summary(tmp_path)
    assert all(v["measured"] is None for v in data["targets"].values()) and "MISSED" not in text


def test_a_check_passes_only_when_its_tests_ran_and_passed_on_cuda(tmp_path):
    """A check stage that exits 0 but skipped or deselected every test (no CUDA, a wrong -k) is no pass,
    and nothing run where the info stage saw no CUDA device is reported as a CUDA check passed."""
    assert gpu_summary.pytest_counts("1 failed, 67 passed, 2 warnings in 20.30s (0:00:20)") == {
        "failed": 1, "passed": 67, "warning": 2}  # fmt: skip
    assert gpu_summary.pytest_counts("no tests ran in 0.01s") == {}
    assert gpu_summary.pytest_counts("compiled 2 graphs in 3.1s") is None  # not pytest's line
    cases = [("150 passed in 80.6s", True), ("3 passed, 1 skipped in 2.0s", True),
             ("9 skipped, 29 deselected in 3.2s", False), ("no tests ran in 0.0s", False),
             ("1 failed, 5 passed in 2.0s", False), ("5 passed, 1 error in 2.0s", False)]  # fmt: skip
    for tests, passed in cases:
        assert gpu_summary.check_passed({"rc": 0, "tests": tests}) is passed, tests
    assert not gpu_summary.check_passed({"rc": 0, "last": "3 passed in 0.01s"})  # no closing line recorded
    # end to end: engine_cuda skips everything on a GPU: not passed, and the run fails
    p, out, _, _ = run_script(tmp_path / "gpu", 2, STUB_SKIPS="tests/test_engine.py")
    table = "\n".join(json.loads((out / "summary.json").read_text())["table"])
    assert "CUDA checks passed: kernel_cases, nccl;" in table and "stages not ok: engine_cuda" in table
    assert p.returncode == 1 and re.search(r"^engine_cuda +no tests .*9 skipped, 29 deselected", table, re.M)
    # a machine without CUDA: the same tests pass, and none is a CUDA check
    p, out, _, _ = run_script(tmp_path / "cpu", 2, STUB_CUDA="none")
    summary = json.loads((out / "summary.json").read_text())
    assert p.returncode == 0 and summary["cuda"] is None and summary["cuda_checks_passed"] == []
    assert "CUDA checks passed: none (no CUDA device)" in "\n".join(summary["table"])
