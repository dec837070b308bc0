"""``fastat bench data DIR``: loader throughput of a prepared set in each placement, and peak RSS.

    fastat bench data data/celeba64 --batch-size 256 --seconds 10
    fastat bench data data/lsun256 --placement stream --workers 4 --json loader.json

For each placement the trainer's loader (:func:`fastat.data.image_loader`) hands out shuffled uint8
batches for ``--seconds`` after ``--warmup`` batches: img/s and MB/s, and separately
``transform_img_per_s`` of the step's own conversion (:class:`fastat.data.ImageTransform`). RSS before the
loader and at its peak (reset between placements through ``/proc/self/clear_refs``). ``--warm`` (default)
reads the set once first: figures "from the page cache". Details: docs/DESIGN.md ("Benchmarks").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

__all__ = ["bench_loader", "main"]


def _status_mb(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def bench_loader(images, placement: str, *, batch_size: int, device: torch.device, seconds: float,
                 warmup: int = 5, workers: int = 2, prefetch: int = 4, seed: int = 0) -> dict:  # fmt: skip
    """Throughput and memory of one placement (see the module docstring)."""
    from fastat.data import image_loader
    from fastat.train.metrics import peak_rss_mb

    peak_reset = _reset_peak()
    rss0 = _status_mb("VmRSS")
    loader = image_loader(images, batch_size, seed=seed, device=device, placement=placement, flip=True,
                          workers=workers, prefetch=prefetch)  # fmt: skip
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda d: None)
    try:
        for _ in range(warmup):
            batch = loader.next_batch()
        sync(device)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            batch = loader.next_batch()
            n += 1
        sync(device)
        dt = time.perf_counter() - t0
        batch = type(batch)(*(t.clone() for t in batch))  # the loader may refill its buffers
        m, t1 = 0, time.perf_counter()
        while time.perf_counter() - t1 < min(seconds, 2.0) or m < 2:
            loader.transform(batch)
            m += 1
        sync(device)
        transform_rate = m * batch_size / (time.perf_counter() - t1)
    finally:
        loader.close()
    img = n * batch_size
    return {
        "placement": loader.placement,
        "img_per_s": round(img / dt, 1),
        "MB_per_s": round(img * images.shape[0] * images.shape[1] * images.shape[2] / dt / 1e6, 1),
        "transform_img_per_s": round(transform_rate, 1),
        "batches": n,
        "seconds": round(dt, 2),
        "rss_before_mb": round(rss0),
        "rss_peak_mb": round(peak_rss_mb()) if peak_reset else None,
        "rss_end_mb": round(_status_mb("VmRSS")),
    }


def main(argv=None, prog: str = "fastat bench data", parser_class=argparse.ArgumentParser) -> int:
    from fastat.data import DatasetError, PreparedImages

    ap = parser_class(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", metavar="DIR", help="a prepared dataset (fastat prepare)")
    ap.add_argument("--placement", choices=("both", "device", "stream"), default="both")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per placement (default 10)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed batches first (default 5)")
    ap.add_argument("--workers", type=int, default=2, help="stream loader threads (default 2)")
    ap.add_argument("--prefetch", type=int, default=4, help="stream: batches read ahead (default 4)")
    ap.add_argument(
        "--warm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read the whole set once first: measure from the page cache (default on)",
    )
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    for name in ("batch_size", "workers", "prefetch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.seconds > 0 or args.warmup < 0:
        ap.error("--seconds must be > 0 and --warmup >= 0")
    if args.json:
        from fastat.train.checkpoint import atomic_write_text

        try:  # check the path before the benchmark runs, not after
            atomic_write_text(args.json, "{}\n")
        except OSError as e:
            ap.error(f"cannot write --json {args.json}: {e.strerror or e}")
    from fastat.train.run import resolve_device

    device = resolve_device(args.device)
    images = PreparedImages.open(args.dir)
    if args.batch_size > len(images):
        raise DatasetError(f"--batch-size {args.batch_size} is larger than the set ({len(images)} images)")
    if args.warm:
        for _ in images.blocks(max(1, (64 << 20) // images.row_bytes)):
            pass
    head = {
        "dir": str(images.root),
        "count": len(images),
        "shape": list(images.shape),
        "set_gb": round(images.nbytes / 1e9, 3),
        "batch_size": args.batch_size,
        "device": str(device),
        "workers": args.workers,
        "prefetch": args.prefetch,
        "warm": args.warm,
        "cpus": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"{images.root}: {len(images)} images {tuple(images.shape)} = {head['set_gb']} GB; {device}; "
          f"batch {args.batch_size}; load {head['load_avg']}", file=sys.stderr)  # fmt: skip
    results = []
    for placement in ("device", "stream") if args.placement == "both" else (args.placement,):
        r = bench_loader(images, placement, batch_size=args.batch_size, device=device, seconds=args.seconds,
                         warmup=args.warmup, workers=args.workers, prefetch=args.prefetch)  # fmt: skip
        results.append(r)
        print(f"  {r['placement']:<7} {r['img_per_s']:>12,.0f} img/s {r['MB_per_s']:>9,.1f} MB/s   "
              f"RSS before {r['rss_before_mb']} MB, peak {r['rss_peak_mb']} MB   "
              f"(in-step transform on {device}: {r['transform_img_per_s']:,.0f} img/s)")  # fmt: skip
    if args.json:
        from fastat.train.checkpoint import atomic_write_text

        atomic_write_text(args.json, json.dumps({**head, "results": results}, indent=2) + "\n")
    return 0
