"""Real image sets in the trainer: the engine's ``prepare_batch`` hook (uint8 batches converted inside
the step, no host reads), ``fastat train --dataset`` on prepared sets / folders / both placements, and
exact mid-epoch resume for each placement."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastat.budget import Budget
from fastat.data import Batch, ImageTransform, IndexedCorruption
from fastat.engine import StepEngine
from fastat.objective import ATObjective
from fastat.schedule import NoiseSchedule

HOST_READS = ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal")


class Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


class ConvEps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * (1 + t.view(-1, 1, 1, 1).float() / 1000)


def _engine(prepare_batch=None, device="cpu", fast=False, seed=0):
    torch.manual_seed(seed)
    model = ConvEps().to(device)
    obj = ATObjective(schedule=NoiseSchedule(T=100), mode="adv", budget=Budget(r_min=0.1, r_scale=0.2))
    gen = torch.Generator(device).manual_seed(seed + 1)
    kw = dict(lr=1e-3, ema_decay=0.9, fast=fast, prepare_batch=prepare_batch)
    return StepEngine(model, obj, generator=gen, **kw)


def _batches(n, device="cpu", b=6):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        images = torch.randint(0, 256, (b, 3, 8, 8), generator=g, dtype=torch.uint8)
        out.append(Batch(images, torch.randint(0, 40, (b,), generator=g), torch.rand(b, generator=g) < 0.5))
    return [Batch(*(t.to(device) for t in x)) for x in out]


def test_prepare_batch_is_the_first_thing_the_step_does():
    transform = ImageTransform(IndexedCorruption.build(40, 0.5, 0.1, seed=1))
    xs = _batches(3)
    hooked, plain = _engine(transform), _engine()
    for i, x in enumerate(xs):
        a = hooked.step(x, lr=1e-3 * (i + 1))
        b = plain.step(transform(x), lr=1e-3 * (i + 1))
        assert torch.equal(a["loss"], b["loss"])
    for p, q in zip(hooked.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_image_transform_has_no_host_reads():
    transform = ImageTransform(IndexedCorruption.build(40, 0.5, 0.1, outliers=0.2, seed=1))
    with Recorder() as rec:
        transform(_batches(1)[0])
    assert rec.ops and not [op for op in rec.ops if op.split(".")[0] in HOST_READS], rec.ops


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_step_with_uint8_batches_matches_eager():
    transform = ImageTransform(IndexedCorruption.build(40, 0.5, 0.1, seed=1), device="cuda")
    xs = _batches(8, "cuda")
    eager, graphed = _engine(transform, "cuda"), _engine(transform, "cuda", fast=True)
    for i, x in enumerate(xs):
        a, b = eager.step(x, lr=1e-3), graphed.step(x, lr=1e-3)
        torch.testing.assert_close(b["loss"], a["loss"], atol=1e-4, rtol=1e-3, msg=f"step {i}")
    assert graphed.mode == "compiled+graph" and graphed._graph is not None
    assert graphed._static_x0.images.dtype == torch.uint8  # the static input keeps the loader's dtype
