"""fastat.at.ops (the reference path) against float64 formulas written out here."""

import math

import pytest
import torch
from conftest import DTYPES, SHAPES, TOL, at_loss_formula, bshape, pgd_ref, rand, randn
from hypothesis import given, settings
from hypothesis import strategies as st

from fastat.at import ops


def assert_close(out, ref, dtype, loss=False):
    """``out`` in ``dtype`` (a loss: float32 for float16 inputs, so a GradScaler's 2^16 stays finite)."""
    atol, rtol = TOL[dtype]
    assert out.dtype == (torch.float32 if loss and dtype == torch.float16 else dtype)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_q_sample_matches_formula(shape, dtype):
    x0, eps = randn(shape, dtype, 1), randn(shape, dtype, 2)
    a, s = rand(shape[0], 0.1, 1.0, 3), rand(shape[0], 0.1, 1.0, 4)
    out = ops.q_sample(x0, a.float(), s.float(), eps)
    ref = bshape(a.float().double(), x0) * x0.double() + bshape(s.float().double(), x0) * eps.double()
    assert_close(out, ref, dtype)


def test_q_sample_scalar_coefficients():
    x0, eps = randn((4, 3), seed=1), randn((4, 3), seed=2)
    torch.testing.assert_close(ops.q_sample(x0, 0.6, 0.8, eps), 0.6 * x0 + 0.8 * eps)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step_matches_formula(shape, dtype, norm):
    B = shape[0]
    r = rand(B, 0.05, 1.0, 5).float()
    if norm == "l2":
        r = r * math.sqrt(math.prod(shape[1:]))
    w = (randn(shape, seed=6) * bshape(r.double(), randn(shape))).clamp(-1, 1).to(dtype)
    g = randn(shape, dtype, 7)
    al = (0.7 * r).float()
    out = ops.pgd_step(w, g, r, al, norm)
    assert_close(out, pgd_ref(w, g, r, al, norm), dtype)


def test_pgd_step_l2_zero_gradient_does_not_move():
    w = randn((3, 10), seed=1) * 0.01
    out = ops.pgd_step(w, torch.zeros_like(w), 10.0, 1.0, "l2")
    assert torch.equal(out, w)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 4),
    d=st.integers(1, 40),
    norm=st.sampled_from(["linf", "l2"]),
    r=st.floats(0.0, 5.0),
    alpha=st.floats(0.0, 20.0),
    gscale=st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e30]),
    seed=st.integers(0, 2**16),
)
def test_pgd_step_stays_in_budget(b, d, norm, r, alpha, gscale, seed):
    w = randn((b, d), seed=seed, scale=3.0).float()  # may start outside the budget
    g = randn((b, d), seed=seed + 1, scale=1.0).float() * gscale
    out = ops.pgd_step(w, g, r, alpha, norm)
    assert torch.isfinite(out).all()
    if norm == "linf":
        assert (out.abs() <= r).all()
    else:
        assert (out.flatten(1).norm(dim=1) <= r * (1 + 1e-6) + 1e-30).all()


