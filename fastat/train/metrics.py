"""Training statistics: device-side accumulators read once per interval, and where they are written.

    acc = StatsAccumulator()
    acc.add(out.stats)               # every step: device tensors added on the device, no host sync
    acc.add(out.stats, weight=ok)    # ... or counted only where the 0-dim device tensor ok is 1
    means = acc.pop_means()          # every log interval: one transfer for all statistics
    log = MetricsLog(run_dir)        # RUN/metrics.jsonl (+ TensorBoard when installed, or W&B: logger=)
    log.write(step, means)

``metrics.jsonl`` holds one JSON object per line: ``{"step": ..., "time": <unix seconds>, ...}``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from fastat.train.loggers import open_logger, png_array

__all__ = ["METRICS_FILE", "MetricsLog", "StatsAccumulator", "peak_rss_mb", "read_metrics"]

METRICS_FILE = "metrics.jsonl"


class StatsAccumulator:
    """Sums of 0-dim tensors per name, kept on their device until :meth:`pop_means`.

    Each :meth:`add` stacks its statistics into one vector (a handful of device ops per step, whatever
    the number of names). ``add(stats, weight=w)`` with a 0-dim device tensor ``w`` (0 or 1) counts the
    step only where ``w`` is 1: its values are dropped (not multiplied: NaN * 0 is NaN) where ``w`` is 0,
    e.g. for a step the engine skipped because its loss was not finite.
    """

    def __init__(self) -> None:
        # the names of one add -> [sums (vector), steps counted (int, or a 0-dim tensor with weights)]
        self._groups: dict[tuple[str, ...], list] = {}

    def add(self, stats: dict[str, torch.Tensor], weight: torch.Tensor | None = None) -> None:
        if not stats:
            return
        names = tuple(stats)
        v = torch.stack(list(stats.values())).detach().float()
        w: int | torch.Tensor = 1
        if weight is not None:
            w = weight.detach().float()
            v = torch.where(w > 0, v, 0.0)
        group = self._groups.get(names)
        if group is None:  # the first step of the interval (or a new set of names)
            self._groups[names] = [v, w.clone() if isinstance(w, torch.Tensor) else w]
            return
        group[0].add_(v)
        if isinstance(group[1], torch.Tensor):
            group[1].add_(w)
        else:
            group[1] = group[1] + w

    def pop_means(self, extra: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Means since the last call as Python floats, and the current values of the 0-dim tensors in
        ``extra``, in one device-to-host copy; then reset. A name whose steps all weighed 0 is NaN."""
        extra = extra or {}
        if not self._groups and not extra:
            return {}
        groups = list(self._groups.items())
        device = groups[0][1][0].device if groups else next(iter(extra.values())).device
        parts = [sums for _, (sums, _) in groups]
        parts += [c.reshape(1) for _, (_, c) in groups if isinstance(c, torch.Tensor)]
        parts += [v.detach().float().reshape(1).to(device) for v in extra.values()]
        values = iter(torch.cat(parts).cpu().tolist())
        sums = [[next(values) for _ in names] for names, _ in groups]
        counts = [next(values) if isinstance(c, torch.Tensor) else c for _, (_, c) in groups]
        total: dict[str, float] = {}
        steps: dict[str, float] = {}
        for (names, _), s, n in zip(groups, sums, counts, strict=True):
            for k, x in zip(names, s, strict=True):
                total[k], steps[k] = total.get(k, 0.0) + x, steps.get(k, 0) + n
        out = {k: total[k] / steps[k] if steps[k] else math.nan for k in total}
        out.update(zip(extra, values, strict=True))
        self._groups.clear()
        return out


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl`` and, if ``tensorboard`` and it is installed, to
    TensorBoard event files in ``run_dir/tb``."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,  # drop the records after this step (a resumed run)
        final: bool = False,  # ... and its evaluation records (the run resumes at its end: evaluated again)
        logger: str = "tensorboard",  # tensorboard | wandb | none (fastat.train.loggers)
        project: str = "fastat",  # wandb: the project
        config: dict | None = None,  # wandb: the run's config
    ):
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None:
            self._truncate_after(resume_step, evals=not final)
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        kind = "none" if logger == "tensorboard" and not tensorboard else logger
        try:
            self._logger = open_logger(kind, run_dir, resume_step=resume_step, project=project,
                                       config=config)  # fmt: skip
        except BaseException:
            self._file.close()
            raise

    def _truncate_after(self, step: int, evals: bool = True) -> None:
        """Drop records written after ``step`` by a run that died before its next checkpoint (and the
        evaluation records at ``step`` unless ``evals``)."""
        if not self.path.exists():
            return
        from fastat.train.checkpoint import atomic_write_text

        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                at = record.get("step", 0)
                if at < step or (at == step and (evals or record.get("kind") != "eval")):
                    kept.append(line)
            except (json.JSONDecodeError, AttributeError):
                continue
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def write(self, step: int, values: dict[str, float], *, kind: str = "train") -> dict:
        record = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
        record.update(
            {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in values.items()}
        )
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._logger is not None:
            number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
            self._logger.scalars(step, {f"{kind}/{k}": v for k, v in values.items() if number(v)})
        return record

    def image(self, step: int, tag: str, png: str | os.PathLike) -> None:
        """A PNG file as image ``tag`` at ``step`` (TensorBoard / W&B; nothing without a logger)."""
        if self._logger is not None:
            self._logger.image(step, tag, png_array(png))

    def close(self) -> None:
        self._file.close()
        if self._logger is not None:
            self._logger.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a ``metrics.jsonl`` file (or of ``RUN/metrics.jsonl`` given the run folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def peak_rss_mb() -> float:
    """The process's peak resident memory in MB (``VmHWM``; NaN where ``/proc`` has none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
