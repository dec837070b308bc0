"""Training statistics: device-side accumulators read once per interval, and where they are written.

    acc = StatsAccumulator()
    acc.add(out.stats)               # every step: device tensors added on the device, no host sync
    acc.add(out.stats, weight=ok)    # ... or counted only where the 0-dim device tensor ok is 1
    means = acc.pop_means()          # every log interval: one transfer for all statistics
    log = MetricsLog(run_dir)        # RUN/metrics.jsonl (+ TensorBoard when installed)
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

__all__ = ["METRICS_FILE", "MetricsLog", "StatsAccumulator", "peak_rss_mb", "read_metrics"]

METRICS_FILE = "metrics.jsonl"


class StatsAccumulator:
    """Sums of 0-dim tensors per name, kept on their device until :meth:`pop_means`.

    ``add(stats, weight=w)`` with a 0-dim device tensor ``w`` (0 or 1) counts the step only where
    ``w`` is 1: its values are dropped (not multiplied: NaN * 0 is NaN) where ``w`` is 0, e.g. for a
    step the engine skipped because its loss was not finite.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int | torch.Tensor] = {}

    def add(self, stats: dict[str, torch.Tensor], weight: torch.Tensor | None = None) -> None:
        for k, v in stats.items():
            v = v.detach().float()
            if weight is None:
                w = 1
            else:
                w = weight.detach().float()
                v = torch.where(w > 0, v, torch.zeros_like(v))
            if k in self._sums:
                self._sums[k] += v
                self._counts[k] = self._counts[k] + w
            else:
                self._sums[k] = v.clone()
                self._counts[k] = w.clone() if isinstance(w, torch.Tensor) else w

    def __len__(self) -> int:
        """Steps added (of the names added without a weight)."""
        return max((c for c in self._counts.values() if isinstance(c, int)), default=0)

    def pop_means(self, extra: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Means since the last call as Python floats, and the current values of the 0-dim tensors in
        ``extra``, in one device-to-host copy; then reset. A name whose steps all weighed 0 is NaN."""
        extra = extra or {}
        if not self._sums and not extra:
            return {}
        keys = list(self._sums)
        weighted = [k for k in keys if isinstance(self._counts[k], torch.Tensor)]
        parts = [self._sums[k] for k in keys] + [self._counts[k] for k in weighted]
        parts += [v.detach().float().to(parts[0].device if parts else v.device) for v in extra.values()]
        values = torch.stack(parts).cpu().tolist()
        sums, values = values[: len(keys)], values[len(keys) :]
        counts = dict(zip(weighted, values[: len(weighted)], strict=True))
        out = {}
        for k, total in zip(keys, sums, strict=True):
            n = counts.get(k, self._counts[k])
            out[k] = total / n if n else math.nan
        out.update(zip(extra, values[len(weighted) :], strict=True))
        self._sums.clear()
        self._counts.clear()
        return out


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl`` and, if ``tensorboard`` and it is installed, to
    TensorBoard event files in ``run_dir/tb``."""

    def __init__(
        self, run_dir: str | os.PathLike, *, tensorboard: bool = True, resume_step: int | None = None
    ):
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: jsonl only
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step)

    def _truncate_after(self, step: int) -> None:
        """Drop records written after ``step`` by a run that died before its next checkpoint."""
        if not self.path.exists():
            return
        from fastat.checkpoint import atomic_write_text

        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
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
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
            self._tb.flush()
        return record

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

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
