"""The equivariant adversarial-training objective (SPEC section 1) for any eps-model ``model(x, t)``.

    objective = ATObjective(mode="adv")
    out = objective(model, x0, generator)      # draws t, eps, w; attacks; returns the loss
    out.loss.backward()

One call: ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``, ``x_t = a_t x0 + s_t eps``, clean prediction
``eps_theta(x_t)``, then ``w`` by mode, the perturbed prediction ``eps_theta(x_t + s_t w)`` and

    L_AT = mean|| eps_theta(x_t) - eps ||^2 + lambda_t * mean|| eps_theta(x_t + s_t w) - (eps_theta(x_t) + w) ||^2

| mode | w |
| ddpm | none: the plain DDPM loss, one forward |
| rand | w ~ U(budget) |
| adv  | random start + 1 signed-gradient step of size 1.25 r, projected (FGSM) |
| pgd  | random start + ``pgd_steps`` steps of size 2.5 r / k, projected after each |
| inv  | as adv, but the target ignores w: || eps_theta(x_t + s_t w) - eps_theta(x_t) ||^2 (ablation) |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastat import ops
from fastat.attack import TARGETS, attack_objective, pgd_attack
from fastat.budget import Budget
from fastat.schedule import NoiseSchedule

MODES = ("ddpm", "rand", "adv", "pgd", "inv")
LAM_SCALES = ("const", "radius")


@dataclass
class ATOutput:
    """The scalar loss (with its graph) and detached 0-dim statistics (no host sync)."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor]


@dataclass
class ATObjective:
    """Equivariant AT loss with its noise sampling and attack.

    Args:
        schedule: the DDPM noise schedule.
        mode: one of ``ddpm | rand | adv | pgd | inv`` (see module docstring).
        lam: weight of the equivariance regulariser (>= 0).
        lam_scale: ``const`` (lambda_t = lam) or ``radius`` (lambda_t = lam / r_elem(t)^2 with
            r_elem the per-element eps-space radius, so the regulariser is measured in budget units).
        budget: the radius schedule r(t), its space and norm.
        pgd_steps: ascent steps for ``pgd`` (``adv`` and ``inv`` always take 1).
        step_size: ascent step as a multiple of the radius; default 1.25 for one step, 2.5/k for k.
        attack_target: ``prediction`` (maximise the change of the prediction) or ``equivariance``
            (maximise the equivariance residual).
        detach_clean: treat eps_theta(x_t) inside the equivariance target as a constant.
    """

    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    mode: str = "adv"
    lam: float = 0.3
    lam_scale: str = "const"
    budget: Budget = field(default_factory=Budget)
    pgd_steps: int = 3
    step_size: float | None = None
    attack_target: str = "prediction"
    detach_clean: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if self.lam_scale not in LAM_SCALES:
            raise ValueError(f"unknown lam_scale {self.lam_scale!r}; choose one of {', '.join(LAM_SCALES)}")
        if not (isinstance(self.pgd_steps, int) and self.pgd_steps >= 1):
            raise ValueError(f"pgd_steps must be an integer >= 1, got {self.pgd_steps!r}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"step_size must be > 0, got {self.step_size!r}")
        if self.attack_target not in TARGETS:
            raise ValueError(f"unknown attack target {self.attack_target!r}; choose one of {', '.join(TARGETS)}")

    @property
    def attack_steps(self) -> int:
        """Ascent steps per training step (0 for ``ddpm`` and ``rand``)."""
        return {"ddpm": 0, "rand": 0, "pgd": self.pgd_steps}.get(self.mode, 1)

    @property
    def step_multiple(self) -> float:
        if self.step_size is not None:
            return self.step_size
        k = self.attack_steps
        return 1.25 if k <= 1 else 2.5 / k

    def lam_per_sample(self, radius: torch.Tensor, numel: int) -> torch.Tensor | float:
        if self.lam_scale == "const":
            return float(self.lam)
        r_elem = radius / math.sqrt(numel) if self.budget.norm == "l2" else radius
        return self.lam / r_elem.square()

    def __call__(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        attack_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> ATOutput:
        """The AT loss of ``model`` on the clean batch ``x0`` (all randomness from ``generator``).

        ``attack_model``: the same function as ``model`` for the attack's forwards (default: ``model``);
        the fast step passes a compiled copy whose parameters are detached, so that the attack's
        backward computes the input gradient only.
        """
        if not isinstance(x0, torch.Tensor) or not x0.dtype.is_floating_point or x0.dim() < 2:
            raise ValueError("x0 must be a floating tensor of shape (B, ...)")
        with ops.trusted_values():  # radii and weights are built here: no host sync to check them
            return self._loss(model, model if attack_model is None else attack_model, x0, generator)

    def _loss(self, model, attack_model, x0: torch.Tensor, generator: torch.Generator | None) -> ATOutput:
        dev, B = x0.device, x0.shape[0]
        gdev = generator.device if generator is not None else torch.device("cpu")
        t = self.schedule.sample_t(B, generator, device=dev)
        # One 63-bit seed per call from the generator (a device tensor: no host sync on CUDA); the
        # noise kernel draws eps and the random start w0 from it and writes x_t and x_t + s*w0.
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=gdev).to(dev)
        a, s = self.schedule.coeffs(t)
        numel = math.prod(x0.shape[1:])
        radius = self.budget.radius(s, numel)
        x_t, x_adv, eps, w = ops.noise_inject(x0, a, s, radius if self.budget.norm == "linf" else 0.0, seed)
        eps_pred = model(x_t, t).to(eps.dtype)
        if self.mode == "ddpm":
            dm = ops.ddpm_loss(eps_pred, eps)
            return ATOutput(dm, {"loss_dm": dm.detach(), "reg": torch.zeros_like(dm.detach())})

        if self.budget.norm == "l2":  # uniform in the ball; the noise kernel draws box starts only
            w = self.budget.random_start(radius, tuple(x0.shape), generator).to(dev, x0.dtype)
            x_adv = ops.q_sample(x_t, 1.0, s, w)
        j_start = None
        if self.attack_steps:
            w, x_adv, j_start = pgd_attack(
                attack_model, x_t, t, s, eps_pred, w, radius, self.step_multiple * radius,
                self.attack_steps, self.budget.norm, self.attack_target, x_start=x_adv,
            )  # fmt: skip
        eps_adv_pred = model(x_adv, t).to(eps.dtype)
        target_w = torch.zeros_like(w) if self.mode == "inv" else w
        lam = self.lam_per_sample(radius, numel)
        loss, dm = ops.at_loss_parts(eps_pred, eps_adv_pred, eps, target_w, lam, detach_clean=self.detach_clean)

        with torch.no_grad():
            j_end = attack_objective(eps_adv_pred, eps_pred, w, self.attack_target)
            stats = {
                "loss_dm": dm,
                "reg": loss.detach() - dm,
                "w_abs": w.abs().float().mean(),
                "radius": radius.mean(),
                "j": j_end.mean(),
            }
            if j_start is not None:
                stats["gain"] = j_end.mean() / j_start.mean().clamp_min(1e-30)
        return ATOutput(loss, stats)
