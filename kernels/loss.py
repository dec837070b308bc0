"""The equivariant AT loss (SPEC section 1), over N = all elements of the batch:

    L = sum(c_b * (eps_pred - eps)^2) / N  +  sum(lam_b * (eps_adv_pred - (eps_pred + w))^2) / N

The first term is the DDPM loss (per-sample weight ``c_b = dm_weight``, 1 by default). With
``detach_clean`` the clean prediction inside the equivariance target is a constant (it still gets the
DDPM term's gradient).

The fused kernel reads the four inputs once, accumulates in float32 and writes, in the same pass,
per-(sample, block) partial sums and both input gradients (for an upstream gradient of 1):

    dL/d eps_adv_pred = 2 lam_b r / N,   dL/d eps_pred = 2 c_b (eps_pred - eps) / N - [2 lam_b r / N],
    r = eps_adv_pred - eps_pred - w       (the bracket is dropped with detach_clean)

A second, single-program launch sums the partials in a fixed order: no atomics, so the same inputs give
the same bits. Backward multiplies the stored gradients by the upstream scalar; it reads no input again.
For float16 inputs the stored gradients are float32: ``2 (p - e) / N`` is far below float16's normal
range for large N and would underflow before a gradient scaler's factor is applied; and the loss itself
is float32 (a float16 loss would turn the scaler's factor, 2^16 by default, into inf in autograd).
"""

from __future__ import annotations

import torch

from ._common import loss_dtype, per_sample
from ._triton import launch_grid, per_sample_vec, require_triton, same_layout, tl, triton

# Widest chunk a reduction of partial sums loads at once (the loop covers any number of partials).
MAX_RBLOCK = 1024

# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _at_loss_kernel(
    p_ptr, q_ptr, e_ptr, w_ptr, lam_ptr, dmw_ptr, part_ptr, gp_ptr, gq_ptr,
    D, NBLK, inv_n, DETACH: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    j = tl.program_id(1)
    cols = j * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    idx = b.to(tl.int64) * D + cols
    p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    lam = tl.load(lam_ptr + b)
    dmw = tl.load(dmw_ptr + b)
    d = p - e
    r = q - p - w
    base = (b.to(tl.int64) * NBLK + j) * 2
    tl.store(part_ptr + base, dmw * tl.sum(d * d, axis=0))
    tl.store(part_ptr + base + 1, lam * tl.sum(r * r, axis=0))
    if GRAD:
        gq = (2.0 * inv_n) * lam * r
        gp = (2.0 * inv_n) * dmw * d
        if not DETACH:
            gp = gp - gq
        tl.store(gp_ptr + idx, gp.to(gp_ptr.dtype.element_ty), mask=mask)
        tl.store(gq_ptr + idx, gq.to(gq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, M, inv_n, RBLOCK: tl.constexpr):
    """out[0] = (sum dm + sum reg) / N, out[1] = sum dm / N, summed in a fixed order."""
    acc_dm = tl.zeros([RBLOCK], dtype=tl.float32)
    acc_reg = tl.zeros([RBLOCK], dtype=tl.float32)
    start = 0  # a while loop, not range(): triton 3.6's interpreter (see _triton.py)
    while start < M:
        k = start + tl.arange(0, RBLOCK)
        kmask = k < M
        acc_dm += tl.load(part_ptr + 2 * k, mask=kmask, other=0.0)
        acc_reg += tl.load(part_ptr + 2 * k + 1, mask=kmask, other=0.0)
        start += RBLOCK
    dm = tl.sum(acc_dm, axis=0) * inv_n
    reg = tl.sum(acc_reg, axis=0) * inv_n
    tl.store(out_ptr, (dm + reg).to(out_ptr.dtype.element_ty))
    tl.store(out_ptr + 1, dm.to(out_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------


def ddpm_loss_ref(eps_pred: torch.Tensor, eps: torch.Tensor, dm_weight=1.0) -> torch.Tensor:
    """``sum(c_b * (eps_pred - eps)^2) / N`` in float32 (the standard DDPM loss for ``c_b = 1``)."""
    d = eps_pred.float() - eps.float()
    return (per_sample(dm_weight, d) * d * d).sum() / d.numel()


def at_loss_parts_ref(
    eps_pred: torch.Tensor,
    eps_adv_pred: torch.Tensor,
    eps: torch.Tensor,
    w: torch.Tensor,
    lam,
    detach_clean: bool = False,
    dm_weight=1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``(loss, ddpm_term)``: the AT loss (differentiable by autograd) and its detached DDPM
    term, both in ``eps_pred``'s dtype, float32 for float16 (:func:`loss_dtype`; float32 arithmetic)."""
    dm = ddpm_loss_ref(eps_pred, eps, dm_weight)
    clean = eps_pred.detach() if detach_clean else eps_pred
    r = eps_adv_pred.float() - clean.float() - w.float()
    reg = (per_sample(lam, r) * r * r).sum() / r.numel()
    out = loss_dtype(eps_pred.dtype)
    return (dm + reg).to(out), dm.detach().to(out)


def at_loss_ref(eps_pred, eps_adv_pred, eps, w, lam, detach_clean=False, dm_weight=1.0) -> torch.Tensor:
    """Reference AT loss in float32 (differentiable by autograd), returned in :func:`loss_dtype`."""
    return at_loss_parts_ref(eps_pred, eps_adv_pred, eps, w, lam, detach_clean, dm_weight)[0]


# --------------------------------------------------------------------------------------------------
# Launcher and autograd
# --------------------------------------------------------------------------------------------------


def at_loss_triton(eps_pred, eps_adv_pred, eps, w, lam, detach_clean=False, grad=True, dm_weight=1.0):
    """Forward of the fused loss: ``(out, gp, gq)`` with ``out = [loss, ddpm_loss]`` in the input dtype
    (float32 for float16 inputs: :func:`loss_dtype`) and the input gradients for an upstream gradient
    of 1 (``None`` unless ``grad``; float32 for float16 inputs)."""
    require_triton()
    p, q, e, w = same_layout(eps_pred, eps_adv_pred, eps, w)
    B, D, block = launch_grid(p)
    nblk = triton.cdiv(D, block)
    dev = p.device
    out = torch.empty(2, dtype=loss_dtype(p.dtype), device=dev)
    gdtype = torch.float32 if p.dtype == torch.float16 else p.dtype
    gp = torch.empty_like(p, dtype=gdtype) if grad else None
    gq = torch.empty_like(q, dtype=gdtype) if grad else None
    part = torch.empty((B * nblk, 2), dtype=torch.float32, device=dev)
    inv_n = 1.0 / p.numel()
    lam_vec, dmw_vec = per_sample_vec(lam, B, dev), per_sample_vec(dm_weight, B, dev)
    _at_loss_kernel[(B, nblk)](
        p, q, e, w, lam_vec, dmw_vec, part, gp if grad else p, gq if grad else q,
        D, nblk, inv_n, DETACH=detach_clean, GRAD=grad, BLOCK=block,
    )  # fmt: skip
    rblock = max(16, min(MAX_RBLOCK, triton.next_power_of_2(B * nblk)))
    _sum_partials_kernel[(1,)](part, out, B * nblk, inv_n, RBLOCK=rblock)
    return out, gp, gq


class ATLossFunction(torch.autograd.Function):
    """Fused AT loss; backward returns the gradients stored by the forward times the upstream scalar."""

    @staticmethod
    def forward(ctx, eps_pred, eps_adv_pred, eps, w, lam, detach_clean, dm_weight=1.0):
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        out, gp, gq = at_loss_triton(eps_pred, eps_adv_pred, eps, w, lam, detach_clean, grad, dm_weight)
        ctx.dtypes = (eps_pred.dtype, eps_adv_pred.dtype)
        if grad:
            ctx.save_for_backward(gp, gq)
        loss, dm = out.unbind()
        ctx.mark_non_differentiable(dm)
        return loss, dm

    @staticmethod
    def backward(ctx, grad_loss, _grad_dm):
        gp, gq = ctx.saved_tensors
        gp = (gp * grad_loss).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gq = (gq * grad_loss).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return gp, gq, None, None, None, None, None
