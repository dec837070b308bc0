"""DDPM noise schedules: the per-timestep coefficients of the forward process.

    x_t = a_t * x0 + s_t * eps,   a_t = sqrt(abar_t),  s_t = sqrt(1 - abar_t)

    sched = NoiseSchedule("linear", T=1000)                 # or cosine, scaled_linear, squaredcos_cap_v2
    sched = NoiseSchedule.from_scheduler(scheduler)         # diffusers, lucidrains' GaussianDiffusion
    sched = NoiseSchedule.from_betas(betas)                 # or from_alphas_cumprod(abar)
    a, s = sched.coeffs(t)

One small object holds the tables (computed in float64) and hands out per-sample coefficients on the
device and dtype of the request, caching one copy of each table per (device, dtype). Named schedules
follow diffusers' ``beta_schedule`` names: ``linear`` (DDPM), ``scaled_linear`` (betas linear in
sqrt(beta), Stable Diffusion's), ``squaredcos_cap_v2`` (Nichol & Dhariwal's cosine; ``cosine`` is the
same schedule). A schedule taken from another codebase keeps that codebase's ``alphas_cumprod`` exactly
and remembers its prediction type (``schedule.prediction``) so that a mismatched objective is refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fastat.at.seeding import generator_device
from fastat.utils.checks import SettingError, must, unknown

__all__ = ["SCHEDULES", "NoiseSchedule", "as_schedule"]

SCHEDULES = ("linear", "cosine", "scaled_linear", "squaredcos_cap_v2")


def _linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def _scaled_linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    # diffusers' "scaled_linear": linear in sqrt(beta), squared.
    return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=torch.float64) ** 2


def _cosine_betas(T: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal 2021: abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), betas clipped at max_beta
    # (diffusers' "squaredcos_cap_v2": the normalisation by abar(0) cancels in the ratio).
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def _as_float64_vector(values: Any, name: str) -> torch.Tensor:
    try:
        v = torch.as_tensor(values.detach().cpu() if isinstance(values, torch.Tensor) else values)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(
            f"{name} must be a 1-D sequence of numbers, got {type(values).__name__} ({e})"
        ) from None
    if v.dtype == torch.bool or v.is_complex() or not (v.dtype.is_floating_point or v.dtype in _INT_DTYPES):
        raise TypeError(f"{name} must hold real numbers, got {v.dtype}")
    v = v.to(torch.float64)
    if v.dim() != 1 or v.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} must be finite")
    return v


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class NoiseSchedule:
    """Discrete DDPM schedule with ``T`` steps, timesteps ``t`` in ``[0, T)``.

    >>> sched = NoiseSchedule("linear", T=1000)
    >>> a, s = sched.coeffs(torch.tensor([0, 999]))

    ``kind`` is the schedule's name, or ``custom`` for one built from tables. ``prediction`` is the
    prediction type the source codebase trains (``eps``, ``v``, ``x0``), or None when unknown.
    """

    def __init__(
        self,
        kind: str = "linear",
        T: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> None:
        if kind not in SCHEDULES:
            raise unknown("kind", kind, SCHEDULES, display="noise schedule")
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise must("T", "a positive integer", T)
        if kind in ("linear", "scaled_linear") and not (0 < beta_start <= beta_end < 1):
            got = f"got {beta_start}, {beta_end}"
            raise SettingError("beta_start", f"need 0 < {{name}} <= beta_end < 1, {got}")
        if kind == "linear":
            betas = _linear_betas(T, beta_start, beta_end)
        elif kind == "scaled_linear":
            betas = _scaled_linear_betas(T, beta_start, beta_end)
        else:
            betas = _cosine_betas(T)
        self.beta_start, self.beta_end = beta_start, beta_end
        self._set(kind, betas, torch.cumprod(1.0 - betas, dim=0), None)

    def _set(self, kind: str, betas: torch.Tensor, abar: torch.Tensor, prediction: str | None) -> None:
        self.kind, self.T = kind, int(betas.numel())
        self.betas = betas  # float64, CPU: the definition
        self.alphas_cumprod = abar
        self.prediction = prediction
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}

    # -- schedules from other codebases ----------------------------------------------------------------

    @classmethod
    def from_betas(cls, betas: Any, *, prediction: str | None = None) -> NoiseSchedule:
        """The schedule with these per-step ``betas`` (any 1-D sequence, each in ``(0, 1)``)."""
        b = _as_float64_vector(betas, "betas")
        if not ((b > 0).all() and (b < 1).all()):
            raise ValueError(
                "betas must all lie in (0, 1): beta = 0 leaves a step without noise, 1 destroys x0"
            )
        return cls._custom(b, torch.cumprod(1.0 - b, dim=0), prediction)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Any, *, prediction: str | None = None) -> NoiseSchedule:
        """The schedule with these ``abar_t`` (strictly decreasing in ``(0, 1)``), kept exactly."""
        ab = _as_float64_vector(alphas_cumprod, "alphas_cumprod")
        if not ((ab > 0).all() and (ab < 1).all() and (ab[1:] < ab[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing and lie in (0, 1)")
        prev = torch.cat([ab.new_ones(1), ab[:-1]])
        return cls._custom(1.0 - ab / prev, ab, prediction)

    @classmethod
    def from_scheduler(cls, obj: Any) -> NoiseSchedule:
        """The schedule of another codebase's scheduler object, duck-typed (nothing is imported).

        Reads ``alphas_cumprod`` (else ``betas``): diffusers' schedulers (``DDPMScheduler``,
        ``DDIMScheduler``, ...) and denoising-diffusion-pytorch's ``GaussianDiffusion`` have both. The
        prediction type comes from ``obj.config.prediction_type`` (diffusers) or ``obj.objective``
        (denoising-diffusion-pytorch) when present.
        """
        if isinstance(obj, NoiseSchedule):
            return obj
        prediction = _prediction_of(obj)
        for name, build in (("alphas_cumprod", cls.from_alphas_cumprod), ("betas", cls.from_betas)):
            values = getattr(obj, name, None)
            if values is not None:
                try:
                    return build(values, prediction=prediction)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"the {name} of {type(obj).__name__}: {e}") from None
        raise TypeError(
            f"cannot read a noise schedule from {type(obj).__name__}: no alphas_cumprod and no betas "
            f"(pass a NoiseSchedule, a diffusers scheduler, a denoising-diffusion-pytorch GaussianDiffusion, "
            f"or build one with NoiseSchedule.from_betas / from_alphas_cumprod)"
        )

    @classmethod
    def _custom(cls, betas: torch.Tensor, abar: torch.Tensor, prediction: str | None) -> NoiseSchedule:
        from fastat.at.prediction import canonical_prediction

        sched = cls.__new__(cls)
        sched.beta_start = sched.beta_end = None
        sched._set("custom", betas, abar, None if prediction is None else canonical_prediction(prediction))
        return sched

    # -- tables and coefficients -----------------------------------------------------------------------

    def __repr__(self) -> str:
        pred = f", prediction={self.prediction!r}" if self.prediction else ""
        return f"NoiseSchedule({self.kind!r}, T={self.T}{pred})"

    def tables(self, device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """All per-timestep tables (``betas``, ``abar``, ``a``, ``s``) on ``device`` in ``dtype``."""
        key = (torch.device(device) if device is not None else torch.device("cpu"), dtype)
        if key not in self._cache:
            abar = self.alphas_cumprod
            tabs = {"betas": self.betas, "abar": abar, "a": abar.sqrt(), "s": (1 - abar).sqrt()}
            self._cache[key] = {k: v.to(device=key[0], dtype=dtype) for k, v in tabs.items()}
        return self._cache[key]

    def _gather(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex:
            raise TypeError("timesteps t must be an integer tensor")
        return self.tables(t.device, dtype)[name][t]

    def coeffs(
        self, t: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample ``(a_t, s_t)`` for integer timesteps ``t`` (any shape), on ``t``'s device."""
        return self._gather("a", t, dtype), self._gather("s", t, dtype)

    def abar(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._gather("abar", t, dtype)

    def beta(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._gather("betas", t, dtype)

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniform timesteps in ``[0, T)`` drawn from ``generator`` (on its device), moved to ``device``."""
        gdev = generator_device(generator)
        t = torch.randint(0, self.T, (batch,), generator=generator, device=gdev)
        return t.to(device) if device is not None else t


def as_schedule(obj: Any) -> NoiseSchedule:
    """``obj`` if it is a :class:`NoiseSchedule`, else :meth:`NoiseSchedule.from_scheduler` of it."""
    return obj if isinstance(obj, NoiseSchedule) else NoiseSchedule.from_scheduler(obj)


def _prediction_of(obj: Any) -> str | None:
    """The prediction type a scheduler object declares (diffusers' config, lucidrains' objective)."""
    from fastat.at.prediction import canonical_prediction

    config = getattr(obj, "config", None)
    name = (
        config.get("prediction_type")
        if isinstance(config, dict)
        else getattr(config, "prediction_type", None)
    )
    if name is None:
        name = getattr(obj, "objective", None)
    if not isinstance(name, str):
        return None
    try:
        return canonical_prediction(name)
    except ValueError:
        raise ValueError(
            f"{type(obj).__name__} declares the prediction type {name!r}, which fastat cannot train "
            f"(it supports eps, v and x0)"
        ) from None
