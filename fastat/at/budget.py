"""The perturbation budget r(t): how far the attack may move the noise at each timestep.

    r(t) = r_min + r_scale * s_t ** rho             (space="x": bound on |s_t w|; space="eps": on |w|)

    budget = Budget()                        # r_min=0.2, r_scale=0.3, rho=1, space="x", norm="linf"
    r = budget.radius_at(schedule, t)        # (B,) bound on w at the timesteps t: what ops.noise_inject takes

Always returned as the bound on ``w`` (x-space divided by ``s_t``). For ``norm="l2"`` the number is the
per-element RMS bound (the ball's radius scales with ``sqrt(numel)``). Why ``r_min``: docs/DESIGN.md
("Noise injection").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastat.at.seeding import generator_device
from fastat.kernels.pgd import NORMS
from fastat.utils.checks import SettingError, is_number, must, unknown

SPACES = ("x", "eps")


@dataclass(frozen=True)
class Budget:
    r_min: float = 0.2
    r_scale: float = 0.3
    rho: float = 1.0
    space: str = "x"
    norm: str = "linf"

    def __post_init__(self) -> None:
        for name in ("r_min", "r_scale"):
            v = getattr(self, name)
            if not (is_number(v) and v >= 0):
                raise must(name, "a finite number >= 0", v, display=f"budget {name}")
        if not (is_number(self.rho) and self.rho > 0):
            raise must("rho", "a finite number > 0", self.rho, display="budget rho")
        if self.r_min == 0 and self.r_scale == 0:
            raise SettingError("r_min", "the budget is empty: {name} = r_scale = 0 (mode ddpm: no attack)")
        if self.space not in SPACES:
            raise unknown("space", self.space, SPACES, display="budget space")
        if self.norm not in NORMS:
            raise unknown("norm", self.norm, NORMS)

    def radius(self, s: torch.Tensor, numel: int = 1) -> torch.Tensor:
        """Per-sample bound on ``w`` (eps space) for noise levels ``s`` of shape ``(B,)``.

        ``numel`` is the number of elements of one sample (used by the L2 ball only).
        """
        s = s.float()
        r = self.r_min + self.r_scale * s.pow(self.rho)
        if self.space == "x":
            r = r / s
        if self.norm == "l2":
            r = r * math.sqrt(numel)
        return r

    def radius_at(self, schedule, t: torch.Tensor, numel: int = 1) -> torch.Tensor:
        """Per-sample bound on ``w`` at integer timesteps ``t`` of ``schedule`` (float32, on ``t``'s device).

        The same as ``radius(schedule.coeffs(t)[1], numel)``: for loops written with :mod:`fastat.at.ops`.
        """
        return self.radius(schedule.coeffs(t)[1], numel)

    def random_start(self, r: torch.Tensor, shape, generator: torch.Generator | None) -> torch.Tensor:
        """``w0`` uniform in the budget: the box ``[-r, r]`` (linf) or the ball of radius ``r`` (l2).

        Drawn from ``generator`` on its own device (float32); the caller moves it to the data.
        """
        gdev = generator_device(generator)
        rb = r.to(gdev).reshape(-1, *([1] * (len(shape) - 1)))
        if self.norm == "linf":
            u = torch.rand(shape, generator=generator, device=gdev)
            return (2 * u - 1) * rb
        d = math.prod(shape[1:])
        z = torch.randn(shape, generator=generator, device=gdev)
        z = z / z.reshape(z.shape[0], -1).norm(dim=1).clamp_min(1e-12).reshape_as(rb)
        u = torch.rand(rb.shape, generator=generator, device=gdev)
        return z * rb * u.pow(1.0 / d)
