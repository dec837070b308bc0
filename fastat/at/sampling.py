"""Samplers for denoisers ``model(x, t)``: DDPM ancestral (Ho et al. 2020) and DDIM (Song et al. 2021).

    gen = torch.Generator().manual_seed(0)
    x = ddpm_sample(ema_model, sched, (64, 3, 32, 32), generator=gen, clip_x0=1.0)
    x = ddim_sample(ema_model, sched, fixed_noise, steps=50, eta=0.0, clip_x0=1.0)
    x = ddim_sample(unet, ddpm_scheduler, (16, 3, 32, 32), prediction="v")   # a diffusers model and scheduler

Any output type and prediction (:mod:`fastat.at.prediction`), any schedule or scheduler. Both run under
``torch.no_grad`` in float32 on the whole batch, in eval mode (each module's flag restored after). Every
random draw comes from ``generator`` on its own device, so a seed reproduces the samples bit for bit; the
per-step coefficients are Python floats computed once in float64: no host sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Real

import torch
from torch import nn

from fastat.at.prediction import model_output, resolve_prediction, to_eps, to_x0
from fastat.at.schedule import NoiseSchedule, as_schedule
from fastat.at.seeding import generator_device

__all__ = [
    "Guided",
    "SAMPLERS",
    "SamplerSpec",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "initial_noise",
    "model_device",
    "run_plan",
    "sampling_plan",
]

ShapeOrNoise = Sequence[int] | torch.Size | torch.Tensor
SAMPLERS = ("ddim", "ddpm")


@dataclass(frozen=True)
class SamplerSpec:
    """How samples are drawn: ``sampler`` (ddim | ddpm), DDIM ``steps`` and ``eta`` (ddpm visits all T
    steps), and ``clip_x0`` (clamp of x0_hat to ``[-clip_x0, clip_x0]``; None: no clamp)."""

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    clip_x0: float | None = None

    def check(self, T: int) -> SamplerSpec:
        """``self`` if it is valid for a schedule of ``T`` steps, else ValueError (one line)."""
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose ddim or ddpm")
        if self.sampler == "ddim":
            if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= T:
                raise ValueError(f"sampler steps must be in [1, T={T}], got {self.steps!r}")
            if isinstance(self.eta, bool) or not isinstance(self.eta, Real) or not 0.0 <= self.eta <= 1.0:
                raise ValueError(f"DDIM eta must be a number in [0, 1], got {self.eta!r}")
        if self.clip_x0 is not None and not (isinstance(self.clip_x0, Real) and self.clip_x0 > 0):
            raise ValueError(f"clip_x0 must be None or a positive number, got {self.clip_x0!r}")
        return self

    def visited(self, T: int) -> int:
        """Model calls per sample: DDIM's ``steps``, DDPM's ``T``."""
        return self.steps if self.sampler == "ddim" else T


class Guided(nn.Module):
    """A class-conditional ``model(x, t, y)`` as the ``model(x, t)`` the samplers call, with classifier-free
    guidance ``eps = eps(x, t, null) + guidance * (eps(x, t, y) - eps(x, t, null))`` (the null label is
    ``-1``): ``guidance = 1`` is the conditional model alone (one call), ``0`` the unconditional one;
    above 1 both halves run as one batch. ``y``: one class (an int) or a label per sample ``(B,)``."""

    def __init__(self, model: nn.Module, y: int | torch.Tensor, guidance: float = 1.0) -> None:
        super().__init__()
        self.model, self.y, self.guidance = model, y, float(guidance)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        B = x.shape[0]
        y = torch.as_tensor(self.y, dtype=torch.long, device=x.device).expand(B)
        t = torch.as_tensor(t, device=x.device).expand(B)
        if self.guidance == 1.0:
            return self.model(x, t, y)
        if self.guidance == 0.0:
            return self.model(x, t, torch.full_like(y, -1))
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, -1)]))
        cond, uncond = both.chunk(2)
        return uncond + self.guidance * (cond - uncond)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gdev = generator_device(generator, device)
    return torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32).to(device)


def initial_noise(shape_or_noise: ShapeOrNoise, generator: torch.Generator | None, device: torch.device):
    if isinstance(shape_or_noise, torch.Tensor):
        if not shape_or_noise.dtype.is_floating_point:
            raise TypeError(f"starting noise must be a floating tensor, got {shape_or_noise.dtype}")
        if shape_or_noise.dim() < 1 or shape_or_noise.numel() == 0:
            raise ValueError(
                f"starting noise must be a non-empty batch, got shape {tuple(shape_or_noise.shape)}"
            )
        return shape_or_noise.detach().to(device=device, dtype=torch.float32)
    shape = tuple(shape_or_noise)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(
            f"shape must be a non-empty tuple of positive ints (batch first), got {shape_or_noise!r}"
        )
    return _randn(shape, generator, device)


def _check_common(schedule, clip_x0: float | None, prediction: str | None) -> tuple[NoiseSchedule, str]:
    """The schedule as a NoiseSchedule and the resolved prediction type; checks ``clip_x0``."""
    schedule = as_schedule(schedule)
    if clip_x0 is not None and not (isinstance(clip_x0, Real) and clip_x0 > 0):
        raise ValueError(f"clip_x0 must be None or a positive number, got {clip_x0!r}")
    return schedule, resolve_prediction(prediction, schedule.prediction)


def _progress(it: Sequence[int], progress, desc: str):
    if progress is None or progress is False:
        return it
    if hasattr(progress, "update"):  # a bar shared by several batches (fastat.train.samples.generate)
        return _ticking(it, progress)
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=len(it))


def _ticking(it: Sequence[int], bar):
    for item in it:
        yield item
        bar.update(1)


def _predict_x0(model, x, t, a_t, s_t, clip_x0, prediction="eps"):
    """The noise and clean-sample estimates ``(eps, x0)`` from the model's output (for an eps-model
    ``x0 = (x - s_t eps) / a_t``); x0 optionally clamped, eps then re-derived from it."""
    tb = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    out = model_output(model(x, tb)).float()
    eps, x0 = to_eps(prediction, out, x, a_t, s_t), to_x0(prediction, out, x, a_t, s_t)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = (x - a_t * x0) / s_t
    return eps, x0


def sampling_plan(
    schedule: NoiseSchedule, sampler: str = "ddim", steps: int = 50, eta: float = 0.0
) -> list[tuple]:
    """Per step, newest timestep first: ``(t, a_t, s_t, c0, c1, sigma, kind)`` as float64-derived floats.

    One step is ``x <- c0 * x0_hat + c1 * (eps if kind == "ddim" else x) + sigma * z``:
    DDIM (Song et al. 2021, eq. 12) on ``ddim_timesteps(T, steps)`` with ``c0 = sqrt(abar_prev)``,
    ``c1`` the direction coefficient; DDPM ancestral over all T steps with the posterior mean
    coefficients and ``sigma = sqrt(beta_tilde_t)`` (0 at ``t = 0``).
    """
    tab = schedule.tables("cpu", torch.float64)
    if sampler == "ddim":
        ts = ddim_timesteps(schedule.T, steps)
        if isinstance(eta, bool) or not isinstance(eta, Real) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"DDIM eta must be a number in [0, 1], got {eta!r}")
        abar = tab["abar"].tolist()
        plan = []
        for i, t in enumerate(ts):
            ab_t, ab_p = abar[t], (abar[ts[i - 1]] if i > 0 else 1.0)
            sigma = eta * math.sqrt(max((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p), 0.0))
            c_dir = math.sqrt(max(1 - ab_p - sigma**2, 0.0))
            plan.append((t, math.sqrt(ab_t), math.sqrt(1 - ab_t), math.sqrt(ab_p), c_dir, sigma, "ddim"))
        return plan[::-1]
    if sampler == "ddpm":
        betas, abar = tab["betas"], tab["abar"]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        c_x0 = (betas * abar_prev.sqrt() / (1 - abar)).tolist()
        c_xt = ((1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)).tolist()
        sd = (betas * (1 - abar_prev) / (1 - abar)).sqrt().tolist()
        a, s = tab["a"].tolist(), tab["s"].tolist()
        return [
            (t, a[t], s[t], c_x0[t], c_xt[t], sd[t] if t > 0 else 0.0, "ddpm")
            for t in range(schedule.T - 1, -1, -1)
        ]
    raise ValueError(f"unknown sampler {sampler!r}; choose ddim or ddpm")


def run_plan(
    model: nn.Module,
    plan: list[tuple],
    x: torch.Tensor,
    *,
    generator: torch.Generator | None,
    clip_x0: float | None = None,
    before_step: Callable[[torch.Tensor, tuple], torch.Tensor] | None = None,
    progress: bool = False,
    desc: str = "sample",
    prediction: str = "eps",
) -> torch.Tensor:
    """Run a :func:`sampling_plan` from ``x`` (``x_T``) in eval mode. ``before_step(x, step)`` may replace
    ``x`` before a step (the trajectory attack); it runs outside ``no_grad``. ``prediction``: what the
    model outputs (``eps``, ``v``, ``x0``)."""
    with _eval_mode(model):
        for step in _progress(plan, progress, desc):
            t, a_t, s_t, c0, c1, sigma, kind = step
            if before_step is not None:
                x = before_step(x, step)
            with torch.no_grad():
                eps, x0 = _predict_x0(model, x, t, a_t, s_t, clip_x0, prediction)
                x = c0 * x0 + c1 * (eps if kind == "ddim" else x)
                if sigma > 0:
                    x = x + sigma * _randn(tuple(x.shape), generator, x.device)
    return x


def ddpm_sample(
    model: nn.Module,
    schedule: NoiseSchedule,
    shape_or_noise: ShapeOrNoise,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    clip_x0: float | None = None,
    progress: bool = False,
    prediction: str | None = None,
) -> torch.Tensor:
    """Ancestral sampling over all ``schedule.T`` steps with the posterior variance ``beta_tilde``.

    ``shape_or_noise`` is the full batch shape (noise drawn from ``generator``) or the starting ``x_T``.
    Each step: ``x0 = (x_t - s_t eps) / a_t`` (clamped to ``[-clip_x0, clip_x0]`` if given), then
    ``x_{t-1} ~ N(mu_tilde(x_t, x0), beta_tilde_t I)``; no noise is added at ``t = 0``.
    Returns float32 samples on the model's device (or ``device``).
    """
    schedule, prediction = _check_common(schedule, clip_x0, prediction)
    dev = model_device(model, device)
    plan = sampling_plan(schedule, "ddpm")
    x = initial_noise(shape_or_noise, generator, dev)
    return run_plan(model, plan, x, generator=generator, clip_x0=clip_x0, progress=progress, desc="ddpm",
                    prediction=prediction)  # fmt: skip


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps in ``[0, T)``, ascending, always ending at ``T - 1``.

    ``t_i = floor((i + 1) T / steps) - 1``: all distinct, ``steps = T`` gives every timestep and
    ``steps = 1`` a single step from ``T - 1`` straight to ``x0``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"DDIM steps must be an integer in [1, T={T}], got {steps!r}")
    return [(i + 1) * T // steps - 1 for i in range(steps)]


def ddim_sample(
    model: nn.Module,
    schedule: NoiseSchedule,
    shape_or_noise: ShapeOrNoise,
    *,
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    clip_x0: float | None = None,
    progress: bool = False,
    prediction: str | None = None,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) on ``steps`` evenly spaced timesteps (``ddim_timesteps``).

    ``eta = 0`` is the deterministic sampler; ``eta = 1`` with ``steps = T`` is DDPM ancestral sampling with
    ``beta_tilde`` (same noise draws, so the same samples up to rounding). The last step jumps to ``x0``.
    """
    schedule, prediction = _check_common(schedule, clip_x0, prediction)
    plan = sampling_plan(schedule, "ddim", steps, eta)
    dev = model_device(model, device)
    x = initial_noise(shape_or_noise, generator, dev)
    return run_plan(model, plan, x, generator=generator, clip_x0=clip_x0, progress=progress, desc="ddim",
                    prediction=prediction)  # fmt: skip
