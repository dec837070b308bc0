"""DDPM noise schedules: the per-timestep coefficients of the forward process.

    x_t = a_t * x0 + s_t * eps,   a_t = sqrt(abar_t),  s_t = sqrt(1 - abar_t)

One small object holds the tables (computed in float64) and hands out per-sample coefficients on the
device and dtype of the request, caching one copy of each table per (device, dtype).
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def _linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def _cosine_betas(T: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal 2021: abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), betas clipped at max_beta.
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


class NoiseSchedule:
    """Discrete DDPM schedule with ``T`` steps, timesteps ``t`` in ``[0, T)``.

    >>> sched = NoiseSchedule("linear", T=1000)
    >>> a, s = sched.coeffs(torch.tensor([0, 999]))
    """

    def __init__(
        self,
        kind: str = "linear",
        T: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be a positive integer, got {T!r}")
        if kind == "linear" and not (0 < beta_start <= beta_end < 1):
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        self.kind, self.T = kind, T
        self.beta_start, self.beta_end = beta_start, beta_end
        betas = _linear_betas(T, beta_start, beta_end) if kind == "linear" else _cosine_betas(T)
        self.betas = betas  # float64, CPU: the definition
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.kind!r}, T={self.T})"

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

    def coeffs(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample ``(a_t, s_t)`` for integer timesteps ``t`` (any shape), on ``t``'s device."""
        return self._gather("a", t, dtype), self._gather("s", t, dtype)

    def abar(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._gather("abar", t, dtype)

    def beta(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._gather("betas", t, dtype)

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniform timesteps in ``[0, T)`` drawn from ``generator`` (on its device), moved to ``device``."""
        gdev = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, self.T, (batch,), generator=generator, device=gdev)
        return t.to(device) if device is not None else t
