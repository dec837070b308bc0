"""One run of the comparison: train it (or find it finished) and evaluate it, as a :class:`RunRecord`.

A run folder whose ``compare-run.json`` has the same training overrides is reused: as it is when its
evaluation settings (and :data:`EVAL_VERSION`) match too, else re-evaluated without retraining.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from fastat.eval.compare.spec import CompareSpec, Setting
from fastat.eval.evaluate import EvalOptions, evaluate_run, final_evaluation
from fastat.eval.trajectory import AttackSpec

__all__ = ["EVAL_VERSION", "RUN_RECORD", "RunJob", "RunRecord", "eval_settings", "run_job"]

EVAL_VERSION = 4  # bump when the metrics change: finished runs are then re-evaluated, not retrained
RUN_RECORD = "compare-run.json"


@dataclass(frozen=True)
class RunRecord:
    """What one trained and evaluated run contributes to the comparison (a record of compare.json)."""

    setting: str
    variant: str
    seed: int
    run: str
    train_seconds: float
    sec_per_step: float
    steps: int
    metrics: dict
    flop_units: float | None = None  # per image and step
    flop_units_total: float | None = None  # per image slot of the batch: the budget
    eval_seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        keys = ("setting", "variant", "seed", "run", "train_seconds", "sec_per_step", "steps", "flop_units",
                "flop_units_total", "eval_seconds", "metrics")  # compare.json's order  # fmt: skip
        return {k: d[k] for k in keys}

    @classmethod
    def from_dict(cls, d: dict) -> RunRecord:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class RunJob:
    """One cell of the grid: ``setting`` x ``variant`` x ``seed``, trained into ``run_dir`` with
    ``threads`` torch threads (0: leave torch's)."""

    spec: CompareSpec
    setting: Setting
    variant: str
    seed: int
    run_dir: str
    threads: int = 1


def eval_settings(spec: CompareSpec) -> dict:
    """The evaluation settings of every run of ``spec`` (recorded in compare-run.json: a change
    re-evaluates)."""
    return dict(
        n=spec.eval_n,
        sampler=spec.sampler,
        steps=spec.sample_steps,
        eta=spec.eta,
        attack=spec.attack,
        attack_n=spec.attack_n,
        attack_at=list(spec.attack_at),
        attack_radius=spec.attack_radius,
        attack_steps=spec.attack_steps,
        attack_target=spec.attack_target,
    )


def eval_options(spec: CompareSpec, seed: int) -> EvalOptions:
    attack = None
    if spec.attack:
        attack = AttackSpec(n=spec.attack_n, at=tuple(spec.attack_at), radius=spec.attack_radius,
                            steps=spec.attack_steps, target=spec.attack_target)  # fmt: skip
    return EvalOptions(n=spec.eval_n, seed=seed, sampler=spec.sampler, steps=spec.sample_steps, eta=spec.eta,
                       attack=attack)  # fmt: skip


def _previous(run_dir: Path, over: dict) -> dict | None:
    """The run's compare-run.json when it trained with ``over`` and has a checkpoint, else None."""
    from fastat.train.checkpoint import latest_checkpoint

    try:
        prev = json.loads((run_dir / RUN_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if prev.get("overrides") != over or latest_checkpoint(run_dir) is None:
        return None
    return prev


def run_job(job: RunJob) -> RunRecord:
    """Train and evaluate one run (in a worker process or in this one)."""
    from fastat.train.checkpoint import atomic_write_text
    from fastat.train.config import TrainConfig
    from fastat.train.run import train

    spec = job.spec
    if job.threads:
        torch.set_num_threads(job.threads)
    run_dir = Path(job.run_dir)
    over = spec.run_overrides(job.setting, job.variant, job.seed, run_dir)
    want = {**eval_settings(spec), "version": EVAL_VERSION}
    prev = _previous(run_dir, over)
    if prev is not None and prev.get("eval") == want:
        return RunRecord.from_dict(prev["record"])
    if prev is None:
        if run_dir.exists():  # stale or incomplete: start over
            import shutil

            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        result = train(TrainConfig().with_overrides(over), progress=False, final_eval=final_evaluation)
        train_s, steps = time.perf_counter() - t0, result.step
    else:
        train_s, steps = prev["record"]["train_seconds"], over["run.steps"]
    units = spec.flop_units(over)
    t1 = time.perf_counter()
    ev = evaluate_run(run_dir, eval_options(spec, job.seed), device="cpu")
    record = RunRecord(
        setting=job.setting.name,
        variant=job.variant,
        seed=job.seed,
        run=str(run_dir),
        train_seconds=round(train_s, 2),
        sec_per_step=train_s / max(steps, 1),
        steps=steps,
        flop_units=units,
        flop_units_total=units * steps,
        eval_seconds=round(time.perf_counter() - t1, 2),
        metrics=ev["metrics"],
    )
    atomic_write_text(
        run_dir / RUN_RECORD, json.dumps({"overrides": over, "eval": want, "record": record.to_dict()})
    )
    return record
