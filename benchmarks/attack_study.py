"""Issue 20's table from a ``fastat eval compare`` output folder: per setting and variant, the distance
to the clean support and the sliced W2 (mean over seeds, paired change vs ddpm by seed) and the
training-time ``attack_eff`` (the last logged value: attack vs random w, per noise bucket).

    python benchmarks/attack_study.py OUT [--json FILE]     # OUT: the --out of fastat eval compare
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def load(out: Path) -> list[dict]:
    rows = []
    for rec_file in sorted(out.glob("runs/*/*/compare-run.json")):
        rec = json.loads(rec_file.read_text())["record"]
        log = [json.loads(line) for line in (rec_file.parent / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in log if r.get("kind") == "train" and "attack_eff" in r]
        eff = {k: v for k, v in train[-1].items() if k.startswith("attack_eff")} if train else {}
        m = rec["metrics"]
        rows.append({"setting": rec["setting"], "variant": rec["variant"], "seed": rec["seed"],
                     "dist": m["dist_mean"], "sw": m["sw"], "sw_proj": m.get("sw_proj"), **eff})  # fmt: skip
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| setting | variant | seeds | distance | vs ddpm (paired) | sliced W2 | vs ddpm (paired) | "
             "attack_eff (low..high noise) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for setting in sorted({r["setting"] for r in rows}):
        mine = [r for r in rows if r["setting"] == setting]
        base = {r["seed"]: r for r in mine if r["variant"] == "ddpm"}
        for variant in sorted(dict.fromkeys(r["variant"] for r in mine), key=lambda v: v != "ddpm"):  # ddpm first
            rs = [r for r in mine if r["variant"] == variant]

            def mean(key, rs=rs):
                return statistics.fmean(r[key] for r in rs)

            def paired(key, rs=rs, base=base, variant=variant):
                d = [r[key] / base[r["seed"]][key] - 1 for r in rs if r["seed"] in base]
                if not d or variant == "ddpm":
                    return "-"
                return f"{100 * statistics.fmean(d):+.0f}% ({sum(x < 0 for x in d)}/{len(d)} lower)"

            eff = "-"
            if all("attack_eff" in r for r in rs):
                buckets = sorted(k for k in rs[0] if k.startswith("attack_eff_b"))
                eff = f"{mean('attack_eff'):.2f} (" + " / ".join(f"{mean(b):.2f}" for b in buckets) + ")"
            lines.append(f"| {setting} | `{variant}` | {len(rs)} | {mean('dist'):.4f} | {paired('dist')} | "
                         f"{mean('sw'):.4f} | {paired('sw')} | {eff} |")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attack_study", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--json", type=Path, default=None, help="also write the per-run rows here")
    args = p.parse_args(argv)
    rows = load(args.out)
    if not rows:
        print(f"attack_study: error: no finished runs under {args.out}/runs", file=sys.stderr)
        return 2
    print("\n".join(table(rows)))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
