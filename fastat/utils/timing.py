"""One timing harness for every benchmark: device-synchronised, warm-up excluded, median and quantiles.

On CUDA each repetition is bracketed by CUDA events (the host never waits inside the timed region);
on CPU by ``time.perf_counter``. Results in milliseconds. ``flush_l2=True`` (CUDA) writes a 256 MB buffer
before each repetition, outside the timed window, so that every call starts with a cold L2 cache (as
``triton.testing.do_bench`` does): the honest setting for memory-bound kernels, whose inputs would
otherwise stay in the 50-60 MB L2 of an H100/H200 between repetitions.

    t = time_fn(lambda: kernel(x), "cuda", warmup=20, reps=100, flush_l2=True)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    def as_dict(self) -> dict:
        return asdict(self)


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


L2_FLUSH_BYTES = 256 * 2**20


def time_fn(
    fn: Callable[[], object],
    device: torch.device | str,
    warmup: int = 10,
    reps: int = 50,
    flush_l2: bool = False,
) -> Timing:
    """Time ``fn()`` ``reps`` times after ``warmup`` calls (``flush_l2``: cold L2 for each, CUDA only)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends, strict=True):
            if flush is not None:
                flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), reps)


def count_cuda_launches(fn: Callable[[], object]) -> int:
    """Number of GPU kernels one call of ``fn`` launches (torch.profiler; CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def device_info(device: torch.device | str) -> dict:
    device = torch.device(device)
    info = {"torch": torch.__version__, "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
