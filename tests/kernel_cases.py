"""The Triton kernels against their references, on CUDA or on CPU under the Triton interpreter.

Not collected by a plain ``pytest`` (the file name does not start with ``test_``): ``test_kernels.py``
runs it in a subprocess, with ``TRITON_INTERPRET=1`` on a machine without CUDA (the variable must be
set before triton is first imported) and natively on a CUDA machine. Every output the kernels allocate
is prefilled with NaN, so an element a kernel fails to write fails the comparison.
"""

import math
import os

import pytest
import torch
from conftest import at_loss_formula, bshape, pgd_ref

from fastat import kernels as K
from fastat.at import ops

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    raise RuntimeError("kernel_cases.py needs CUDA or TRITON_INTERPRET=1: run it through test_kernels.py")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (B, *sample) — a single element, primes, sizes that are not a multiple of the block, B=1 with a
# sample spanning many blocks.
SHAPES = [(1,), (1, 1), (7, 13), (3, 1500), (2, 3, 5, 7), (1, 3, 37, 41), (5, 1031)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def force_triton_and_poison(monkeypatch):
    """Send ops to Triton even for CPU tensors, and prefill every buffer the kernels allocate with NaN."""
    monkeypatch.setenv("FASTAT_FORCE_TRITON", "1")
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(empty_like(*a, **k)))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype=torch.float32, seed=0, scale=1.0):
    return (scale * torch.randn(shape, generator=gen(seed), dtype=torch.float64)).to(device=DEV, dtype=dtype)


def coeff(B, lo, hi, seed):
    return (lo + (hi - lo) * torch.rand(B, generator=gen(seed))).to(DEV)


def check(out, ref, dtype, same_dtype_ref=None):
    """``out`` close to the float64 ``ref``: fp32 to accumulation error; bf16 / fp16 no worse than twice
    the error of the same computation done by PyTorch and rounded to that dtype, plus one bf16 ulp (2^-7
    relative: the interpreter truncates where the GPU rounds to nearest)."""
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "an output element was not written (NaN prefill survived)"
    out, ref = out.double().cpu(), ref.double().cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:
        ref_err = (same_dtype_ref.double().cpu() - ref).abs()
        bound = 2 * ref_err + 2**-7 * ref.abs() + 1e-6
        assert ((out - ref).abs() <= bound).all(), float(((out - ref).abs() - bound).max())


# ---------------------------------------------------------------------------------------------- q_sample


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_q_sample_kernel(shape, dtype):
    x0, eps = randn(shape, dtype, 1), randn(shape, dtype, 2)
    a, s = coeff(shape[0], 0.1, 1, 3), coeff(shape[0], 0.1, 1, 4)
    out = ops.q_sample(x0, a, s, eps)
    ref = bshape(a.double(), x0) * x0.double() + bshape(s.double(), x0) * eps.double()
    check(out, ref, dtype, K.q_sample_ref(x0, a, s, eps))


def test_q_sample_kernel_gradient():
    x0, w = randn((3, 50), seed=1), randn((3, 50), seed=2).requires_grad_(True)
    s = coeff(3, 0.1, 1, 3)
    g = randn((3, 50), seed=4)
    (gw,) = torch.autograd.grad((ops.q_sample(x0, 1.0, s, w) * g).sum(), [w])
    torch.testing.assert_close(gw, bshape(s, g) * g)


