"""DDPM and DDIM samplers: reproducibility, argument checks, and exactness on Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastat.at.sampling import ddim_sample, ddim_timesteps, ddpm_sample
from fastat.at.schedule import NoiseSchedule
from fastat.models import MLP, UNet

T_SMALL = 40


class GaussianEps(nn.Module):
    """The exact noise predictor for data ``x0 ~ N(mu, diag(sigma^2))``.

    ``x_t = a x0 + s eps`` is Gaussian, so ``E[eps | x_t] = s (x_t - a mu) / (a^2 sigma^2 + s^2)``.
    """

    def __init__(self, schedule: NoiseSchedule, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        super().__init__()
        self.schedule = schedule
        self.register_buffer("mu", mu)
        self.register_buffer("sigma", sigma)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.schedule.coeffs(t, dtype=torch.float64)
        a, s = a[:, None], s[:, None]
        return (s * (x - a * self.mu) / (a**2 * self.sigma**2 + s**2)).to(x.dtype)


class ModeProbe(nn.Module):
    """Records the train/eval flag it saw at each call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training)
        return self.lin(x)


@pytest.fixture
def sched() -> NoiseSchedule:
    return NoiseSchedule("linear", T=T_SMALL, beta_start=1e-3, beta_end=0.2)


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(2, hidden=32, depth=2)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


