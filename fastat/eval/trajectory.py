"""Attacks on the sampling trajectory: perturb ``x_t`` at chosen timesteps, then let sampling go on.

    res = trajectory_attack(ema_model, schedule, noise, AttackSpec(at=(200, 500, 800), radius=0.05))
    res.clean, res.random, res.attacked          # samples from the same noise: none / random / PGD
    res.change, res.change_x0                    # mean prediction changes per attacked timestep

At each attacked timestep PGD (:func:`fastat.at.attack.pgd_attack`) finds ``|d_i| <= radius`` that
maximises the change of ``eps`` (``target="eps"``) or of ``x0_hat`` (``"x0"``); a random corner of the
same box is the control. The three runs share the starting and the sampler noise, so any difference in
the final samples is the attack's doing. An AT denoiser is trained to move ``eps`` with its input, so
read the ``x0`` change and the final samples as the robustness measures. The derivation: docs/DESIGN.md,
"Evaluation".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fastat.at.attack import pgd_attack
from fastat.at.sampling import SamplerSpec, initial_noise, model_device, run_plan, sampling_plan
from fastat.at.schedule import NoiseSchedule

__all__ = [
    "AttackSpec",
    "PERTURBATIONS",
    "TARGETS",
    "TrajectoryAttackResult",
    "sample_with_perturbation",
    "trajectory_attack",
]

PERTURBATIONS = ("none", "random", "pgd")


def _snap(attack_at: Sequence[int], plan: list[tuple], T: int) -> list[int]:
    """Each requested timestep moved to the nearest timestep the sampler visits (duplicates dropped)."""
    visited = [p[0] for p in plan]
    out = []
    for t in attack_at:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < T:
            raise ValueError(f"attack timesteps must be integers in [0, {T}), got {t!r}")
        nearest = min(visited, key=lambda v: (abs(v - t), v))
        if nearest not in out:
            out.append(nearest)
    return sorted(out, reverse=True)


TARGETS = ("eps", "x0")


def _perturb(
    model,
    x: torch.Tensor,
    t: int,
    a_t: float,
    s_t: float,
    kind: str,
    radius: float,
    pgd_steps: int,
    step_size: float,
    target: str,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x + d, change of eps, change of x0_hat)`` for one attacked step (per sample, float32)."""
    B, dev = x.shape[0], x.device
    tb = torch.full((B,), t, device=dev, dtype=torch.long)
    with torch.no_grad():
        eps_clean = model(x, tb).float()
    if kind == "random":
        u = torch.rand(x.shape, generator=gen, device=gen.device).to(dev)
        x_new = x + radius * torch.where(u < 0.5, -1.0, 1.0)
    else:
        d0 = ((2 * torch.rand(x.shape, generator=gen, device=gen.device) - 1) * radius).to(dev)
        s = torch.full((B,), 1.0 if target == "eps" else s_t, device=dev)  # w = d / s
        _, x_new, _ = pgd_attack(
            model, x, tb, s, eps_clean, d0 / s.view(-1, *([1] * (x.dim() - 1))), radius / s,
            step_size * radius / s, pgd_steps, "linf", "prediction" if target == "eps" else "equivariance",
        )  # fmt: skip
    with torch.no_grad():
        delta_eps = model(x_new, tb).float() - eps_clean
        delta_x0 = ((x_new - x) - s_t * delta_eps) / a_t
    flat = (B, -1)
    return x_new.detach(), delta_eps.reshape(flat).square().sum(1), delta_x0.reshape(flat).square().sum(1)


