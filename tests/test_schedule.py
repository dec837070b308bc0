import math

import pytest
import torch

from fastat.budget import Budget
from fastat.schedule import NoiseSchedule


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
