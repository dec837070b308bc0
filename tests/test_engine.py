"""The step engine: the fast (compiled) step computes the same function as the eager reference step."""

import contextlib

import pytest
import torch
from torch import nn

from fastat.at.budget import Budget
from fastat.at.objective import ATObjective
from fastat.at.schedule import NoiseSchedule
from fastat.models import MLP
from fastat.step.ema import EMA
from fastat.step.engine import DetachedParams, StepEngine


def make(fast, mode="adv", seed=0, clip=1.0, **kw):
    torch.manual_seed(seed)
    model = MLP(3, hidden=32, depth=2, time_dim=16)
    obj = ATObjective(schedule=NoiseSchedule(T=100), mode=mode, budget=Budget(r_min=0.1, r_scale=0.2))
    gen = torch.Generator().manual_seed(seed + 1)
    logs = []
    eng = StepEngine(
        model, obj, generator=gen, lr=1e-3, clip=clip, ema_decay=0.9, fast=fast, log=logs.append, **kw
    )
    return eng, logs


def batches(n, seed=5, bad_at=(), bad=float("nan")):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(64, 3, generator=g) for _ in range(n)]
    for i in bad_at:
        xs[i][5, 2] = bad
    return xs


def run(eng, xs, first=0):
    """Steps on ``xs`` (the ``first``-th step of a run first: the learning rate depends on the index),
    passing None where the engine replays a kept batch (mode free)."""
    out = []
    for i, x in enumerate(xs, start=first):
        stats = eng.step(x if eng.wants_batch else None, lr=1e-3 * (i + 1) / 10)
        out.append({k: v.clone() for k, v in stats.items()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["adv", "free"])
def test_fast_step_matches_eager_step(mode):
    """free: the compiled model's backward gives the perturbed input's gradient (the next replay's w)."""
    xs = batches(5, bad_at=(3,) if mode == "adv" else (2,))  # skipped alike (free: and its replay)
    eager, _ = make(fast=False, mode=mode)
    fast, logs = make(fast=True, mode=mode)
    assert fast.mode == "compiled"
    s_e, s_f = run(eager, xs), run(fast, xs)
    assert not logs, logs  # no fallback happened
    skipped = [0, 0, 0, 1, 0] if mode == "adv" else [0, 0, 1, 1, 0]  # free: step 3 replays batch 2
    assert [float(s["skipped"]) for s in s_f] == skipped and fast.compile_seconds > 0
    if mode == "free":
        assert float(s_f[1]["gain"]) != 1.0 and float(s_f[4]["gain"]) == 1.0
    for a, b in zip(s_e, s_f, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, equal_nan=True, msg=k)
    for pe, pf in zip(eager.model.parameters(), fast.model.parameters(), strict=True):
        torch.testing.assert_close(pf, pe, atol=1e-5, rtol=1e-4)
    for pe, pf in zip(eager.ema.module.parameters(), fast.ema.module.parameters(), strict=True):
        torch.testing.assert_close(pf, pe, atol=1e-5, rtol=1e-4)
    # the training changed the weights (the comparison is not between two untouched models)
    fresh, _ = make(fast=False)
    assert any(
        not torch.allclose(p, q)
        for p, q in zip(fresh.model.parameters(), eager.model.parameters(), strict=True)
    )


def test_tables_are_on_the_device_before_the_first_step_and_the_step_builds_none():
    """Building a table in the step is a host-to-device copy on CUDA (a sync; a graph cannot hold it): the
    engine builds the schedule's and the dm_weight table when it is made, and the steps reuse them."""
    torch.manual_seed(0)
    sched = NoiseSchedule(T=100)
    weights = torch.linspace(0.5, 2.0, 100, dtype=torch.float64)
    obj = ATObjective(schedule=sched, mode="adv", dm_weight=weights, budget=Budget(r_min=0.1, r_scale=0.2))
    assert not sched._cache and not obj._dm_cache  # nothing built yet
    model = MLP(3, hidden=32, depth=2, time_dim=16)
    eng = StepEngine(model, obj, generator=torch.Generator().manual_seed(1), lr=1e-3, log=lambda s: None)
    cpu = torch.device("cpu")
    built = {k: dict(v) for k, v in sched._cache.items()}
    assert list(built) == [(cpu, torch.float32)] and list(obj._dm_cache) == [cpu]
    torch.testing.assert_close(obj._dm_cache[cpu], weights.float(), rtol=0, atol=0)
    dm = obj._dm_cache[cpu]
    run(eng, batches(2))
    assert {k: dict(v) for k, v in sched._cache.items()} == built  # the same tensors, nothing new
    assert list(obj._dm_cache) == [cpu] and obj._dm_cache[cpu] is dm


def test_eager_step_is_reproducible_and_counts_ema_updates():
    xs = batches(3)
    a, _ = make(fast=False)
    b, _ = make(fast=False)
    sa, sb = run(a, xs), run(b, xs)
    assert all(torch.equal(x["loss"], y["loss"]) for x, y in zip(sa, sb, strict=True))
    assert a.ema.num_updates == 3 and a.mode == "eager"
    assert all(p.grad is not None for p in a.model.parameters())


def _state(eng):
    """Every tensor a step may change: weights, optimizer moments and step counts, EMA, skip streak."""
    opt = [v for st in eng.optimizer.state.values() for v in st.values()]
    return [t.clone() for t in (*eng.model.parameters(), *opt, *eng.ema.module.parameters(), eng.skip_streak)]


@pytest.mark.parametrize("bad,clip", [(float("nan"), 1.0), (float("inf"), 0.0)])
def test_nonfinite_step_is_skipped_on_the_device(bad, clip):
    xs = batches(5, bad_at=(1, 2), bad=bad)
    eng, _ = make(fast=False, clip=clip)
    eng.step(xs[0], 1e-3)
    before = _state(eng)
    streaks = []
    for x in xs[1:3]:
        s = eng.step(x, 1e-3)
        assert s["skipped"].dtype == torch.float32 and s["skipped"].shape == () and float(s["skipped"]) == 1.0
        assert not torch.isfinite(s["loss"]) or not torch.isfinite(s["grad_norm"])
        streaks.append(int(eng.skip_streak))
    assert streaks == [1, 2]
    after = _state(eng)
    assert all(torch.equal(a, b) for a, b in zip(before[:-1], after[:-1], strict=True))  # bit-identical
    # the next finite step proceeds as if the skipped ones never happened (but for the randomness they
    # drew and the EMA warm-up counter): the same as a run that never saw them
    ref, _ = make(fast=False, clip=clip)
    ref.step(xs[0], 1e-3)
    ref.generator.set_state(eng.generator.get_state())
    ref.ema.num_updates = eng.ema.num_updates
    s, s_ref = eng.step(xs[3], 1e-3), ref.step(xs[3], 1e-3)
    assert float(s["skipped"]) == 0.0 and int(eng.skip_streak) == 0
    assert torch.equal(s["loss"], s_ref["loss"]) and torch.equal(s["grad_norm"], s_ref["grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(_state(eng), _state(ref), strict=True))
    assert not torch.equal(_state(eng)[0], before[0])  # and it did train


@pytest.mark.parametrize("mode", ["adv", "free"])
def test_compile_failure_falls_back_to_eager(monkeypatch, mode):
    calls = []

    def broken_compile(model, **kw):
        def fn(*a, **k):
            calls.append(1)
            out = model(*a, **k)
            if len(calls) == 2:  # fails in its backward (free: after the replay position moved on)
                out.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("inductor exploded")))
            return out

        return fn

    monkeypatch.setattr(torch, "compile", broken_compile)
    xs = batches(3)
    eng, logs = make(fast=True, mode=mode)
    ref, _ = make(fast=False, mode=mode)
    s, r = run(eng, xs), run(ref, xs)
    assert eng.mode == "eager" and len(logs) == 1 and "inductor exploded" in logs[0]
    assert eng.wants_batch == ref.wants_batch  # free: the host's replay count survived the retry
    assert all(
        torch.equal(x["loss"], y["loss"]) for x, y in zip(s, r, strict=True)
    )  # the retried step is the eager one


def test_detached_params_gives_input_gradients_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    wrapped = DetachedParams(lambda_model := _TimeModel(model))
    x = torch.randn(5, 3, requires_grad=True)
    t = torch.randint(0, 10, (5,))
    out_w, out_m = wrapped(x, t), lambda_model(x, t)
    torch.testing.assert_close(out_w, out_m)
    (gx,) = torch.autograd.grad(out_w.square().sum(), [x])
    (gx_ref,) = torch.autograd.grad(out_m.square().sum(), [x])
    torch.testing.assert_close(gx, gx_ref)
    assert out_w.grad_fn is not None and all(p.grad is None for p in model.parameters())
    wrapped(x, t).square().sum().backward()
    assert x.grad is not None and all(p.grad is None for p in model.parameters())  # no path to the weights


class _TimeModel(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x) * (1 + t[:, None].float() / 10)


def test_ema_lerp_with_tensor_weight_equals_float_weight():
    torch.manual_seed(0)
    m = nn.Linear(4, 4)
    a, b = EMA(m, 0.9), EMA(m, 0.9)
    w0 = m.weight.detach().double().clone()
    with torch.no_grad():
        m.weight.add_(torch.randn(4, 4))
    a.lerp_(m, 0.25)
    b.lerp_(m, torch.tensor(0.25))
    assert torch.equal(a.module.weight, b.module.weight)
    expected = w0 + 0.25 * (m.weight.detach().double() - w0)  # float64 reference
    torch.testing.assert_close(a.module.weight.double(), expected, rtol=0, atol=1e-6)


def test_ema_zero_weight_leaves_weights_and_buffers_untouched():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = EMA(m, 0.9)
    before = [t.clone() for t in (*ema.module.parameters(), *ema.module.buffers())]
    with torch.no_grad():
        m[0].weight.add_(1.0)
        m[1].running_mean.fill_(float("nan"))
    ema.lerp_(m, torch.tensor(0.0))
    after = (*ema.module.parameters(), *ema.module.buffers())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    ema.lerp_(m, torch.tensor(0.5))
    assert torch.isnan(ema.module[1].running_mean).all()  # a positive weight copies the buffers


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/gpu_check.sh)"
)