def loss_inputs(shape, dtype, seed=10):
    return [randn(shape, dtype, seed + i) for i in range(4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_at_loss_matches_formula(shape, dtype, per_sample):
    p, q, e, w = loss_inputs(shape, dtype)
    lam = rand(shape[0], 0.1, 2.0, 20).float() if per_sample else 0.3
    out = ops.at_loss(p, q, e, w, lam)
    assert out.dim() == 0
    assert_close(out, at_loss_formula(p, q, e, w, lam), dtype, loss=True)


@pytest.mark.parametrize("detach_clean", [False, True])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 3, 7, 5)])
def test_at_loss_gradients_match_formula(shape, detach_clean):
    p, q, e, w = loss_inputs(shape, torch.float32)
    lam = rand(shape[0], 0.1, 2.0, 21).float()
    p.requires_grad_(True)
    q.requires_grad_(True)
    gp, gq = torch.autograd.grad(ops.at_loss(p, q, e, w, lam, detach_clean=detach_clean), [p, q])
    p64, q64 = p.detach().double().requires_grad_(True), q.detach().double().requires_grad_(True)
    rp, rq = torch.autograd.grad(at_loss_formula(p64, q64, e, w, lam, detach_clean), [p64, q64])
    torch.testing.assert_close(gp.double(), rp, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gq.double(), rq, atol=1e-6, rtol=1e-5)
    # The closed form, so that the test also pins the meaning of detach_clean.
    n, lamb = p.numel(), bshape(lam.double(), p64)
    resid = q64.detach() - p64.detach() - w.double()
    expect_p = 2 * (p64.detach() - e.double()) / n - (0 if detach_clean else 2 * lamb * resid / n)
    torch.testing.assert_close(gp.double(), expect_p, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_at_loss_lam_zero_is_ddpm_loss_exactly(dtype):
    p, q, e, w = loss_inputs((4, 3, 8, 8), dtype)
    ddpm = ops.ddpm_loss(p, e)
    assert torch.equal(ops.at_loss(p, q, e, w, 0.0), ddpm)
    assert torch.equal(ops.at_loss(p, q, e, w, torch.zeros(4)), ddpm)
    mse = torch.nn.functional.mse_loss(p.float(), e.float())
    torch.testing.assert_close(ddpm, mse if dtype == torch.float16 else mse.to(dtype))  # fp16: a float32 loss


def test_bad_arguments_raise_clear_errors():
    x, y = randn((4, 3)), randn((4, 3))
    with pytest.raises(ValueError, match="shape"):
        ops.q_sample(x, 1.0, 1.0, randn((4, 2)))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        ops.q_sample(x, torch.ones(3), 1.0, y)
    with pytest.raises(TypeError, match="floating"):
        ops.q_sample(x.long(), 1.0, 1.0, y.long())
    with pytest.raises(TypeError, match="bfloat16"):
        ops.at_loss(x, y, x.bfloat16(), y, 0.1)
    with pytest.raises(ValueError, match="on meta but x0 is on cpu"):
        ops.q_sample(x, 1.0, 1.0, torch.empty((4, 3), device="meta"))
    with pytest.raises(ValueError, match="unknown norm"):
        ops.pgd_step(x, y, 1.0, 1.0, norm="l1")
    with pytest.raises(ValueError, match="finite"):
        ops.pgd_step(x, y, torch.tensor([1.0, float("inf"), 1.0, 1.0]), 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        ops.pgd_step(x, y, -1.0, 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        ops.at_loss(x, y, x, y, -0.5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.q_sample([1.0], 1.0, 1.0, y)
    with pytest.raises(ValueError, match="batch dimension"):
        ops.q_sample(torch.tensor(1.0), 1.0, 1.0, torch.tensor(2.0))
    empty = torch.empty((0, 3))  # a loss over no elements: an error before any kernel (no 1/0, no NaN)
    for call in (lambda: ops.at_loss(empty, empty, empty, empty, 0.1), lambda: ops.ddpm_loss(empty, empty),
                 lambda: ops.at_loss_parts(empty, empty, empty, empty, 0.0)):  # fmt: skip
        with pytest.raises(ValueError, match=r"batch is empty \(shape \(0, 3\)\): a loss needs an element"):
            call()


def test_trusted_values_skips_only_the_tensor_value_checks():
    x, y = randn((2, 3)), randn((2, 3))
    bad = torch.tensor([1.0, float("nan")])
    with pytest.raises(ValueError, match="finite"):
        ops.pgd_step(x, y, bad, 1.0)
    with ops.trusted_values():
        ops.pgd_step(x, y, bad, 1.0)  # no host read of the radius
        with pytest.raises(ValueError, match="shape"):
            ops.pgd_step(x, y, torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="finite"):
        ops.pgd_step(x, y, bad, 1.0)


# -- dtypes, weights and the helpers for loops written with the ops --------------------------------------


def test_float64_is_refused_with_a_true_message():
    x = randn((4, 3)).double()
    for call in (lambda: ops.q_sample(x, 1.0, 1.0, x), lambda: ops.at_loss(x, x, x, x, 0.1),
                 lambda: ops.noise_inject(x, 1.0, 1.0, 0.1, 0)):  # fmt: skip
        with pytest.raises(TypeError, match=r"float32, bfloat16 or float16 \(the ops compute in float32\)"):
            call()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dm_weight_weighs_each_sample_of_the_ddpm_term(dtype):
    p, q, e, w = (randn((5, 2, 3), dtype, seed=20 + i) for i in range(4))
    c = rand(5, 0.1, 3.0, 7).float()
    assert_close(ops.ddpm_loss(p, e, c), at_loss_formula(p, q, e, w, 0.0, dm_weight=c.double()), dtype, True)
    loss, dm = ops.at_loss_parts(p, q, e, w, 0.4, dm_weight=c)
    assert_close(loss, at_loss_formula(p, q, e, w, 0.4, dm_weight=c.double()), dtype, True)
    assert_close(dm, at_loss_formula(p, q, e, w, 0.0, dm_weight=c.double()), dtype, True)
    with pytest.raises(ValueError, match="dm_weight must be >= 0"):
        ops.at_loss(p, q, e, w, 0.4, dm_weight=-c)


def test_noise_stream_advances_by_itself_and_is_per_rank():
    x0 = randn((3, 50), seed=1)
    a, s = torch.full((3,), 0.8), torch.full((3,), 0.6)
    stream = ops.NoiseStream(7, rank=0)
    first = ops.noise_inject(x0, a, s, 0.5, stream)
    second = ops.noise_inject(x0, a, s, 0.5, stream)
    assert int(stream.offset) == 2
    assert not torch.equal(first[2], second[2]) and not torch.equal(first[3], second[3])
    # exactly the (seed, offset) pairs 0 and 1 of the stream's seed
    for off, got in ((0, first), (1, second)):
        want = ops.noise_inject(x0, a, s, 0.5, stream.seed, off)
        assert all(torch.equal(u, v) for u, v in zip(got, want, strict=True))
    # a checkpointed stream continues where it was
    again = ops.NoiseStream(0)
    again.load_state_dict(stream.state_dict())
    assert torch.equal(ops.noise_inject(x0, a, s, 0.5, again)[2], ops.noise_inject(x0, a, s, 0.5, stream)[2])
    # every rank its own seed; the default rank is read from the environment at call time
    assert int(ops.NoiseStream(7, rank=1).seed) != int(ops.NoiseStream(7, rank=0).seed)
    with pytest.raises(ValueError, match="carries its own offset"):
        ops.noise_inject(x0, a, s, 0.5, stream, 3)


def test_rank_generator_gives_each_rank_its_own_stream(monkeypatch):
    from fastat.at.seeding import current_rank, rank_seed

    draws = [torch.randn(1000, generator=ops.rank_generator(3, rank=r)) for r in range(3)]
    assert torch.equal(draws[0], torch.randn(1000, generator=ops.rank_generator(3, rank=0)))
    for i in range(3):
        for j in range(i):
            assert abs(torch.corrcoef(torch.stack([draws[i], draws[j]]))[0, 1]) < 0.15
    monkeypatch.setenv("RANK", "2")
    assert current_rank() == 2 and rank_seed(3) == rank_seed(3, 2) != rank_seed(3, 0)
    assert torch.equal(torch.randn(1000, generator=ops.rank_generator(3)), draws[2])
    assert rank_seed(3, 0, tag="a") != rank_seed(3, 0, tag="b")
    with pytest.raises(ValueError, match="rank must be"):
        rank_seed(3, -1)
