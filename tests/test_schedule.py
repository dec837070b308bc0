import math

import pytest
import torch

from fastat.at.budget import Budget
from fastat.at.schedule import NoiseSchedule


def test_linear_schedule_matches_ddpm():
    sched = NoiseSchedule("linear", T=1000)
    betas = sched.tables(dtype=torch.float64)["betas"]
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    t = torch.tensor([0, 1, 500, 999])
    a, s = sched.coeffs(t, dtype=torch.float64)
    torch.testing.assert_close(a, abar[t].sqrt())
    torch.testing.assert_close(a * a + s * s, torch.ones(4, dtype=torch.float64))
    assert abar[-1] < 1e-4  # x_T is essentially pure noise


def test_cosine_schedule_is_monotone_and_bounded():
    sched = NoiseSchedule("cosine", T=200)
    abar = sched.tables(dtype=torch.float64)["abar"]
    assert (abar[1:] < abar[:-1]).all() and 0 < abar[-1] < abar[0] < 1
    assert (sched.tables(dtype=torch.float64)["betas"] <= 0.999).all()


def test_coefficients_follow_device_and_dtype():
    sched = NoiseSchedule()
    t = torch.tensor([3, 7])
    a, s = sched.coeffs(t, dtype=torch.bfloat16)
    assert a.dtype == torch.bfloat16 and a.device == t.device and a.shape == (2,)
    with pytest.raises(TypeError, match="integer"):
        sched.coeffs(torch.tensor([0.5]))


def test_sample_t_is_reproducible_and_in_range():
    sched = NoiseSchedule(T=50)
    t1 = sched.sample_t(1000, torch.Generator().manual_seed(0))
    t2 = sched.sample_t(1000, torch.Generator().manual_seed(0))
    assert torch.equal(t1, t2) and t1.min() >= 0 and t1.max() == 49


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        NoiseSchedule("quadratic")
    with pytest.raises(ValueError, match="T must be"):
        NoiseSchedule(T=0)


def test_budget_radius_spaces_and_l2_scaling():
    s = torch.tensor([0.1, 0.5, 1.0])
    x = Budget(r_min=0.1, r_scale=0.2, rho=2.0, space="x")
    torch.testing.assert_close(x.radius(s), (0.1 + 0.2 * s**2) / s)
    e = Budget(r_min=0.1, r_scale=0.2, rho=2.0, space="eps")
    torch.testing.assert_close(e.radius(s), 0.1 + 0.2 * s**2)
    l2 = Budget(r_min=0.1, r_scale=0.2, rho=2.0, space="eps", norm="l2")
    torch.testing.assert_close(l2.radius(s, numel=3 * 32 * 32), e.radius(s) * math.sqrt(3072))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_budget_random_start_fills_the_budget(norm):
    b = Budget(norm=norm)
    r = torch.tensor([0.5, 2.0, 7.0])
    w = b.random_start(r, (3, 4000), torch.Generator().manual_seed(0))
    if norm == "linf":
        amax = w.abs().amax(dim=1)
        assert (amax <= r).all() and (amax > 0.99 * r).all()
        torch.testing.assert_close(w.mean(dim=1), torch.zeros(3), atol=0.05 * 7, rtol=0)
    else:
        n = w.norm(dim=1)  # uniform in a 4000-dim ball: the norm concentrates just below r
        assert (n <= r * (1 + 1e-6)).all() and (n > 0.99 * r).all()


def test_bad_budget():
    with pytest.raises(ValueError, match="r_min"):
        Budget(r_min=-0.1)
    with pytest.raises(ValueError, match="empty"):
        Budget(r_min=0.0, r_scale=0.0)
    with pytest.raises(ValueError, match="space"):
        Budget(space="z")


# -- schedules from other codebases ------------------------------------------------------------------