def make_cuda(fast, mode="adv", graph=None, precision="fp32"):
    torch.manual_seed(0)
    model = MLP(3, hidden=64, depth=2, time_dim=16).cuda()
    obj = ATObjective(schedule=NoiseSchedule(T=100), mode=mode, budget=Budget(r_min=0.1, r_scale=0.2))
    gen = torch.Generator(device="cuda").manual_seed(1)
    logs = []
    eng = StepEngine(
        model, obj, generator=gen, lr=1e-3, ema_decay=0.9, fast=fast, graph=graph, log=logs.append,
        precision=precision,
    )  # fmt: skip
    return eng, logs


@contextlib.contextmanager
def no_host_sync():
    """CUDA's sync debug mode set to error: any synchronising call inside raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def assert_runs_agree(s_e, s_f, eager, fast, tol):
    for a, b in zip(s_e, s_f, strict=True):
        for k in a:
            torch.testing.assert_close(b[k], a[k], equal_nan=True, msg=k, **tol)
    for pe, pf in zip(eager.model.parameters(), fast.model.parameters(), strict=True):
        torch.testing.assert_close(pf, pe, **tol)
    for pe, pf in zip(eager.ema.module.parameters(), fast.ema.module.parameters(), strict=True):
        torch.testing.assert_close(pf, pe, **tol)


@needs_cuda
@pytest.mark.parametrize("mode", ["adv", "pgd", "free"])
def test_cuda_graph_step_matches_eager_step_and_advances_rng(mode):
    """On CUDA: the captured step (fused kernels, compiled model, CUDA graph) against the eager step with
    the same seeds. The registered generators give both the same random numbers, so after warm-up,
    capture and several replays the statistics and weights agree within compile's rounding. The eager
    step and the replays run with CUDA's sync debug mode set to error: neither synchronises. free: the
    ascent hook runs inside the captured backward, and its replay steps (None) copy no batch."""
    bad = 7 if mode != "free" else 6  # free: batch 6 is also replayed by step 7
    xs = [x.cuda() for x in batches(9, bad_at=(bad,))]
    eager, _ = make_cuda(False, mode)
    fast, logs = make_cuda(True, mode)
    s_e = run(eager, xs[:1])  # lazy state (the optimizer's moments) is made by a first step
    with no_host_sync():
        s_e += run(eager, xs[1:], first=1)
    s_f = run(fast, xs[:5])  # warm-up (compilation) and capture
    assert fast.mode == "compiled+graph" and fast._graph is not None and fast.capture_seconds, logs
    with no_host_sync():
        s_f += run(fast, xs[5:], first=5)
    assert not torch.equal(s_f[-1]["loss"], s_f[-2]["loss"])  # replays draw new noise
    skipped = [0] * 7 + [1, 0] if mode != "free" else [0] * 6 + [1, 1, 0]
    assert [float(s["skipped"]) for s in s_f] == skipped and int(fast.skip_streak) == 0
    assert_runs_agree(s_e, s_f, eager, fast, {"atol": 1e-4, "rtol": 1e-3})


@needs_cuda
def test_cuda_graph_fp16_step_with_grad_scaler():
    """fp16 on CUDA: the GradScaler's scale, unscale_ and update are captured with the step (no host sync
    in the eager step or the replays) and the replays track the eager fp16 step; an overflow is skipped
    and halves the scale in both."""
    xs = [x.cuda() for x in batches(9, bad_at=(7,), bad=float("inf"))]
    eager, _ = make_cuda(False, precision="fp16")
    fast, logs = make_cuda(True, precision="fp16")
    s_e = run(eager, xs[:1])  # lazy state (the optimizer's moments, the scaler's scale) first
    with no_host_sync():
        s_e += run(eager, xs[1:], first=1)
    s_f = run(fast, xs[:5])
    assert fast.mode == "compiled+graph" and fast._graph is not None, logs
    with no_host_sync():
        s_f += run(fast, xs[5:], first=5)
    for s in (s_e, s_f):
        assert [float(x["skipped"]) for x in s] == [0] * 7 + [1, 0]
        assert float(s[7]["loss_scale"]) == 2.0**16 and float(s[8]["loss_scale"]) == 2.0**15
    assert_runs_agree(s_e, s_f, eager, fast, {"atol": 2e-3, "rtol": 2e-2})


@needs_cuda
def test_cuda_failed_capture_restores_generators_and_runs_uncaptured(monkeypatch):
    """A real capture failure (a host read that only happens while capturing): the engine puts the
    generators back (torch 2.11 leaves them in capture mode) and goes on uncaptured, drawing the same
    numbers as an engine that never tried."""
    from fastat.at import objective

    real = objective.ATObjective._loss

    def syncs_while_capturing(self, *a, **k):
        if torch.cuda.is_current_stream_capturing():
            torch.zeros((), device="cuda").item()
        return real(self, *a, **k)

    monkeypatch.setattr(objective.ATObjective, "_loss", syncs_while_capturing)
    xs = [x.cuda() for x in batches(6)]
    ref, _ = make_cuda(False)
    eng, logs = make_cuda(False, graph=True)
    s_ref, s_eng = run(ref, xs), run(eng, xs)
    assert eng.mode == "eager" and len(logs) == 1 and "CUDA-graph capture failed" in logs[0], logs
    torch.randint(0, 2, (1,), device="cuda")  # the default generator draws again
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # not left on the capture stream
    assert not torch.cuda.is_current_stream_capturing()
    assert_runs_agree(s_ref, s_eng, ref, eng, {"atol": 0, "rtol": 0})


@needs_cuda
def test_cuda_graph_engine_resumed_from_an_uncaptured_state_still_captures():
    """An optimizer state saved by an uncaptured engine holds ``capturable=False``; a graph engine that
    loads it keeps its own flag, so capture does not raise "param_groups' capturable is False"."""
    xs = [x.cuda() for x in batches(5)]
    ref, _ = make_cuda(False)
    run(ref, xs[:1])
    eng, logs = make_cuda(False, graph=True)
    eng.load_optimizer_state(ref.optimizer.state_dict())
    run(eng, xs[1:])  # warm-up, then capture
    assert eng.mode == "eager+graph" and eng.captured and not logs, logs
