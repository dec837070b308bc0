"""The inner maximisation of equivariant AT: find the noise perturbation ``w`` the denoiser handles worst.

    J(w) = || eps_theta(x_t + s_t*w, t) - eps_clean ||^2                (target="prediction", default)
    J(w) = || eps_theta(x_t + s_t*w, t) - eps_clean - w ||^2            (target="equivariance")

with ``eps_clean = eps_theta(x_t, t)`` held constant. Each step is one forward and one input-only
backward (``torch.autograd.grad`` w.r.t. ``w``), then :func:`fastat.ops.pgd_step` (ascent + projection).
No parameter gradient is accumulated, and the state of batch-norm layers (running statistics) is put
back as it was, so the attack leaves nothing behind in the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from fastat import ops

TARGETS = ("prediction", "equivariance")


@contextlib.contextmanager
def preserved_norm_state(model: nn.Module) -> Iterator[None]:
    """Restore the running statistics of batch-norm layers (updated by forwards in train mode)."""
    saved = [
        (m, {k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None})
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in saved:
                for k, v in bufs.items():
                    getattr(m, k).copy_(v)


def attack_objective(pred: torch.Tensor, clean: torch.Tensor, w: torch.Tensor, target: str) -> torch.Tensor:
    """Per-sample ``J`` of shape ``(B,)`` (sum over the non-batch dims), in float32."""
    r = pred.float() - clean.float()
    if target == "equivariance":
        r = r - w.float()
    return (r * r).reshape(r.shape[0], -1).sum(dim=1)


def pgd_attack(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    eps_clean: torch.Tensor,
    w0: torch.Tensor,
    radius: torch.Tensor,
    alpha: torch.Tensor,
    steps: int,
    norm: str = "linf",
    target: str = "prediction",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``steps`` projected ascent steps from ``w0``; return ``(w, J(w0))``, both detached."""
    if target not in TARGETS:
        raise ValueError(f"unknown attack target {target!r}; choose one of {', '.join(TARGETS)}")
    eps_clean = eps_clean.detach()
    w = w0.detach()
    j_start = None
    if not isinstance(model, nn.Module):
        ctx = contextlib.nullcontext()
    else:
        ctx = preserved_norm_state(model)
    with ctx, torch.enable_grad():
        for _ in range(steps):
            w = w.detach().requires_grad_(True)
            pred = model(ops.q_sample(x_t, 1.0, s, w), t)
            j = attack_objective(pred, eps_clean, w, target)
            # A model whose output ignores its input gives J no path to w: its gradient is zero.
            grad = torch.autograd.grad(j.sum(), [w], allow_unused=True)[0] if j.requires_grad else None
            grad = torch.zeros_like(w) if grad is None else grad
            if j_start is None:
                j_start = j.detach()
            w = ops.pgd_step(w.detach(), grad, radius, alpha, norm)
    if j_start is None:  # steps == 0: nothing evaluated
        j_start = torch.full((x_t.shape[0],), float("nan"), device=x_t.device)
    return w.detach(), j_start
