"""The inner maximisation of equivariant AT: find the noise perturbation ``w`` the denoiser handles worst.

    J(w) = || eps_theta(x_t + s_t*w, t) - eps_clean ||^2                (target="prediction", default)
    J(w) = || eps_theta(x_t + s_t*w, t) - eps_clean - w ||^2            (target="equivariance")

with ``eps_clean = eps_theta(x_t, t)`` held constant. Each step is one forward and one input-only
backward, then :func:`fastat.at.ops.pgd_step` (project, and write the next input ``x_t + s_t*w``). No
parameter gradient accumulates and batch-norm statistics are put back. ``J`` lives in eps space:
``output(raw, x_in)`` turns a v- or x0-model's output into its noise estimate. Why the input gradient
serves as the ``w`` gradient: docs/DESIGN.md ("Attack").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from fastat.at import ops
from fastat.at.prediction import model_output

TARGETS = ("prediction", "equivariance")


@contextlib.contextmanager
def preserved_norm_state(model) -> Iterator[None]:
    """Restore the running statistics of batch-norm layers (updated by forwards in train mode)."""
    modules = model.modules() if isinstance(model, nn.Module) else ()
    saved = [
        (m, {k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None})
        for m in modules
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
    x_start: torch.Tensor | None = None,
    output: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``steps`` projected ascent steps from ``w0``.

    ``x_start`` is the model input ``x_t + s*w0`` when the caller already has it (the noise kernel
    writes it). ``output(raw, x_in)``: the eps estimate from the model's raw output at input ``x_in``
    (default: :func:`fastat.at.prediction.model_output`). Returns ``(w, x_t + s*w, J(w0))``, all detached.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown attack target {target!r}; choose one of {', '.join(TARGETS)}")
    eps_clean = eps_clean.detach()
    w = w0.detach()
    x_in = (x_start if x_start is not None else ops.q_sample(x_t, 1.0, s, w)).detach()
    j_start = None
    with preserved_norm_state(model), torch.enable_grad():
        for _ in range(steps):
            x_in = x_in.detach().requires_grad_(True)
            w = w.detach().requires_grad_(target == "equivariance")
            raw = model(x_in, t)
            pred = model_output(raw) if output is None else output(raw, x_in)
            j = attack_objective(pred, eps_clean, w, target)
            inputs = [x_in, w] if target == "equivariance" else [x_in]
            # A model whose output ignores its input gives J no path to it: the gradient is zero.
            grads = torch.autograd.grad(j.sum(), inputs, allow_unused=True) if j.requires_grad else [None] * 2
            grad = torch.zeros_like(x_in) if grads[0] is None else grads[0]
            if target == "equivariance":  # dJ/dw = s * dJ/dx + the direct term
                grad = ops.q_sample(grads[1] if grads[1] is not None else torch.zeros_like(w), 1.0, s, grad)
            if j_start is None:
                j_start = j.detach()
            w, x_in = ops.pgd_step(w.detach(), grad, radius, alpha, norm, x_t=x_t, s=s)
    if j_start is None:  # steps == 0: nothing evaluated
        j_start = torch.full((x_t.shape[0],), float("nan"), device=x_t.device)
    return w.detach(), x_in.detach(), j_start
