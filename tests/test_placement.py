"""The batch order (ranks, resume by samples), the two placements (same batches, exact resume), the
on-device transform against a float64 reference, indexed corruption, and ``fastat bench data``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastat.app.cli import main
from fastat.data import (
    Batch,
    DatasetError,
    EpochOrder,
    ImageTransform,
    IndexedCorruption,
    MemoryImages,
    PreparedImages,
    choose_placement,
    corrupt,
    image_loader,
)
from fastat.data.corrupt import hashed_bits
from fastat.data.placement import DeviceImages
from fastat.data.preparation import _ShardWriter, _write_json
from fastat.data.prepared import FORMAT, MANIFEST, VERSION, set_checksum

N, SHAPE = 53, (3, 6, 5)


def write_prepared(root, images: np.ndarray, shard_size: int) -> PreparedImages:
    """A prepared folder holding ``images`` exactly (the writer and manifest of fastat prepare)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(images), shard_size):
        w = _ShardWriter(root, len(shards), shard_size, images.shape[1:])
        w.write(images[s : s + shard_size])
        shards.append(w.finish())
    _write_json(root / MANIFEST, {
        "format": FORMAT, "version": VERSION, "count": len(images), "shape": list(images.shape[1:]),
        "dtype": "uint8", "image_size": images.shape[-1], "source": "test", "shard_size": shard_size,
        "shards": shards, "checksum": set_checksum(images.shape[1:], [s["blake2b"] for s in shards]),
    })  # fmt: skip
    return PreparedImages.open(root)


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).integers(0, 256, (N, *SHAPE), dtype=np.uint8)


@pytest.fixture
def prepared(tmp_path, pixels):
    return write_prepared(tmp_path / "set", pixels, shard_size=10)  # 6 shards, the last one short


# -- the order ------------------------------------------------------------------------------------------


def test_ranks_split_one_global_order():
    one = EpochOrder(N, 12, seed=5, flip=True)
    ranks = [EpochOrder(N, 12, seed=5, flip=True, rank=r, world_size=3) for r in range(3)]
    assert len(one) == 4 and one.local_batch_size == 12 and ranks[0].local_batch_size == 4
    for _ in range(12):  # three epochs
        idx, flips = one.next()
        parts = [o.next() for o in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), idx)
        assert torch.equal(torch.cat([p[1] for p in parts]), flips)
        assert len(set(torch.cat([p[0] for p in parts]).tolist())) == 12  # disjoint
    epoch = torch.cat([one.next()[0] for _ in range(4)])
    assert epoch.unique().numel() == 48  # one epoch: distinct samples, N % 12 = 5 sit it out
    with pytest.raises(ValueError, match="divisible by the world size"):
        EpochOrder(N, 10, seed=0, world_size=4)
    with pytest.raises(ValueError, match="rank 3 is not below"):
        EpochOrder(N, 12, seed=0, rank=3, world_size=3)


def test_order_resume_by_samples_across_world_sizes():
    ref = EpochOrder(N, 12, seed=1)
    stream = [ref.next()[0] for _ in range(9)]
    a = EpochOrder(N, 12, seed=1)
    for _ in range(6):
        a.next()
    state = a.state_dict()
    assert state["epoch"] == 1 and state["samples"] == 24 and state["position"] == 2
    halves = [EpochOrder(N, 12, seed=9, rank=r, world_size=2) for r in range(2)]
    assert all(h.load_state_dict(state, strict=False) is False for h in halves)  # another world size
    for want in stream[6:]:
        assert torch.equal(torch.cat([h.next()[0] for h in halves]), want)
    with pytest.raises(ValueError, match="world_size=1, this loader has 2"):
        EpochOrder(N, 12, seed=1, world_size=2).load_state_dict(state)
    old = {k: v for k, v in state.items() if k not in ("samples", "world_size")}  # fastat <= 0.1 states
    b = EpochOrder(N, 12, seed=1)
    assert b.load_state_dict(old) is True and torch.equal(b.next()[0], stream[6])
    with pytest.raises(ValueError, match="num_samples"):
        EpochOrder(N + 1, 12, seed=1).load_state_dict(state)