# ------------------------------------------------------------------------------------------ noise_inject


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_inject_outputs_match_formula(shape, dtype):
    B = shape[0]
    x0 = randn(shape, dtype, 1)
    a, s, r = coeff(B, 0.1, 1, 2), coeff(B, 0.1, 1, 3), coeff(B, 0.05, 2, 4)
    xt, xadv, eps, w0 = ops.noise_inject(x0, a, s, r, seed=11, offset=5)
    for o in (xt, xadv, eps, w0):
        assert o.dtype == dtype and o.shape == x0.shape and torch.isfinite(o).all()
    assert (w0.double().abs() <= bshape(r.double(), w0)).all()
    a64, s64 = bshape(a.double(), x0), bshape(s.double(), x0)
    xt64 = a64 * x0.double() + s64 * eps.double()
    xadv64 = xt64 + s64 * w0.double()
    if dtype == torch.float32:
        check(xt, xt64, dtype)
        check(xadv, xadv64, dtype)
    else:
        # The kernel adds the unrounded eps and w0, then stores them rounded to bf16: allow the output
        # rounding plus the rounding of each stored term (2^-8 relative each).
        for out, ref, terms in ((xt, xt64, (s64 * eps.double(),)), (xadv, xadv64, (s64 * eps.double(), s64 * w0.double()))):
            bound = 2**-7 * (ref.abs() + sum(t.abs() for t in terms)) + 1e-6
            assert ((out.double() - ref).abs() <= bound).all()


def test_noise_inject_into_model_input_buffer_and_without_storing_noise():
    x0 = randn((3, 2, 5, 7), seed=1)
    a, s, r = coeff(3, 0.1, 1, 2), coeff(3, 0.1, 1, 3), coeff(3, 0.05, 2, 4)
    buf = torch.full((6, 2, 5, 7), float("nan"), device=DEV)
    xt, xadv, eps, w0 = ops.noise_inject(x0, a, s, r, seed=3, offset=9, out=buf)
    assert torch.isfinite(buf).all()
    assert xt.data_ptr() == buf.data_ptr() and torch.equal(buf[3:], xadv)
    xt2, xadv2, e2, w2 = ops.noise_inject(x0, a, s, r, seed=3, offset=9, store_noise=False)
    assert e2 is None and w2 is None
    assert torch.equal(xt2, xt) and torch.equal(xadv2, xadv)


def test_noise_inject_streams():
    x0 = randn((4, 5000), seed=1)
    ones, r = torch.ones(4, device=DEV), torch.full((4,), 1.0, device=DEV)
    zeros = torch.zeros(4, device=DEV)
    draw = lambda seed, off: ops.noise_inject(x0, zeros, ones, r, seed=seed, offset=off)[2:]  # noqa: E731
    e1, w1 = draw(1, 0)
    e2, w2 = draw(1, 0)
    assert torch.equal(e1, e2) and torch.equal(w1, w2)  # same seed and offset: same bits
    seed_t, off_t = torch.tensor([1], device=DEV), torch.tensor([0], device=DEV)
    e3, _ = draw(seed_t, off_t)  # device tensors give the same stream as ints
    assert torch.equal(e1, e3)
    n = e1.numel()
    for other in (draw(1, 1), draw(2, 0), draw(1, 2**33)):  # another offset (also > 32 bits) or seed
        corr_e = torch.corrcoef(torch.stack([e1.flatten(), other[0].flatten()]))[0, 1]
        corr_w = torch.corrcoef(torch.stack([w1.flatten(), other[1].flatten()]))[0, 1]
        assert abs(corr_e) < 5 / math.sqrt(n) and abs(corr_w) < 5 / math.sqrt(n)
    # eps is not correlated with w0 either (they come from different Philox words)
    assert abs(torch.corrcoef(torch.stack([e1.flatten(), w1.flatten()]))[0, 1]) < 5 / math.sqrt(n)


