"""The short table at the end of ``benchmarks/gpu_check.sh``: what each stage did, the step benchmark, the
loader and the issue's targets beside what was measured (``-`` where a stage did not get that far).

Reads ``$OUT/stages.jsonl``, ``$OUT/kernels.json``, every ``$OUT/bench_*.json`` (runs of one batch size
from several files are put together: the ratios are computed here, from the medians) and
``$OUT/loader.json``; writes ``$OUT/summary.json`` (the stages, the targets and the table). With
``--merge`` every result file is folded into ``summary.json`` under ``results`` and removed, so that the
folder holds three files (the device tool returns at most eight).

    python benchmarks/gpu_summary.py benchmarks/out [--merge]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# (name, what is measured, bound, ">=" or "<=")
TARGETS = [
    ("speedup_b128", "fastat / naive eager, B=128", 2.5, ">="),
    ("speedup_b32", "fastat / naive eager, B=32", 4.0, ">="),
    ("speedup_compiled_b128", "fastat / naive+torch.compile, B=128 (2nd call)", 1.5, ">="),
    ("at_overhead_b128", "AT step / fastat DDPM step, B=128", 2.7, "<="),
    ("mfu_b128", "fastat model FLOP utilisation, B=128", 0.40, ">="),
    ("kernel_frac_of_copy_lsun256", "worst fused kernel / copy bandwidth, LSUN-256", 0.85, ">="),
]
CHECKS = ("kernel_cases", "engine_cuda", "nccl")  # the stages that prove the CUDA path


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


def summary(out: Path) -> tuple[str, dict]:
    lines = [f"{'stage':<16}{'status':<10}{'seconds':>9}{'limit':>7}  last line"]
    log = out / "stages.jsonl"
    stages = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
    for s in stages:
        status = "TIMEOUT" if s.get("timed_out") else ("ok" if s["rc"] == 0 else f"rc={s['rc']}")
        last = (s.get("note", "") + ": " if s.get("note") else "") + s.get("last", "")
        lines.append(f"{s['stage']:<16}{status:<10}{s['seconds']:>9.1f}{s['limit_s']:>7}  {last[:90]}")
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
    failed = [s["stage"] for s in stages if s["rc"] != 0 and not s["stage"].startswith("warm_")]
    proven = [c for c in CHECKS if any(s["stage"] == c and s["rc"] == 0 for s in stages)]
    lines.append("")
    lines.append(f"CUDA checks passed: {', '.join(proven) or 'none'}; "
                 f"stages not ok: {', '.join(failed) or 'none'}")
    return "\n".join(lines), {"stages": stages, "targets": verdicts}


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