# -- the transform and the corruption ------------------------------------------------------------------------


def test_transform_matches_float64_reference(pixels):
    u8 = torch.from_numpy(pixels[:8])
    flip = torch.tensor([True, False, True, True, False, False, True, False])
    x = ImageTransform()(Batch(u8, torch.arange(8), flip))
    ref = u8.double() / 127.5 - 1
    ref = torch.where(flip.view(-1, 1, 1, 1), ref.flip(-1), ref)
    torch.testing.assert_close(x.double(), ref, atol=1e-6, rtol=0)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1


def test_indexed_corruption_groups_noise_and_fixedness():
    n, sigma = 400, 0.3
    c = IndexedCorruption.build(
        n, 0.75, sigma, outliers=0.1, outlier_kind="gaussian", outlier_scale=2.0, seed=4
    )
    ref = corrupt(torch.zeros(n, 2), 0.75, sigma, outliers=0.1, outlier_kind="gaussian", seed=4)
    assert torch.equal(c.noisy_mask, ref.noisy_mask) and torch.equal(c.outlier_mask, ref.outlier_mask)
    clean = torch.rand(n, 3, 8, 8) * 2 - 1
    idx = torch.randperm(n)
    y = c.apply(clean[idx], idx)
    d = (y - clean[idx]).flatten(1)
    noisy, out = c.noisy_mask[idx], c.outlier_mask[idx]
    assert torch.equal(d[~noisy & ~out], torch.zeros_like(d[~noisy & ~out]))
    assert abs(d[noisy].std().item() - sigma) < 0.01 and abs(d[noisy].mean().item()) < 0.01
    assert abs(d[out].std().item() - 2.0) < 0.1
    # the same sample gets the same noise in any batch, at any position
    again = c.apply(clean[:50], torch.arange(50))
    pos = torch.argsort(idx)[:50]
    assert torch.equal(again, y[pos])
    # splitmix64 bit for bit (wrapping int64 arithmetic), against Python integers
    mask = (1 << 64) - 1

    def sm(v, key):
        z = (key + (v + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        return z - (1 << 64) if z >> 63 else z

    vals = [0, 1, 7, 2**33 + 5, 2**50 - 3]
    assert hashed_bits(torch.tensor(vals), 123456789).tolist() == [sm(v, 123456789) for v in vals]


# -- the placements ---------------------------------------------------------------------------------------


def _collect(loader, k):
    out = []
    for _ in range(k):
        b = loader.next_batch()
        out.append(tuple(t.clone() for t in b) + (loader.transform(b).clone(),))
    return out


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("source", ["prepared", "memory"])
def test_placements_give_the_same_batches_and_resume_exactly(prepared, pixels, source, device):
    images = prepared if source == "prepared" else MemoryImages(torch.from_numpy(pixels))
    c = IndexedCorruption.build(N, 0.5, 0.2, seed=2)
    kw = dict(seed=3, device=device, flip=True, corruption=c, workers=2, prefetch=3)
    with (
        image_loader(images, 8, placement="device", **kw) as dev,
        image_loader(images, 8, placement="stream", **kw) as st,
    ):
        assert (dev.placement, st.placement) == ("device", "stream") and len(dev) == 6
        a, b = _collect(dev, 20), _collect(st, 20)  # 6 batches per epoch: crosses three epochs
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))
    first = a[0]
    assert first[0].device.type == device
    assert torch.equal(first[0].cpu(), torch.from_numpy(pixels)[first[1].cpu()])  # the listed samples' pixels
    for cut in (0, 5, 6, 13):
        for src, dst in (("device", "stream"), ("stream", "device"), ("stream", "stream")):
            with image_loader(images, 8, placement=src, **kw) as l1:
                _collect(l1, cut)
                state = l1.state_dict()
            torch.save(state, prepared.root.parent / "loader.pt")
            state = torch.load(prepared.root.parent / "loader.pt", weights_only=True)
            with image_loader(images, 8, placement=dst, **{**kw, "seed": 99}) as l2:
                assert l2.load_state_dict(state) is True
                rest = _collect(l2, 20 - cut)
            for x, y in zip(a[cut:], rest, strict=True):
                assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True)), (cut, src, dst)


