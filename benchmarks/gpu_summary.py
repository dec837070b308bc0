"""The short table at the end of ``benchmarks/gpu_check.sh``: what each stage did, the step benchmark, the
loader and the issue's targets beside what was measured (``-`` where a stage did not get that far).

Reads ``$OUT/stages.jsonl``, ``$OUT/kernels.json``, every ``$OUT/bench_*.json`` (runs of one batch size
from several files are put together: the ratios are computed here, from the medians) and
``$OUT/loader.json``; writes ``$OUT/summary.json`` (the stages, the targets and the table). With
``--merge`` every result file is folded into ``summary.json`` under ``results`` and removed, so that the
folder holds three files (the device tool returns at most eight). A check stage passes only when
pytest's closing line says that its tests ran and passed (all skipped is no pass), and counts as a CUDA
check only where the info stage saw a CUDA device; on a GPU a check that ran no test exits 1.

    python benchmarks/gpu_summary.py benchmarks/out [--merge]
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

# (name, what is measured, bound, ">=" or "<=")
TARGETS = [
    ("speedup_b128", "fastat / naive eager, B=128", 2.5, ">="),
    ("speedup_b32", "fastat / naive eager, B=32", 4.0, ">="),
    ("speedup_compiled_b128", "fastat / naive+torch.compile, B=128", 1.5, ">="),
    ("at_overhead_b128", "AT step / fastat DDPM step, B=128", 2.7, "<="),
    ("mfu_b128", "fastat model FLOP utilisation, B=128", 0.40, ">="),
    ("kernel_frac_of_copy_lsun256", "worst fused kernel / copy bandwidth, LSUN-256", 0.85, ">="),
]
CHECKS = ("kernel_cases", "engine_cuda", "nccl")  # the stages that prove the CUDA path
# pytest's closing line: "1 failed, 67 passed, 2 warnings in 20.30s (0:00:20)", "no tests ran in 0.01s"
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?|rerun)")
_CLOSING = re.compile(rf"^=*\s*(no tests ran|{_COUNT.pattern}(, {_COUNT.pattern})*) in \d[\d.]*s\b")


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def result_files(out: Path) -> list[Path]:
    """The files the stages write (everything but the logs and the summary itself)."""
    names = ["kernels.json", "loader.json"]
    return [out / n for n in names if (out / n).exists()] + sorted(out.glob("bench_*.json"))


def bench_runs(out: Path) -> dict[int, dict]:
    """``{batch size: {"runs": {key: run}, "device": ...}}`` over every ``bench_*.json`` in ``out``."""
    by_batch: dict[int, dict] = {}
    for path in sorted(out.glob("bench_*.json")):
        for r in _load(path) or []:
            b = by_batch.setdefault(r["setting"]["batch_size"], {"runs": {}, "device": r["info"]["device"]})
            b["runs"].update(r["runs"])
    return by_batch


def _ratio(runs: dict, a: str, b: str):
    ma, mb = (runs.get(k, {}).get("median_ms") for k in (a, b))
    return ma / mb if ma and mb else None


def measured(out: Path) -> dict:
    """The target quantities found in ``out`` (None where not measured)."""
    m: dict = {k: None for k, *_ in TARGETS}
    runs = {b: v["runs"] for b, v in bench_runs(out).items()}
    for batch in (128, 32):
        m[f"speedup_b{batch}"] = _ratio(runs.get(batch, {}), "naive", "fastat")
    r128 = runs.get(128, {})
    m["speedup_compiled_b128"] = _ratio(r128, "naive_compiled", "fastat")
    m["at_overhead_b128"] = _ratio(r128, "fastat", "fastat_ddpm")
    m["mfu_b128"] = (r128.get("fastat") or {}).get("mfu")
    kernels = _load(out / "kernels.json") or {}
    rows = [r for r in kernels.get("rows", []) if r["size"] == "lsun256" and "frac_of_copy" in r]
    fracs = [r["frac_of_copy"] for r in rows if r.get("fastat_kernels_only", True)]
    m["kernel_frac_of_copy_lsun256"] = min(fracs) if fracs else None
    return m


def pytest_counts(line: str) -> dict[str, int] | None:
    """``{"passed": 67, "failed": 1, ...}`` from pytest's closing line (``{}``: no tests ran); None if
    ``line`` is not one."""
    if not _CLOSING.match(line or ""):
        return None
    return {word.rstrip("s") if word.startswith(("error", "warning")) else word: int(n)
            for n, word in _COUNT.findall(line.split(" in ")[0])}  # fmt: skip


def check_passed(stage: dict) -> bool:
    """A check stage passed when it exited 0 and its tests ran and passed: at least one passed, none
    failed or errored (all skipped or deselected, e.g. without CUDA, is not a pass)."""
    counts = pytest_counts(stage.get("tests", ""))
    bad = counts is None or counts.get("failed", 0) or counts.get("error", 0)
    return stage["rc"] == 0 and not bad and counts.get("passed", 0) > 0


def _status(s: dict) -> str:
    if s.get("timed_out"):
        return "TIMEOUT"
    if s["rc"] != 0:
        return f"rc={s['rc']}"
    return "no tests" if s["stage"] in CHECKS and not check_passed(s) else "ok"


def summary(out: Path) -> tuple[str, dict]:
    lines = [f"{'stage':<16}{'status':<10}{'seconds':>9}{'limit':>7}  last line"]
    log = out / "stages.jsonl"
    stages = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
    for s in stages:
        last = (s.get("note", "") + ": " if s.get("note") else "") + s.get("tests", s.get("last", ""))
        lines.append(f"{s['stage']:<16}{_status(s):<10}{s['seconds']:>9.1f}{s['limit_s']:>7}  {last[:90]}")
    stopped = [s["note"] for s in stages if s.get("note", "").startswith("STOPPED")]
    lines += stopped
    lines.append("")
    benches = bench_runs(out)
    for batch, b in sorted(benches.items(), reverse=True):
        for key, run in b["runs"].items():
            ms = f"{run['median_ms']:.2f}" if run.get("median_ms") else "-"
            mfu = f"{100 * run['mfu']:.0f}%" if run.get("mfu") is not None else "-"
            comp = f"{run['compile_s']:.0f}" if run.get("compile_s") is not None else "-"
            note = run.get("error") or ""
            head = f"B={batch:<4}{key:<15}{run['engine']:<16}{ms:>9} ms"
            lines.append(f"{head}  MFU {mfu:>4}  compile {comp:>4} s  {note}")
    if any(s["stage"].startswith("warm_") for s in stages):
        lines.append("(compile s: the first step, with the graphs the warm_* stages compiled in the caches)")
    loader = _load(out / "loader.json") or {}
    for r in loader.get("results", []):
        lines.append(f"loader {r['placement']:<8}{r['img_per_s']:>12,.0f} img/s  "
                     f"RSS peak {r['rss_peak_mb']} MB "
                     f"({loader.get('count')} images {loader.get('shape')})")  # fmt: skip
    lines.append("")
    m = measured(out)
    on_cpu = any(b["device"] == "cpu" for b in benches.values())
    if on_cpu:
        lines.append("a CPU run (SMOKE): the targets are for an H100/H200 and are not judged here")
    verdicts = {}
    for key, what, bound, op in TARGETS:
        v = m[key]
        ok = None if v is None or on_cpu else (v >= bound if op == ">=" else v <= bound)
        verdicts[key] = {"measured": v, "target": f"{op} {bound}", "met": ok}
        shown = "-" if v is None else f"{v:.2f}"
        verdict = "-" if ok is None else ("met" if ok else "MISSED")
        lines.append(f"{what:<48}{shown:>7}  target {op} {bound:<5} {verdict}")
    failed = [s["stage"] for s in stages if _status(s) != "ok" and not s["stage"].startswith("warm_")]
    # a check proves the CUDA path only where the info stage saw a CUDA device
    cuda = next((s.get("cuda") for s in stages if s["stage"] == "info"), None)
    proven = [c for c in CHECKS if cuda and any(s["stage"] == c and check_passed(s) for s in stages)]
    lines.append("")
    lines.append(f"CUDA checks passed: {', '.join(proven) or 'none'}{'' if cuda else ' (no CUDA device)'}; "
                 f"stages not ok: {', '.join(failed) or 'none'}")  # fmt: skip
    data = {"stages": stages, "targets": verdicts, "cuda": cuda, "cuda_checks_passed": proven}
    return "\n".join(lines), data


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    merge = "--merge" in args
    paths = [a for a in args if a != "--merge"]
    out = Path(paths[0] if paths else "benchmarks/out")
    text, data = summary(out)
    data["table"] = text.splitlines()
    files = result_files(out) if merge else []
    if merge:
        data["results"] = {p.name: _load(p) for p in files}
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, out / "summary.json")
    for p in files:  # folded into summary.json, which is written
        p.unlink()
    print(text)
    # on a GPU, a check that ran no test fails the run as a failed one does (its rc fails it already)
    ran_none = [s for s in data["stages"] if s["stage"] in CHECKS and s["rc"] == 0 and not check_passed(s)]
    return 1 if data["cuda"] and ran_none else 0


if __name__ == "__main__":
    sys.exit(main())