def test_noise_inject_distribution():
    stats = pytest.importorskip("scipy.stats")
    B, D = 4, 50_000
    x0 = randn((B, D), seed=1)
    r = torch.tensor([0.5, 1.0, 2.0, 3.0], device=DEV)
    _, _, eps, w0 = ops.noise_inject(x0, torch.ones(B, device=DEV), torch.ones(B, device=DEV), r, seed=7, offset=1)
    e = eps.double().cpu().flatten()
    n = e.numel()
    assert abs(e.mean()) < 5 / math.sqrt(n)
    assert abs(e.var() - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(e.numpy(), "norm").statistic < 1.95 / math.sqrt(n)  # alpha = 0.001
    u = (w0.double().cpu() / r.double().cpu()[:, None]).flatten()  # uniform on [-1, 1]
    assert u.abs().max() <= 1
    assert stats.kstest(u.numpy(), "uniform", args=(-1, 2)).statistic < 1.95 / math.sqrt(n)


# -------------------------------------------------------------------------------------------------- pgd


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step_kernel(shape, dtype, norm):
    B, D = shape[0], math.prod(shape[1:])
    r = coeff(B, 0.05, 1.0, 5) * (math.sqrt(D) if norm == "l2" else 1.0)
    w = (randn(shape, seed=6) * bshape(r, randn(shape))).to(dtype)
    g = randn(shape, dtype, 7)
    g.view(-1)[:: 3] = 0  # zero gradient entries: sign 0
    al = 0.7 * r
    out = ops.pgd_step(w, g, r, al, norm)
    check(out, pgd_ref(w, g, r, al, norm), dtype, K.pgd_step_ref(w, g, r, al, norm))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step_kernel_writes_next_input(norm):
    shape = (3, 3, 11, 13)
    w, g, xt = randn(shape, seed=1, scale=0.1), randn(shape, seed=2), randn(shape, seed=3)
    r, al, s = coeff(3, 0.1, 1, 4), coeff(3, 0.1, 1, 5), coeff(3, 0.1, 1, 6)
    x_out = torch.full(shape, float("nan"), device=DEV)
    w_new, x_next = ops.pgd_step(w, g, r, al, norm, x_t=xt, s=s, x_out=x_out)
    assert x_next.data_ptr() == x_out.data_ptr()
    check(w_new, pgd_ref(w, g, r, al, norm), torch.float32)
    check(x_next, xt.double() + bshape(s.double(), xt) * w_new.double(), torch.float32)


def test_pgd_l2_zero_gradient_and_many_partials(monkeypatch):
    """A zero gradient leaves w; a sample with more partial sums than one reduction chunk still reduces."""
    monkeypatch.setattr(K.pgd, "MAX_RBLOCK", 16)  # 20 blocks of 1024 -> two chunks of 16
    w = randn((2, 20_000), seed=1, scale=0.01)
    g = randn((2, 20_000), seed=2)
    g[1] = 0
    r = torch.tensor([0.5, 100.0], device=DEV)
    out = ops.pgd_step(w, g, r, torch.tensor([3.0, 3.0], device=DEV), "l2")
    torch.testing.assert_close(out[1], w[1])
    check(out, pgd_ref(w, g, r, torch.tensor([3.0, 3.0]), "l2"), torch.float32)
    assert out[0].norm() <= 0.5 * (1 + 1e-5)


# ------------------------------------------------------------------------------------------------- loss


def loss_inputs(shape, dtype):
    return [randn(shape, dtype, 10 + i) for i in range(4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("detach_clean", [False, True])
def test_at_loss_kernel_value_and_gradients(shape, dtype, detach_clean):
    p, q, e, w = loss_inputs(shape, dtype)
    lam = coeff(shape[0], 0.1, 2.0, 20)
    dmw = coeff(shape[0], 0.2, 3.0, 21)  # per-sample weight of the DDPM term
    p.requires_grad_(True)
    q.requires_grad_(True)
    loss = ops.at_loss(p, q, e, w, lam, detach_clean=detach_clean, dm_weight=dmw)
    gp, gq = torch.autograd.grad(loss, [p, q])
    p64, q64 = p.detach().double().requires_grad_(True), q.detach().double().requires_grad_(True)
    ref = at_loss_formula(p64, q64, e, w, lam.double(), detach_clean, dmw.double())
    rp, rq = torch.autograd.grad(ref, [p64, q64])
    pr, qr = p.detach().clone().requires_grad_(True), q.detach().clone().requires_grad_(True)
    same = K.at_loss_ref(pr, qr, e, w, lam, detach_clean, dmw)
    sp, sq = torch.autograd.grad(same, [pr, qr])
    check(loss, ref.detach(), K.loss_dtype(dtype), same.detach())  # fp16: a float32 loss
    check(gp, rp, dtype, sp)
    check(gq, rq, dtype, sq)


def test_at_loss_kernel_is_deterministic_and_lam_zero_is_its_ddpm_term(monkeypatch):
    monkeypatch.setattr(K.loss, "MAX_RBLOCK", 16)  # many partials: the finalize loop runs several chunks
    p, q, e, w = loss_inputs((9, 3, 17, 19), torch.float32)
    l1, dm1 = ops.at_loss_parts(p, q, e, w, 0.3)
    l2, dm2 = ops.at_loss_parts(p, q, e, w, 0.3)
    assert torch.equal(l1, l2) and torch.equal(dm1, dm2)
    l0, dm0 = ops.at_loss_parts(p, q, e, w, 0.0)
    assert torch.equal(l0, dm0) and torch.equal(dm0, dm1)
    torch.testing.assert_close(dm1.double(), ((p.double() - e.double()) ** 2).mean(), atol=1e-6, rtol=1e-6)


def test_at_loss_fp16_gradients_survive_a_loss_scale():
    """fp16 inputs with many elements: 2 (p - e) / N is below fp16's normal range, so the kernel keeps
    its gradients in float32 until the (scaled) upstream gradient has been applied, as a GradScaler does;
    the loss is float32, so the scale (2^16) does not overflow on its way into autograd."""
    p, q, e, w = loss_inputs((2, 200_000), torch.float16)
    p.requires_grad_(True)
    q.requires_grad_(True)
    scale = 2.0**16  # a GradScaler's default: the float32 loss keeps it finite (fp16 would make it inf)
    loss, dm = ops.at_loss_parts(p, q, e, w, 0.5)
    assert loss.dtype == dm.dtype == torch.float32 and ops.ddpm_loss(p, e).dtype == torch.float32
    gp, gq = torch.autograd.grad(loss * scale, [p, q])
    assert gp.dtype == gq.dtype == torch.float16
    p64, q64 = p.detach().double().requires_grad_(True), q.detach().double().requires_grad_(True)
    rp, rq = torch.autograd.grad(at_loss_formula(p64, q64, e, w, 0.5) * scale, [p64, q64])
    for g, r in ((gp, rp), (gq, rq)):  # within a few fp16 ulps of the exact value, element by element
        assert ((g.double() - r).abs() <= 2**-9 * r.abs() + 1e-6).all()


def test_at_loss_backward_uses_stored_gradients_times_upstream():
    p, q, e, w = loss_inputs((4, 300), torch.float32)
    p.requires_grad_(True)
    q.requires_grad_(True)
    loss = ops.at_loss(p, q, e, w, 0.5)
    gp1, gq1 = torch.autograd.grad(loss, [p, q], retain_graph=True)
    with torch.no_grad():  # backward must not read the inputs again
        e.add_(100.0)
        w.mul_(-3.0)
    gp3, gq3 = torch.autograd.grad(3.0 * loss, [p, q])
    torch.testing.assert_close(gp3, 3 * gp1)
    torch.testing.assert_close(gq3, 3 * gq1)


# ------------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_kernels_handle_non_contiguous_inputs(layout):
    shape = (3, 4, 6, 5)

    def make(seed):
        x = randn(shape, seed=seed)
        if layout == "channels_last":
            return x.contiguous(memory_format=torch.channels_last)
        return randn((3, 4, 5, 6), seed=seed).transpose(2, 3)  # a strided view of the same shape

    x0, eps, g, q = make(1), make(2), make(3), make(4)
    a, s, r = coeff(3, 0.1, 1, 5), coeff(3, 0.1, 1, 6), coeff(3, 0.1, 1, 7)
    c = lambda t: t.contiguous()  # noqa: E731
    out = ops.q_sample(x0, a, s, eps)
    torch.testing.assert_close(out, K.q_sample_ref(c(x0), a, s, c(eps)))
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    for norm in ("linf", "l2"):
        torch.testing.assert_close(ops.pgd_step(x0, g, r, 0.3, norm), K.pgd_step_ref(c(x0), c(g), r, 0.3, norm))
    torch.testing.assert_close(ops.at_loss(x0, q, eps, g, r), K.at_loss_ref(c(x0), c(q), c(eps), c(g), r))
    # mixed layouts are made contiguous first
    torch.testing.assert_close(ops.q_sample(x0, a, s, c(eps)), K.q_sample_ref(c(x0), a, s, c(eps)))


# ------------------------------------------------------------------------------------------- objective


@pytest.mark.parametrize("mode", ["ddpm", "rand", "adv", "pgd", "inv"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_objective_runs_on_the_kernels(mode, norm):
    """The whole objective on the Triton path: finite loss, gradients for every parameter, ascent works,
    and the same generator seed gives the same bits."""
    from fastat.at.budget import Budget
    from fastat.at.objective import ATObjective
    from fastat.at.schedule import NoiseSchedule

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).to(DEV)
    model = lambda x, t: net(torch.cat([x, t.float()[:, None] / 100], 1))  # noqa: E731
    x0 = randn((16, 3), seed=3)
    obj = ATObjective(schedule=NoiseSchedule(T=100), mode=mode, budget=Budget(norm=norm), attack_target="prediction")
    gen_ = lambda: torch.Generator(device=DEV).manual_seed(5)  # noqa: E731
    out = obj(model, x0, gen_())
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert torch.equal(obj(model, x0, gen_()).loss, out.loss)
    if mode in ("adv", "pgd", "inv"):
        assert out.stats["gain"] > 1


@pytest.mark.parametrize("prediction,dm_weight", [("v", None), ("x0", "eps")])
def test_objective_prediction_types_on_the_kernels(prediction, dm_weight, monkeypatch):
    """v- and x0-models on the Triton path: the fused loss on the model's own outputs equals the reference
    ops' loss of the same inputs (the model's inputs are recorded, the loss recomputed on the CPU path)."""
    from fastat.at import prediction as P
    from fastat.at.objective import ATObjective, _scaled
    from fastat.at.schedule import NoiseSchedule

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).to(DEV)
    calls = []

    def model(x, t):
        calls.append(x.detach())
        return (net(torch.cat([x, t.float()[:, None] / 100], 1)),)  # a tuple, as with return_dict=False

    obj = ATObjective(schedule=NoiseSchedule(T=100), mode="adv", prediction=prediction, dm_weight=dm_weight)
    x0 = randn((16, 3), seed=3)
    t = obj.schedule.sample_t(16, torch.Generator(device=DEV).manual_seed(5), device=DEV)  # what it draws
    out = obj(model, x0, torch.Generator(device=DEV).manual_seed(5))
    assert torch.isfinite(out.loss) and out.stats["gain"] > 1
    x_t, x_adv = calls[0], calls[-1]
    a, s = obj.schedule.coeffs(t)
    eps, w = (x_t - bshape(a, x0) * x0) / bshape(s, x0), (x_adv - x_t) / bshape(s, x0)
    c_w, factor = P.regulariser_coeffs(prediction, a, s)
    o, o_adv = model(x_t, t)[0], model(x_adv, t)[0]
    monkeypatch.delenv("FASTAT_FORCE_TRITON")  # the same loss on the reference path
    ref = ops.at_loss(o, o_adv, P.target(prediction, x0, eps, a, s), _scaled(w, c_w), 0.3 * factor,
                      dm_weight=obj.dm_weight_at(t, a, s))  # fmt: skip
    torch.testing.assert_close(out.loss.detach(), ref.detach(), atol=1e-4, rtol=1e-3)
