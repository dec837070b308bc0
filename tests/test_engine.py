"""The step engine: the fast (compiled) step computes the same function as the eager reference step."""

import pytest
import torch
from torch import nn

from fastat.budget import Budget
from fastat.ema import EMA
from fastat.engine import DetachedParams, StepEngine
from fastat.models import MLP
from fastat.objective import ATObjective
from fastat.schedule import NoiseSchedule


def make(fast, mode="adv", seed=0, **kw):
    torch.manual_seed(seed)
    model = MLP(3, hidden=32, depth=2, time_dim=16)
    obj = ATObjective(schedule=NoiseSchedule(T=100), mode=mode, budget=Budget(r_min=0.1, r_scale=0.2))
    gen = torch.Generator().manual_seed(seed + 1)
    logs = []
    eng = StepEngine(model, obj, generator=gen, lr=1e-3, clip=1.0, ema_decay=0.9, fast=fast, log=logs.append, **kw)
    return eng, logs


def batches(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 3, generator=g) for _ in range(n)]


def run(eng, xs):
    return [{k: v.clone() for k, v in eng.step(x, lr=1e-3 * (i + 1) / len(xs)).items()} for i, x in enumerate(xs)]


@pytest.mark.slow
def test_fast_step_matches_eager_step():
    xs = batches(4)
    eager, _ = make(fast=False)
    fast, logs = make(fast=True)
    assert fast.mode == "compiled"
    s_e, s_f = run(eager, xs), run(fast, xs)
    assert not logs, logs  # no fallback happened
    for a, b in zip(s_e, s_f):
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    for pe, pf in zip(eager.model.parameters(), fast.model.parameters()):
        torch.testing.assert_close(pf, pe, atol=1e-5, rtol=1e-4)
    for pe, pf in zip(eager.ema.module.parameters(), fast.ema.module.parameters()):
        torch.testing.assert_close(pf, pe, atol=1e-5, rtol=1e-4)
    # the training changed the weights (the comparison is not between two untouched models)
    fresh, _ = make(fast=False)
    assert any(not torch.allclose(p, q) for p, q in zip(fresh.model.parameters(), eager.model.parameters()))


def test_eager_step_is_reproducible_and_counts_ema_updates():
    xs = batches(3)
    a, _ = make(fast=False)
    b, _ = make(fast=False)
    sa, sb = run(a, xs), run(b, xs)
    assert all(torch.equal(x["loss"], y["loss"]) for x, y in zip(sa, sb))
    assert a.ema.num_updates == 3 and a.mode == "eager"
    assert all(p.grad is not None for p in a.model.parameters())


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken_compile(model, **kw):
        def fn(*a, **k):
            raise RuntimeError("inductor exploded")

        return fn

    monkeypatch.setattr(torch, "compile", broken_compile)
    xs = batches(2)
    eng, logs = make(fast=True)
    ref, _ = make(fast=False)
    s, r = run(eng, xs), run(ref, xs)
    assert eng.mode == "eager" and len(logs) == 1 and "inductor exploded" in logs[0]
    assert all(torch.equal(x["loss"], y["loss"]) for x, y in zip(s, r))  # the retried step is the eager one


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
    with torch.no_grad():
        m.weight.add_(1.0)
    a.lerp_(m, 0.25)
    b.lerp_(m, torch.tensor(0.25))
    assert torch.equal(a.module.weight, b.module.weight)
    assert not torch.equal(a.module.weight, m.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("mode", ["adv", "pgd"])
def test_cuda_graph_step_matches_eager_step_and_advances_rng(mode):
    """On CUDA: the captured step (fused kernels, compiled model, CUDA graph) against the eager step with
    the same seeds. The registered generators give both the same random numbers, so after warm-up,
    capture and several replays the statistics and weights agree within compile's rounding."""

    def make_cuda(fast):
        torch.manual_seed(0)
        model = MLP(3, hidden=64, depth=2, time_dim=16).cuda()
        obj = ATObjective(schedule=NoiseSchedule(T=100), mode=mode, budget=Budget(r_min=0.1, r_scale=0.2))
        gen = torch.Generator(device="cuda").manual_seed(1)
        logs = []
        eng = StepEngine(model, obj, generator=gen, lr=1e-3, ema_decay=0.9, fast=fast, log=logs.append)
        return eng, logs

    xs = [x.cuda() for x in batches(8)]
    eager, _ = make_cuda(False)
    fast, logs = make_cuda(True)
    s_e, s_f = run(eager, xs), run(fast, xs)
    assert fast.mode == "compiled+graph" and fast._graph is not None, logs
    assert not torch.equal(s_f[-1]["loss"], s_f[-2]["loss"])  # replays draw new noise
    for a, b in zip(s_e, s_f):
        torch.testing.assert_close(b["loss"], a["loss"], atol=1e-4, rtol=1e-3)
    for pe, pf in zip(eager.model.parameters(), fast.model.parameters()):
        torch.testing.assert_close(pf, pe, atol=1e-4, rtol=1e-3)
    for pe, pf in zip(eager.ema.module.parameters(), fast.ema.module.parameters()):
        torch.testing.assert_close(pf, pe, atol=1e-4, rtol=1e-3)
