"""The short table at the end of ``benchmarks/gpu_check.sh``: what each stage did, the step benchmark and
the kernel bandwidths, and the issue's targets beside what was measured (``-`` where a stage did not get
that far). Reads ``$OUT/stages.jsonl``, ``$OUT/kernels.json``, ``$OUT/bench_b*.json``; writes
``$OUT/summary.json``.

    python benchmarks/gpu_summary.py benchmarks/out
"""

from __future__ import annotations

import json
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


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def measured(out: Path) -> dict:
    """The target quantities found in ``out`` (None where not measured)."""
    m: dict = {k: None for k, *_ in TARGETS}
    for batch in (128, 32):
        for r in _load(out / f"bench_b{batch}.json") or []:
            if r["setting"]["batch_size"] != batch:
                continue
            m[f"speedup_b{batch}"] = r.get("speedup_vs_naive")
            if batch == 128:
                m["speedup_compiled_b128"] = r.get("speedup_vs_naive_compiled")
                m["at_overhead_b128"] = r.get("at_overhead")
                m["mfu_b128"] = (r["runs"].get("fastat") or {}).get("mfu")
    kernels = _load(out / "kernels.json") or {}
    rows = kernels.get("rows", [])
    fracs = [row["frac_of_copy"] for row in rows if row["size"] == "lsun256" and "frac_of_copy" in row]
    m["kernel_frac_of_copy_lsun256"] = min(fracs) if fracs else None
    return m


def summary(out: Path) -> tuple[str, dict]:
    lines = [f"{'stage':<16}{'status':<10}{'seconds':>9}{'limit':>7}  last line"]
    log = out / "stages.jsonl"
    stages = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
    for s in stages:
        status = "TIMEOUT" if s.get("timed_out") else ("ok" if s["rc"] == 0 else f"rc={s['rc']}")
        last = s.get("last", "")[:70]
        lines.append(f"{s['stage']:<16}{status:<10}{s['seconds']:>9.1f}{s['limit_s']:>7}  {last}")
    lines.append("")
    for batch in (128, 32):
        for r in _load(out / f"bench_b{batch}.json") or []:
            for key, run in r["runs"].items():
                ms = f"{run['median_ms']:.2f}" if run.get("median_ms") else "-"
                mfu = f"{100 * run['mfu']:.0f}%" if run.get("mfu") is not None else "-"
                comp = f"{run['compile_s']:.0f}" if run.get("compile_s") is not None else "-"
                note = run.get("error") or ""
                head = f"B={batch:<4}{key:<15}{run['engine']:<16}{ms:>9} ms"
                lines.append(f"{head}  MFU {mfu:>4}  compile {comp:>4} s  {note}")
    lines.append("")
    m = measured(out)
    on_cpu = any(
        r["info"]["device"] == "cpu" for b in (128, 32) for r in _load(out / f"bench_b{b}.json") or []
    )
    if on_cpu:
        lines.append("a CPU run (SMOKE): the targets are for an H100/H200 and are not judged here")
    verdicts = {}
    for key, what, bound, op in TARGETS:
        v = m[key]
        ok = None if v is None or on_cpu else (v >= bound if op == ">=" else v <= bound)
        verdicts[key] = {"measured": v, "target": f"{op} {bound}", "met": ok}
        shown = "-" if v is None else f"{v:.2f}"
        verdict = "-" if ok is None else ("met" if ok else "MISSED")
        lines.append(f"{what:<44}{shown:>7}  target {op} {bound:<5} {verdict}")
    return "\n".join(lines), {"stages": stages, "targets": verdicts}


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "benchmarks/out")
    text, data = summary(out)
    (out / "summary.json").write_text(json.dumps(data, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
