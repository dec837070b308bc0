"""Which storage for prepared image sets? Random-batch read throughput and resident memory of
fastat's .npy shards read with ``preadv`` against the alternatives the large-dataset issue names.

    python benchmarks/bench_storage.py --size 32 --n 100000 --dir /tmp/storage-bench
    python benchmarks/bench_storage.py --size 256 --n 4000 --dir /tmp/storage-bench

Each contender reads shuffled batches of ``--batch`` uint8 ``(3, S, S)`` images of one synthetic set
that sits in the page cache (one untimed warm pass first), for ``--seconds``:

- ``npy-pread``: fastat's reader (:class:`fastat.data.PreparedImages`), in the calling thread;
- ``npy-mmap``: the same shards memory-mapped (``np.load(mmap_mode="r")``), batches by fancy indexing;
- ``litdata`` (if installed): ``litdata.optimize`` chunks, ``StreamingDataset`` + ``StreamingDataLoader``;
- ``mosaic`` (if installed): ``streaming.MDSWriter`` shards, ``streaming.StreamingDataset`` + DataLoader.

The two libraries run their own loaders with ``--workers`` persistent worker processes (their intended
use; started once, in the untimed pass).
Prints img/s, MB/s and the peak RSS of the process (and of its workers) as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_children_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def make_npy(root: Path, n: int, size: int) -> None:
    """A synthetic prepared set (random pixels) written by fastat's own shard writer and manifest."""
    from fastat.data.preparation import _ShardWriter, _write_json
    from fastat.data.prepared import FORMAT, MANIFEST, VERSION, set_checksum

    if (root / MANIFEST).is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    shape = (3, size, size)
    shard_size = max(1, (1 << 30) // int(np.prod(shape)))
    rng = np.random.default_rng(0)
    shards, i = [], 0
    while i < n:
        w = _ShardWriter(root, len(shards), shard_size, shape)
        while w.count < min(shard_size, n - i):
            k = min(4096, shard_size - w.count, n - i - w.count)
            w.write(rng.integers(0, 256, (k, *shape), dtype=np.uint8))
        i += w.count
        shards.append(w.finish())
    _write_json(root / MANIFEST, {
        "format": FORMAT, "version": VERSION, "count": n, "shape": list(shape), "dtype": "uint8",
        "image_size": size, "source": "synthetic", "source_digest": "", "shard_size": shard_size,
        "shards": shards, "checksum": set_checksum(shape, [s["blake2b"] for s in shards]),
    })  # fmt: skip


def timed(name: str, batches, batch: int, row: int, seconds: float) -> dict:
    it = iter(batches)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        try:
            x = next(it)
        except StopIteration:
            it = iter(batches)
            continue
        n += len(x)
    dt = time.perf_counter() - t0
    return {"storage": name, "img_per_s": round(n / dt), "MB_per_s": round(n * row / dt / 1e6, 1),
            "rss_mb": round(rss_mb()), "children_peak_rss_mb": round(peak_children_mb())}  # fmt: skip


def npy_pread(root: Path, batch: int):
    from fastat.data.prepared import PreparedImages

    ds = PreparedImages.open(root)
    out = torch.empty((batch, *ds.shape), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)

    def gen():
        perm = torch.randperm(len(ds), generator=g)
        for i in range(0, len(ds) - batch + 1, batch):
            yield ds.read_into(perm[i : i + batch], out)

    return gen


def npy_mmap(root: Path, batch: int):
    from fastat.data.prepared import read_manifest

    m = read_manifest(root)
    arrs = [np.load(root / s["file"], mmap_mode="r") for s in m["shards"]]
    k, n = m["shard_size"], m["count"]
    rng = np.random.default_rng(0)

    def gen():
        perm = rng.permutation(n)
        for i in range(0, n - batch + 1, batch):
            idx = perm[i : i + batch]
            yield np.stack([arrs[j // k][j % k] for j in idx])

    return gen


def _items(root: Path):
    from fastat.data.prepared import PreparedImages

    ds = PreparedImages.open(root)
    for _, block in ds.blocks(1024):
        yield from block.numpy()


def litdata_loader(root: Path, work: Path, batch: int, workers: int):
    import litdata as ld

    out = work / "litdata"
    if not (out / "index.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        arrs = list(_items(root))
        ld.optimize(fn=_ident, inputs=arrs, output_dir=str(out), chunk_bytes="64MB", num_workers=1)
    ds = ld.StreamingDataset(str(out), shuffle=True)
    loader = ld.StreamingDataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True,
                                    persistent_workers=True)  # fmt: skip
    return lambda: iter(loader)


def _ident(x):
    return x


def mosaic_loader(root: Path, work: Path, batch: int, workers: int):
    from streaming import MDSWriter, StreamingDataset

    out = work / "mosaic"
    if not (out / "index.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        from fastat.data.prepared import PreparedImages

        shape = PreparedImages.open(root).shape
        col = f"ndarray:uint8:{','.join(map(str, shape))}"
        with MDSWriter(out=str(out), columns={"x": col}, size_limit="64mb") as w:
            for a in _items(root):
                w.write({"x": a})
    ds = StreamingDataset(local=str(out), shuffle=True, batch_size=batch)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True,
                                         persistent_workers=True)  # fmt: skip
    return lambda: (b["x"] for b in loader)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--dir", default="/tmp/fastat-storage-bench")
    p.add_argument("--only", default="npy-pread,npy-mmap,litdata,mosaic")
    a = p.parse_args()
    work = Path(a.dir) / f"s{a.size}-n{a.n}"
    root = work / "npy"
    make_npy(root, a.n, a.size)
    row = 3 * a.size * a.size
    print(json.dumps({"size": a.size, "n": a.n, "batch": a.batch, "set_mb": round(a.n * row / 1e6),
                      "load": os.getloadavg()}))  # fmt: skip
    makers = {
        "npy-pread": lambda: npy_pread(root, a.batch),
        "npy-mmap": lambda: npy_mmap(root, a.batch),
        "litdata": lambda: litdata_loader(root, work, a.batch, a.workers),
        "mosaic": lambda: mosaic_loader(root, work, a.batch, a.workers),
    }
    for name in a.only.split(","):
        try:
            batches = makers[name]()
        except ImportError as e:
            print(json.dumps({"storage": name, "skipped": f"not installed ({e.name})"}))
            continue
        for _ in batches():  # one untimed pass: page cache, worker start-up
            pass
        print(json.dumps(timed(name, _Epochs(batches), a.batch, row, a.seconds)), flush=True)


class _Epochs:
    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return iter(self.make())


if __name__ == "__main__":
    main()
