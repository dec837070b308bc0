"""The comparison of SPEC section 4: DDPM vs adversarial training on corrupted known distributions.

    fastat eval compare                        # the default grid: <= 15 min on a 2-core CPU
    fastat eval compare --quick --out /tmp/c   # a < 1 min smoke run
    fastat eval compare --modes ddpm adv "free[replays=2]" --budget-units 3200   # an equal FLOP budget

For every setting (a known dataset with its corruption, :mod:`~.spec`) x variant x seed, the trainer
trains a small model on the same corrupted data and :func:`fastat.eval.known_metrics` measures its EMA
model (:mod:`~.run`); results are aggregated over seeds with the paired difference to ``ddpm``
(:mod:`~.report`) and written as ``compare.json``, ``compare.md`` and plots (:mod:`~.plots`). Finished
runs are reused, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fastat.eval.compare.plots import plot_setting, plot_summary
from fastat.eval.compare.report import SettingSummary, aggregate, markdown_table
from fastat.eval.compare.run import RunJob, RunRecord, run_job
from fastat.eval.compare.spec import (
    PRESETS,
    SETTINGS,
    CompareSpec,
    Setting,
    parse_variant,
    slug,
    spec_dict,
    spec_with,
)
from fastat.eval.format import json_safe

__all__ = [
    "PRESETS",
    "SETTINGS",
    "CompareResult",
    "CompareSpec",
    "RunRecord",
    "Setting",
    "SettingSummary",
    "aggregate",
    "markdown_table",
    "parse_variant",
    "run_compare",
    "spec_with",
]


@dataclass(frozen=True)
class CompareResult:
    """A finished comparison: its spec, the runs' records, the per-setting summaries, the table."""

    spec: CompareSpec
    records: list[RunRecord]
    summary: dict[str, SettingSummary]
    seconds: float
    table: str
    plot_seconds: float = 0.0

    def to_json(self) -> dict:
        return {"spec": spec_dict(self.spec), "records": [r.to_dict() for r in self.records],
                "summary": {s: b.to_json() for s, b in self.summary.items()}, "seconds": self.seconds,
                "table": self.table}  # fmt: skip


def run_compare(
    spec: CompareSpec,
    out: str | os.PathLike,
    *,
    workers: int = 1,
    threads: int = 1,
    plots: bool = True,
    log: Callable[[str], None] = print,
) -> CompareResult:
    """Run the grid of ``spec`` into ``out`` and write ``compare.json``, ``compare.md`` and plots.

    ``workers`` > 1 trains that many runs at once in separate processes; ``threads``: torch threads per
    run (1 is fastest for these small models on a shared CPU: more threads spin against each other).
    Returns a :class:`CompareResult` (``to_json()``: what compare.json holds).
    """
    for s in spec.settings:
        if s not in SETTINGS:
            raise ValueError(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    if "ddpm" not in spec.modes:
        log("note: no 'ddpm' variant in --modes: the table has no baseline to compare against")
    for v in spec.modes:
        parse_variant(v)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        RunJob(spec, SETTINGS[s], v, seed, str(out / "runs" / s / f"{slug(v)}-seed{seed}"), threads)
        for s in spec.settings
        for v in spec.modes
        for seed in spec.seeds
    ]
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    records: list[RunRecord] = []

    def done(rec: RunRecord) -> None:
        records.append(rec)
        m = rec.metrics
        log(
            f"[{len(records)}/{len(jobs)}] {rec.setting} {rec.variant} seed {rec.seed}: "
            f"dist {m['dist_mean']:.4f} (median {m['dist_median']:.4f}), SW {m['sw']:.4f}, "
            f"train {rec.train_seconds:.0f} s, eval {rec.eval_seconds:.0f} s"
        )

    try:
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
                futs = [ex.submit(run_job, j) for j in jobs]
                for f in as_completed(futs):
                    done(f.result())
        else:
            for j in jobs:
                done(run_job(j))
    finally:
        torch.set_num_threads(old_threads)
    records.sort(key=lambda r: (spec.settings.index(r.setting), spec.modes.index(r.variant), r.seed))
    summary = aggregate(records, spec)
    seconds = time.perf_counter() - t0
    table = markdown_table(summary, spec, seconds)
    result = CompareResult(spec, records, summary, round(seconds, 1), table)
    from fastat.train.checkpoint import atomic_write_text

    atomic_write_text(out / "compare.json", json.dumps(json_safe(result.to_json()), indent=2) + "\n")
    atomic_write_text(out / "compare.md", table)
    if plots:
        pdir = out / "plots"
        pdir.mkdir(exist_ok=True)
        written = [plot_summary(summary, spec, pdir / "summary.png")]
        for s in spec.settings:
            runs = {r.variant: r.run for r in records if r.setting == s and r.seed == spec.seeds[0]}
            written.append(plot_setting(SETTINGS[s], runs, pdir / f"{s}.png"))
        if not any(written):
            log("plots skipped: matplotlib is not installed (pip install matplotlib)")
    return replace(result, plot_seconds=round(time.perf_counter() - t0 - seconds, 1))