SAMPLERS = {
    "ddpm": lambda m, s, x, **kw: ddpm_sample(m, s, x, **kw),
    "ddim": lambda m, s, x, **kw: ddim_sample(m, s, x, steps=10, **kw),
    "ddim_eta": lambda m, s, x, **kw: ddim_sample(m, s, x, steps=7, eta=0.5, **kw),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_shape_dtype_and_seed(name, mlp, sched):
    sample = SAMPLERS[name]
    a = sample(mlp, sched, (16, 2), generator=_gen(1))
    b = sample(mlp, sched, (16, 2), generator=_gen(1))
    c = sample(mlp, sched, (16, 2), generator=_gen(2))
    assert a.shape == (16, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not a.requires_grad


@pytest.mark.parametrize("name", SAMPLERS)
def test_noise_tensor_is_used(name, mlp, sched):
    sample = SAMPLERS[name]
    # A shape draws x_T as the generator's first normal batch, then the per-step noise: drawing that
    # batch ourselves from the same generator and passing it gives the same samples, bit for bit.
    gen = _gen(5)
    noise = torch.randn(8, 2, generator=gen)
    noise_copy = noise.clone()
    from_noise = sample(mlp, sched, noise, generator=gen)
    from_shape = sample(mlp, sched, (8, 2), generator=_gen(5))
    assert torch.equal(from_noise, from_shape)
    assert torch.equal(noise, noise_copy)  # not modified
    other = sample(mlp, sched, torch.randn(8, 2, generator=_gen(6)), generator=_gen(5))
    assert not torch.allclose(other, from_noise)


def test_deterministic_ddim_depends_only_on_noise(mlp, sched):
    noise = torch.randn(8, 2, generator=_gen(3))
    a = ddim_sample(mlp, sched, noise, steps=5, generator=_gen(0))
    b = ddim_sample(mlp, sched, noise, steps=5)
    assert torch.equal(a, b)


def test_ddim_full_steps_eta_one_is_ddpm(mlp, sched):
    # With steps = T and eta = 1, DDIM's sigma_t^2 is beta_tilde_t and the noise draws line up with DDPM's.
    ddpm = ddpm_sample(mlp, sched, (64, 2), generator=_gen(7))
    ddim = ddim_sample(mlp, sched, (64, 2), steps=sched.T, eta=1.0, generator=_gen(7))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("training", [True, False])
def test_mode_restored(name, sched, training):
    probe = ModeProbe().train(training)
    SAMPLERS[name](probe, sched, (4, 2), generator=_gen(0))
    assert probe.seen and not any(probe.seen)  # sampled in eval mode
    assert probe.training is training and probe.lin.training is training


def test_mixed_modes_restored(sched):
    model = MLP(2, hidden=8, depth=2).train()
    model.blocks[0].eval()
    ddim_sample(model, sched, (4, 2), steps=3, generator=_gen(0))
    assert model.training and not model.blocks[0].training and model.blocks[1].training


def test_ddim_timesteps():
    T = 1000
    assert ddim_timesteps(T, T) == list(range(T))
    assert ddim_timesteps(T, 1) == [T - 1]
    for steps in (2, 3, 7, 50, 333, 999):
        ts = ddim_timesteps(T, steps)
        assert len(ts) == steps and ts[-1] == T - 1 and ts[0] >= 0
        gaps = [b - a for a, b in zip(ts[:-1], ts[1:], strict=True)]
        assert min(gaps) >= 1 and max(gaps) - min(gaps) <= 1  # evenly spaced, distinct


def test_clip_x0(mlp, sched):
    # One DDIM step lands on the predicted x0, so the output is the clamped prediction.
    noise = 10 * torch.randn(32, 2, generator=_gen(0))
    out = ddim_sample(mlp, sched, noise, steps=1, clip_x0=0.5)
    assert out.abs().max() <= 0.5 and out.abs().max() > 0.4
    clipped = ddpm_sample(mlp, sched, noise, clip_x0=1.0, generator=_gen(0))
    assert torch.isfinite(clipped).all()


def test_unet_grid_sampling(sched):
    torch.manual_seed(0)
    model = UNet("tiny", image_size=8)
    noise = torch.randn(2, *model.sample_shape, generator=_gen(0))
    out = ddim_sample(model, sched, noise, steps=3, clip_x0=1.0, progress=True)
    assert out.shape == (2, 3, 8, 8) and out.abs().max() <= 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps"),
        ({"steps": T_SMALL + 1}, "steps"),
        ({"steps": 2.0}, "steps"),
        ({"steps": True}, "steps"),
        ({"eta": -0.1}, "eta"),
        ({"eta": 1.5}, "eta"),
        ({"eta": float("nan")}, "eta"),
        ({"clip_x0": 0.0}, "clip_x0"),
        ({"clip_x0": -1.0}, "clip_x0"),
    ],
)
def test_ddim_bad_arguments(mlp, sched, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ddim_sample(mlp, sched, (4, 2), **{"steps": 5, **kwargs})


@pytest.mark.parametrize("shape", [(), (0, 2), (4, -1), (4, 2.0)])
def test_bad_shape(mlp, sched, shape):
    with pytest.raises(ValueError, match="shape"):
        ddpm_sample(mlp, sched, shape)
    with pytest.raises(ValueError, match="shape"):
        ddim_sample(mlp, sched, shape, steps=5)


def test_bad_schedule_and_noise(mlp, sched):
    with pytest.raises(TypeError, match="NoiseSchedule"):
        ddpm_sample(mlp, None, (4, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating"):
        ddim_sample(mlp, sched, torch.zeros(4, 2, dtype=torch.long), steps=5)


# ---------------------------------------------------------------------------- exactness on Gaussians

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 1.5], dtype=torch.float64)
N = 10_000


def _check_moments(x: torch.Tensor, schedule: NoiseSchedule, std_bias: float) -> None:
    """Mean within 4 standard errors plus the bias of starting from N(0, I) instead of N(a_T mu, .);
    std within 4 standard errors (relative) plus ``std_bias`` (the sampler's discretisation error)."""
    x = x.double()
    a_T = schedule.tables("cpu", torch.float64)["a"][-1]
    mean_tol = 4 * SIGMA / math.sqrt(N) + a_T * SIGMA * MU.abs()
    assert ((x.mean(0) - MU).abs() <= mean_tol).all(), (x.mean(0), MU, mean_tol)
    rel = x.std(0) / SIGMA - 1
    assert (rel.abs() <= 4 / math.sqrt(2 * N) + std_bias).all(), rel


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_gaussian_ddpm_exact(kind):
    schedule = NoiseSchedule(kind, T=1000)
    model = GaussianEps(schedule, MU, SIGMA)
    x = ddpm_sample(model, schedule, (N, 2), generator=_gen(0))
    _check_moments(x, schedule, std_bias=0.01)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_gaussian_ddim_exact(kind):
    schedule = NoiseSchedule(kind, T=1000)
    model = GaussianEps(schedule, MU, SIGMA)
    x = ddim_sample(model, schedule, (N, 2), steps=100, eta=0.0, generator=_gen(0))
    _check_moments(x, schedule, std_bias=0.04)  # measured: DDIM-100 shrinks the std by ~1.5-3%


def test_gaussian_sampler_detects_a_wrong_model():
    # The moment check is sharp enough to reject a predictor for the wrong data distribution.
    schedule = NoiseSchedule("cosine", T=1000)
    wrong = GaussianEps(schedule, MU + 0.2, SIGMA * 1.1)
    x = ddim_sample(wrong, schedule, (N, 2), steps=100, generator=_gen(0))
    with pytest.raises(AssertionError):
        _check_moments(x, schedule, std_bias=0.04)