@pytest.mark.parametrize("device", DEVICES)
def test_device_placement_loads_the_set_in_chunks(prepared, pixels, device):
    order = EpochOrder(N, 8, seed=0, device=device)
    loader = DeviceImages(prepared, order, ImageTransform(), torch.device(device), chunk_bytes=7 * 90)
    assert torch.equal(loader.data.cpu(), torch.from_numpy(pixels))  # 7 images per chunk, 8 chunks


def test_stream_reports_read_errors_as_dataset_errors(prepared):
    with image_loader(prepared, 8, seed=0, device="cpu", placement="stream") as st:
        st.next_batch()
        prepared._shards[3].path.write_bytes(b"")  # the file shrinks under a running loader
        with pytest.raises(DatasetError, match="ended early"):
            for _ in range(20):
                st.next_batch()


def test_short_reads_are_read_on_not_taken_for_a_corrupt_shard(prepared, pixels, monkeypatch):
    """A read may return fewer bytes than asked (network file systems): the rest is read on from there."""
    import os

    import fastat.data.prepared as prepared_mod

    real, sizes = os.preadv, []

    def short(fd, views, offset):  # at most 7 bytes per call
        (view,) = views
        sizes.append(len(view))
        return real(fd, [view[:7]], offset)

    monkeypatch.setattr(prepared_mod.os, "preadv", short)
    index = torch.tensor([5, 0, N - 1, 17])
    out = torch.empty((4, *prepared.shape), dtype=torch.uint8)
    prepared.read_into(index, out)
    assert torch.equal(out, torch.from_numpy(pixels[index.numpy()]))
    assert max(sizes) > 7 and len(sizes) > 4  # it asked for more and got it in several short reads


def test_choose_placement_budget_and_errors():
    cpu = torch.device("cpu")
    assert choose_placement("auto", 10, cpu, budget_bytes=100)[0] == "device"
    where, why = choose_placement("auto", 1000, cpu, budget_bytes=100)
    assert where == "stream" and "exceeds the budget" in why and "data.device_budget_gb" in why
    where, why = choose_placement("auto", 1000, cpu)
    assert where == "device" and "25% of the available RAM" in why
    assert choose_placement("stream", 10, cpu)[0] == "stream"
    with pytest.raises(DatasetError, match="does not fit"):
        choose_placement("device", 1 << 60, cpu)
    with pytest.raises(DatasetError, match="unknown data placement"):
        choose_placement("gpu", 1, cpu)


def test_bench_data_cli(prepared, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--batch-size", "8", "--seconds", "0.2", "--warmup", "1", "--json", str(out)]
    code = main(["bench", "data", str(prepared.root), *args])
    stdout, _ = capsys.readouterr()
    assert code == 0 and "device" in stdout and "stream" in stdout
    res = json.loads(out.read_text())
    assert [r["placement"] for r in res["results"]] == ["device", "stream"] and res["count"] == N
    assert all(r["img_per_s"] > 0 and r["batches"] > 0 for r in res["results"])
    code = main(["bench", "data", str(prepared.root), "--batch-size", "0"])
    assert code == 2 and "--batch-size must be >= 1" in capsys.readouterr().err
    code = main(["bench", "data", str(prepared.root), "--json", str(tmp_path / "no" / "such" / "x.json")])
    assert code == 2 and "cannot write --json" in capsys.readouterr().err
