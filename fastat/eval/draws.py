"""The seeded draws of a report: what is measured (:class:`MeasureSpec`), its samples and its attack.

Every random draw of a report comes from ``seed`` and a fixed offset per purpose, so ``fastat eval`` and
the training loop's final evaluation measure the very same samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastat.at.sampling import SamplerSpec
from fastat.eval.trajectory import AttackSpec, TrajectoryAttackResult, trajectory_attack

__all__ = ["PSNR_TIMESTEPS", "MeasureSpec", "draw_samples", "run_attack", "seeded_noise"]

PSNR_TIMESTEPS = (10, 50, 100, 250, 500)
# offsets of the seeded streams (seed * 1000 + offset)
NOISE, SAMPLER, FRESH, FLOOR, ATTACK = 101, 102, 103, 104, 106


@dataclass(frozen=True)
class MeasureSpec:
    """What a report measures: ``n`` samples drawn with ``sampler``, every draw seeded from ``seed``;
    ``attack``: the trajectory attack (None: none); ``psnr_ts``: the x0_hat PSNR timesteps of image sets
    (None: :data:`PSNR_TIMESTEPS`, given for T = 1000, scaled to the run's T)."""

    n: int = 1000
    seed: int = 0
    sampler: SamplerSpec = SamplerSpec()
    attack: AttackSpec | None = None
    psnr_ts: tuple[int, ...] | None = None


def seeded_noise(n: int, shape: Sequence[int], seed: int, offset: int) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed * 1000 + offset))


def draw_samples(model, schedule, shape, spec: MeasureSpec, device, spread=None, progress: bool = False):
    """The report's ``spec.n`` samples from its seeded noise; with ``spread``
    (:meth:`fastat.train.distributed.DistContext.spread`) each rank samples its rows (with its own sampler
    noise) and rank 0 gets them all, the others ``None``. ``progress``: a tqdm bar."""
    from fastat.at.seeding import derive_seed
    from fastat.train.samples import generate

    def part(rows: torch.Tensor, start: int) -> torch.Tensor:
        s = spec.seed * 1000 + SAMPLER
        g = torch.Generator().manual_seed(derive_seed(s, f"rows@{start}") if start else s)
        return generate(model, schedule, rows, spec.sampler, generator=g, device=device, progress=progress)

    noise = seeded_noise(spec.n, shape, spec.seed, NOISE)
    return part(noise, 0) if spread is None else spread(part, noise)


def run_attack(model, schedule, shape, spec: MeasureSpec, device) -> TrajectoryAttackResult:
    """The trajectory attack ``spec.attack`` from the report's own seeded noise."""
    noise = seeded_noise(spec.attack.n, shape, spec.seed, ATTACK)
    seed = spec.seed * 1000 + ATTACK
    return trajectory_attack(model, schedule, noise, spec.attack, spec.sampler, seed=seed, device=device)