def test_scaled_linear_and_squaredcos_by_name():
    sl = NoiseSchedule("scaled_linear", T=500, beta_start=0.00085, beta_end=0.012)
    want = torch.linspace(0.00085**0.5, 0.012**0.5, 500, dtype=torch.float64) ** 2
    torch.testing.assert_close(sl.betas, want, atol=0, rtol=1e-15)
    torch.testing.assert_close(sl.alphas_cumprod, torch.cumprod(1 - want, 0))
    # diffusers' squaredcos_cap_v2: beta_i = min(1 - f((i+1)/T) / f(i/T), 0.999),
    # f(u) = cos^2((u+0.008)/1.008 pi/2)
    T = 300
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ref = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    torch.testing.assert_close(NoiseSchedule("squaredcos_cap_v2", T=T).betas, ref, atol=1e-15, rtol=1e-12)
    torch.testing.assert_close(NoiseSchedule("cosine", T=T).betas, ref, atol=1e-15, rtol=1e-12)


def test_from_betas_and_from_alphas_cumprod_round_trip():
    ref = NoiseSchedule("linear", T=50)
    a = NoiseSchedule.from_betas(ref.betas.float().tolist())
    b = NoiseSchedule.from_alphas_cumprod(ref.alphas_cumprod.numpy())
    assert a.kind == b.kind == "custom" and a.T == b.T == 50 and a.prediction is None
    torch.testing.assert_close(a.alphas_cumprod, ref.alphas_cumprod, atol=1e-8, rtol=0)
    assert torch.equal(b.alphas_cumprod, ref.alphas_cumprod)  # kept exactly
    torch.testing.assert_close(b.betas, ref.betas, atol=1e-15, rtol=1e-12)
    t = torch.tensor([0, 49])
    torch.testing.assert_close(b.coeffs(t), ref.coeffs(t))


@pytest.mark.parametrize(
    "build,values,match",
    [("from_betas", [0.1, 0.0], r"\(0, 1\)"), ("from_betas", [0.5, 1.0], r"\(0, 1\)"),
     ("from_betas", [[0.1]], "1-D"), ("from_betas", [], "non-empty"),
     ("from_betas", [0.1, float("nan")], "finite"),
     ("from_alphas_cumprod", [0.9, 0.95], "decreasing"), ("from_alphas_cumprod", [1.0, 0.5], r"\(0, 1\)"),
     ("from_alphas_cumprod", [0.5, 0.0], r"\(0, 1\)"), ("from_betas", ["a"], "numbers")],
)  # fmt: skip
def test_bad_tables_are_refused(build, values, match):
    with pytest.raises((ValueError, TypeError), match=match):
        getattr(NoiseSchedule, build)(values)


def test_from_scheduler_is_duck_typed():
    from types import SimpleNamespace

    ref = NoiseSchedule("squaredcos_cap_v2", T=40)
    diffusers_like = SimpleNamespace(alphas_cumprod=ref.alphas_cumprod.float(), betas=None,
                                     config={"prediction_type": "sample"})  # fmt: skip
    s = NoiseSchedule.from_scheduler(diffusers_like)
    assert s.prediction == "x0" and "prediction='x0'" in repr(s)
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod, atol=1e-7, rtol=0)
    lucid_like = SimpleNamespace(betas=ref.betas.float(), objective="pred_noise")  # no alphas_cumprod
    assert NoiseSchedule.from_scheduler(lucid_like).prediction == "eps"
    assert NoiseSchedule.from_scheduler(ref) is ref
    with pytest.raises(ValueError, match="cannot train"):
        flow = SimpleNamespace(betas=ref.betas, config=SimpleNamespace(prediction_type="flow"))
        NoiseSchedule.from_scheduler(flow)
    with pytest.raises(ValueError, match="the alphas_cumprod of SimpleNamespace"):
        NoiseSchedule.from_scheduler(SimpleNamespace(alphas_cumprod=[0.5, 0.7]))


def test_budget_radius_at_timesteps():
    sched, t = NoiseSchedule(T=100), torch.tensor([0, 10, 99])
    b = Budget(r_min=0.1, r_scale=0.2, rho=2.0, space="x", norm="l2")
    s = sched.coeffs(t, dtype=torch.float64)[1]
    want = (0.1 + 0.2 * s**2) / s * math.sqrt(12)
    torch.testing.assert_close(b.radius_at(sched, t, numel=12).double(), want, atol=0, rtol=1e-6)
