import os

# Before torch starts its OpenMP threads: on a busy shared CPU, spinning workers (the default policy)
# made small steps 10-100x slower (test_run_bench_reports_all_runs: 124 s against 1 s). fastat's CLI
# sets the same default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

# Tolerances against a float64 reference: (atol, rtol) per input dtype. bf16 outputs are rounded to
# 8 mantissa bits, fp16 to 11, so their bound is set by that rounding (2^-8, 2^-11 relative), fp32 by
# accumulation error.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (3e-3, 2e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (1, 1), (3, 5), (2, 3, 7, 5), (4, 3, 16, 16), (5, 131)]


@pytest.fixture(autouse=True)
def _fastat_cache(tmp_path_factory, monkeypatch):
    """Image folders are prepared into a cache: never the user's (~/.cache/fastat) during tests."""
    monkeypatch.setenv("FASTAT_CACHE", str(tmp_path_factory.getbasetemp() / "fastat-cache"))


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models run fastest so on a loaded CPU (``usefixtures("one_thread")``)."""
    from train_helpers import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step points run with checkpoints at steps 2 and 4 (tests that change it copy it)."""
    from train_helpers import finished_points_run

    return finished_points_run(tmp_path_factory.mktemp("src") / "run")


def randn(shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def rand(shape, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)


def bshape(c, like):
    """A (B,) coefficient shaped to broadcast over ``like``."""
    return c.reshape(-1, *([1] * (like.dim() - 1)))


def pgd_ref(w, g, r, al, norm):
    w, g = w.double(), g.double()
    r, al = bshape(torch.as_tensor(r).double(), w), bshape(torch.as_tensor(al).double(), w)
    if norm == "linf":
        return torch.clamp(w + al * torch.sign(g), -r, r)
    gn = bshape(g.reshape(g.shape[0], -1).norm(dim=1), g)
    w = w + torch.where(gn > 0, al * g / gn, torch.zeros_like(g))
    wn = bshape(w.reshape(w.shape[0], -1).norm(dim=1), w)
    return torch.where(wn > r, w * r / wn, w)


def at_loss_formula(p, q, e, w, lam, detach_clean=False, dm_weight=1.0):
    p, q, e, w = (x.double() for x in (p, q, e, w))
    lam = bshape(torch.as_tensor(lam, dtype=torch.float64), p)
    c_dm = bshape(torch.as_tensor(dm_weight, dtype=torch.float64), p)
    c = p.detach() if detach_clean else p
    return (c_dm * (p - e) ** 2).sum() / p.numel() + (lam * (q - c - w) ** 2).sum() / p.numel()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
