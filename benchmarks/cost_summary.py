"""The cost/robustness table of issue 14 from ``fastat eval compare`` results: per setting and variant, the
cost per step against DDPM's and what it keeps of ``adv``'s effect, paired by seed.

    python benchmarks/cost_summary.py runs/compare/compare.json [--goal-cost 1.5 --goal-share 0.8]

For each variant: ``units/img`` (forward-pass equivalents per image and step, :meth:`ATObjective.flop_units`)
and its ratio to DDPM's 3; the change against ``ddpm`` of the same seed of the mean distance to the clean
support, the sliced W2 and the distance after the trajectory attack (mean over seeds, relative to ddpm's
mean); and ``share of adv``: the variant's distance reduction over ``adv``'s, ``sum_seeds (ddpm - v) /
sum_seeds (ddpm - adv)``, with the per-seed range. ``goal`` marks a variant at most ``--goal-cost`` x
DDPM's cost per step that keeps at least ``--goal-share`` of adv's reduction in every setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

KEYS = (("dist_mean", "dist"), ("sw", "SW"), ("attack_dist_pgd_mean", "attacked"))


def _reduction(base: dict, runs: dict, seed: int) -> float:
    return base[seed]["metrics"]["dist_mean"] - runs[seed]["metrics"]["dist_mean"]


def summarise(data: dict, goal_cost: float, goal_share: float) -> tuple[list[str], dict[str, bool]]:
    recs = defaultdict(dict)  # (setting, variant) -> seed -> record
    for r in data["records"]:
        recs[(r["setting"], r["variant"])][r["seed"]] = r
    settings = list(dict.fromkeys(r["setting"] for r in data["records"]))
    variants = list(dict.fromkeys(r["variant"] for r in data["records"]))
    lines = [
        "| setting | variant | units/img | x DDPM | steps | dist vs ddpm | SW vs ddpm | attacked vs ddpm "
        "| share of adv's dist reduction (seeds) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    meets = {v: True for v in variants}
    for s in settings:
        base, adv = recs.get((s, "ddpm"), {}), recs.get((s, "adv"), {})
        for v in variants:
            runs = recs.get((s, v), {})
            seeds = sorted(set(runs) & set(base))
            if not seeds:
                continue
            units = runs[seeds[0]].get("flop_units")
            steps = runs[seeds[0]].get("steps")
            cells = []
            for key, _ in KEYS:
                b = sum(base[k]["metrics"][key] for k in seeds) / len(seeds)
                m = sum(runs[k]["metrics"][key] for k in seeds) / len(seeds)
                cells.append(f"{100 * (m - b) / b:+.0f}%")
            share = "—"
            if v != "ddpm" and adv and set(seeds) <= set(adv):
                gain_v = [_reduction(base, runs, k) for k in seeds]
                gain_adv = [_reduction(base, adv, k) for k in seeds]
                total = sum(gain_v) / sum(gain_adv)
                per = [g / a for g, a in zip(gain_v, gain_adv, strict=True)]
                share = f"{100 * total:.0f}% ({100 * min(per):.0f}-{100 * max(per):.0f}%)"
                cheap = units is not None and units / 3 <= goal_cost + 1e-9
                meets[v] = meets[v] and cheap and total >= goal_share
            else:
                meets[v] = False
            lines.append(
                (f"| {s} | {v} | {units:.3g} | {units / 3:.2f} | {steps} | " if units is not None
                 else f"| {s} | {v} | - | - | {steps} | ")
                + " | ".join(cells)
                + f" | {share} |"
            )
    return lines, meets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare_json", type=Path)
    ap.add_argument("--goal-cost", type=float, default=1.5, help="at most this x DDPM's units per step")
    ap.add_argument("--goal-share", type=float, default=0.8, help="at least this share of adv's reduction")
    args = ap.parse_args(argv)
    try:
        data = json.loads(args.compare_json.read_text())
        records = data["records"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"cost_summary: error: cannot read {args.compare_json} as compare.json: {e}", file=sys.stderr)
        return 2
    if not any("flop_units" in r for r in records):
        why = "no flop_units in the records (written before fastat eval compare had them)"
        print(f"{args.compare_json}: {why}", file=sys.stderr)
        return 2
    lines, meets = summarise(data, args.goal_cost, args.goal_share)
    print("\n".join(lines))
    ok = [v for v, m in meets.items() if m]
    print(f"\ngoal (<= {args.goal_cost}x DDPM per step, >= {args.goal_share:.0%} of adv's distance reduction "
          f"in every setting): {', '.join(ok) if ok else 'no variant'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