def sample_with_perturbation(
    model: nn.Module,
    schedule: NoiseSchedule,
    noise: torch.Tensor,
    *,
    perturbation: str = "pgd",
    attack_at: Sequence[int] = (),
    radius: float = 0.05,
    pgd_steps: int = 10,
    step_size: float | None = None,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    clip_x0: float | None = None,
    generator: torch.Generator | None = None,
    attack_seed: int = 0,
    target: str = "eps",
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Sample from ``noise`` (the starting ``x_T``) with ``perturbation`` applied at ``attack_at``.

    ``attack_at``: timesteps, each moved to the nearest one the sampler visits. ``radius``: the L-inf
    bound in data units. ``step_size``: PGD step as a multiple of ``radius`` (default ``2.5 /
    pgd_steps``). ``generator`` drives the sampler's own noise; ``attack_seed`` the attack's random
    start (a separate stream, so the sampler's noise is the same with and without the attack).
    ``target``: what PGD maximises, the change of ``eps`` or of ``x0_hat`` (module docstring).
    Returns the samples (float32) and ``{t: (eps change, x0_hat change) per sample}`` per attacked step.
    """
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {perturbation!r}; choose one of {', '.join(PERTURBATIONS)}")
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be > 0, got {radius!r}")
    if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
        raise ValueError(f"pgd_steps must be an integer >= 1, got {pgd_steps!r}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    if target not in TARGETS:
        raise ValueError(f"unknown attack target {target!r}; choose one of {', '.join(TARGETS)}")
    step_size_ = step_size if step_size is not None else 2.5 / pgd_steps
    plan = sampling_plan(schedule, sampler, steps, eta)
    targets = set(_snap(list(attack_at), plan, schedule.T)) if perturbation != "none" else set()
    dev = model_device(model, device)
    gen = torch.Generator().manual_seed(int(attack_seed))
    changes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def before_step(x: torch.Tensor, step: tuple) -> torch.Tensor:
        t, a_t, s_t = step[:3]
        if t not in targets:
            return x
        x, j_eps, j_x0 = _perturb(
            model, x, t, a_t, s_t, perturbation, radius, pgd_steps, step_size_, target, gen
        )
        changes[t] = (j_eps.cpu(), j_x0.cpu())
        return x

    x = initial_noise(noise, generator, dev)
    x = run_plan(model, plan, x, generator=generator, clip_x0=clip_x0, before_step=before_step)
    return x, changes


@dataclass
class TrajectoryAttackResult:
    """Samples from one noise batch without (``clean``), with random (``random``) and with PGD
    (``attacked``) perturbations, and the mean changes of ``eps`` and of ``x0_hat`` (squared norms per
    sample) at each attacked timestep, for the PGD and the random perturbation."""

    clean: torch.Tensor
    random: torch.Tensor
    attacked: torch.Tensor
    timesteps: list[int]
    radius: float
    target: str = "eps"
    change: dict[int, float] = field(default_factory=dict)  # PGD: mean ||delta eps||^2 per timestep
    change_random: dict[int, float] = field(default_factory=dict)
    change_x0: dict[int, float] = field(default_factory=dict)  # PGD: mean ||delta x0_hat||^2
    change_x0_random: dict[int, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Flat floats: mean J (PGD, random), the shift of the final samples (RMS per element)."""

        def rms(a, b):
            return (a - b).reshape(a.shape[0], -1).square().mean(dim=1).sqrt().mean().item()

        out = {f"change_pgd_t{t}": v for t, v in self.change.items()}
        out.update({f"change_random_t{t}": v for t, v in self.change_random.items()})
        out.update({f"x0change_pgd_t{t}": v for t, v in self.change_x0.items()})
        out.update({f"x0change_random_t{t}": v for t, v in self.change_x0_random.items()})
        out["shift_pgd"] = rms(self.attacked, self.clean)
        out["shift_random"] = rms(self.random, self.clean)
        out["attack_radius"] = self.radius
        out["attack_target"] = self.target
        return out


@dataclass(frozen=True)
class AttackSpec:
    """The trajectory attack of a report: ``n`` samples, perturbed at the timesteps ``at`` (moved to the
    nearest the sampler visits) within an L-inf ``radius`` (data units), ``steps`` PGD steps each,
    maximising the change of ``target`` (``eps`` or ``x0``)."""

    n: int = 256
    at: tuple[int, ...] = (200, 500, 800)
    radius: float = 0.05
    steps: int = 10
    target: str = "eps"

    def settings(self) -> dict:
        """The report's ``attack_*`` settings (eval.json)."""
        return {"attack_n": self.n, "attack_at": list(self.at), "attack_radius": self.radius,
                "attack_steps": self.steps, "attack_target": self.target}  # fmt: skip


def trajectory_attack(
    model: nn.Module,
    schedule: NoiseSchedule,
    noise: torch.Tensor,
    attack: AttackSpec | None = None,
    sampler: SamplerSpec | None = None,
    *,
    step_size: float | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> TrajectoryAttackResult:
    """Sample ``noise`` three times (no / random / PGD perturbation at ``attack.at``) with identical
    sampler noise (from ``seed``) and return the three sample sets with the prediction changes.
    ``attack.n`` is not used here: ``noise`` sets the number of samples. Defaults: ``AttackSpec()``,
    ``SamplerSpec()``."""
    attack, sampler = attack or AttackSpec(), sampler or SamplerSpec()
    kw = dict(
        attack_at=tuple(attack.at),
        radius=attack.radius,
        pgd_steps=attack.steps,
        step_size=step_size,
        sampler=sampler.sampler,
        steps=sampler.steps,
        eta=sampler.eta,
        clip_x0=sampler.clip_x0,
        attack_seed=seed + 1,
        target=attack.target,
        device=device,
    )
    runs = {}
    for kind in PERTURBATIONS:
        g = torch.Generator().manual_seed(int(seed))
        runs[kind] = sample_with_perturbation(model, schedule, noise, perturbation=kind, generator=g, **kw)
    ts = sorted(runs["pgd"][1], reverse=True)

    def mean(kind: str, i: int) -> dict[int, float]:
        return {t: runs[kind][1][t][i].double().mean().item() for t in ts}

    return TrajectoryAttackResult(
        clean=runs["none"][0].cpu(),
        random=runs["random"][0].cpu(),
        attacked=runs["pgd"][0].cpu(),
        timesteps=ts,
        radius=float(attack.radius),
        target=attack.target,
        change=mean("pgd", 0),
        change_random=mean("random", 0),
        change_x0=mean("pgd", 1),
        change_x0_random=mean("random", 1),
    )
