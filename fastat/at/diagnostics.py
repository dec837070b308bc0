"""``attack_eff``: does the attack find harder directions for the regulariser than chance?

For a batch at stratified noise levels it runs the objective's attack (FGSM on its target for the modes
that have none) and measures the equivariance residual ``||eps(x_t + s w) - eps(x_t) - w||^2`` that the
regulariser sees, under the attack's ``w`` and under a random ``w`` with the same per-element magnitude
(random signs). ``attack_eff = residual(attack) / residual(random)``: above 1 the attack hands the
regulariser harder directions than chance, below 1 easier ones (docs/DESIGN.md, "attack strength").
Device tensors only: the caller reads them when it logs (no host sync here).
"""

from __future__ import annotations

import math

import torch

from fastat.at import prediction as P
from fastat.at.attack import attack_objective, pgd_attack

__all__ = ["BUCKETS", "attack_efficiency"]

BUCKETS = 4  # noise-level buckets: equal ranges of t, from the least noisy


@torch.no_grad()
def attack_efficiency(model, objective, x0: torch.Tensor, generator: torch.Generator,
                      buckets: int = BUCKETS) -> dict[str, torch.Tensor]:  # fmt: skip
    """``{"attack_eff": overall, "attack_eff_b0": ..., "res_attack": ..., "res_random": ...}`` for
    ``model`` (an eps/v/x0 model as ``objective.prediction`` says) on the clean batch ``x0``; all
    randomness from ``generator``. Samples are spread evenly over ``buckets`` ranges of ``t``."""
    if buckets < 1 or x0.shape[0] < buckets:
        raise ValueError(f"need a batch of at least {buckets} samples (one per bucket), got {x0.shape[0]}")
    sched, budget, dev, B = objective.schedule, objective.budget, x0.device, x0.shape[0]
    gdev = generator.device
    bucket = torch.arange(B, device=gdev) % buckets
    width = sched.T // buckets
    t = (bucket * width + torch.randint(0, width, (B,), generator=generator, device=gdev)).to(dev)
    a, s = sched.coeffs(t)
    numel = math.prod(x0.shape[1:])
    radius = budget.radius(s, numel)
    eps = torch.randn(x0.shape, generator=generator, device=gdev).to(dev, x0.dtype)
    view = (-1,) + (1,) * (x0.dim() - 1)
    x_t = a.view(view) * x0 + s.view(view) * eps

    def eps_of(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        out = P.model_output(model(x, tt)).float()
        return P.to_eps(objective.prediction, out, x.float(), a, s)

    clean = eps_of(x_t, t)
    w0 = budget.random_start(radius, tuple(x0.shape), generator).to(dev, x0.dtype)
    steps = objective.attack_steps or 1
    alpha = (objective.step_multiple if objective.attack_steps else 1.25) * radius
    w, _, _ = pgd_attack(lambda x, tt: eps_of(x, tt), x_t, t, s, clean, w0, radius, alpha, steps,
                         budget.norm, objective.attack_target)  # fmt: skip
    signs = torch.randint(0, 2, tuple(x0.shape), generator=generator, device=gdev).to(dev, w.dtype) * 2 - 1
    w_rand = w.abs() * signs
    res = {}
    for name, ww in (("attack", w), ("random", w_rand)):
        x_in = x_t + s.view(view) * ww
        res[name] = attack_objective(eps_of(x_in, t), clean, ww, "equivariance")  # (B,)
    out = {"attack_eff": res["attack"].sum() / res["random"].sum().clamp_min(1e-30),
           "res_attack": res["attack"].mean(), "res_random": res["random"].mean()}  # fmt: skip
    for b in range(buckets):
        m = (bucket == b).to(dev)
        out[f"attack_eff_b{b}"] = res["attack"][m].sum() / res["random"][m].sum().clamp_min(1e-30)
    return out
