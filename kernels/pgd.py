"""PGD ascent step with projection onto the per-sample perturbation budget.

linf: ``clamp(w + alpha*sign(g), -r, r)``.
l2:   ``w + alpha*g/||g||`` (per-sample norm over all non-batch dims; a zero gradient leaves ``w``
      where it is), then scaled back onto the ball ``||w||_2 <= r``.

Both kernels can also write the next model input ``x_t + s*w_new`` in the same pass. The l2 step
needs two per-sample reductions (``||g||`` and ``||w_new||``); the kernel gets both from one read of
``w`` and ``g`` through ``||w + c*g||^2 = ||w||^2 + 2c<w,g> + c^2||g||^2`` (c = alpha/||g||): pass 1
writes per-(sample, block) partial sums of gg, ww, wg; pass 2 reduces a sample's partials in a fixed
order (deterministic, any sample size) and applies the step. Two launches, two reads of w and g.
"""

from __future__ import annotations

import torch

from ._common import per_sample
from ._triton import launch_grid, per_sample_vec, require_triton, same_layout, tl, triton

NORMS = ("linf", "l2")

# Widest chunk a reduction of partial sums loads at once (the loop covers any number of partials).
MAX_RBLOCK = 1024

# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _pgd_linf_kernel(
    w_ptr, g_ptr, r_ptr, al_ptr, out_ptr, xt_ptr, s_ptr, xnext_ptr,
    D, WRITE_X: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    idx = b.to(tl.int64) * D + cols
    r = tl.load(r_ptr + b)
    al = tl.load(al_ptr + b)
    w = tl.load(w_ptr + idx, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + idx, mask=mask).to(tl.float32)
    sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
    w_new = tl.minimum(tl.maximum(w + al * sign, -r), r)
    tl.store(out_ptr + idx, w_new.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_X:
        s = tl.load(s_ptr + b)
        xt = tl.load(xt_ptr + idx, mask=mask).to(tl.float32)
        tl.store(xnext_ptr + idx, (xt + s * w_new).to(xnext_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _l2_partials_kernel(w_ptr, g_ptr, part_ptr, D, NBLK, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    cols = j * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    idx = b.to(tl.int64) * D + cols
    w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    base = (b.to(tl.int64) * NBLK + j) * 3
    tl.store(part_ptr + base, tl.sum(g * g, axis=0))
    tl.store(part_ptr + base + 1, tl.sum(w * w, axis=0))
    tl.store(part_ptr + base + 2, tl.sum(w * g, axis=0))


@triton.jit
def _pgd_l2_apply_kernel(
    w_ptr, g_ptr, r_ptr, al_ptr, part_ptr, out_ptr, xt_ptr, s_ptr, xnext_ptr,
    D, NBLK, WRITE_X: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    # Every program of sample b reduces that sample's partials in the same fixed order.
    acc_gg = tl.zeros([RBLOCK], dtype=tl.float32)
    acc_ww = tl.zeros([RBLOCK], dtype=tl.float32)
    acc_wg = tl.zeros([RBLOCK], dtype=tl.float32)
    start = 0  # a while loop, not range(): triton 3.6's interpreter (see _triton.py)
    while start < NBLK:
        k = start + tl.arange(0, RBLOCK)
        kmask = k < NBLK
        base = (b.to(tl.int64) * NBLK + k) * 3
        acc_gg += tl.load(part_ptr + base, mask=kmask, other=0.0)
        acc_ww += tl.load(part_ptr + base + 1, mask=kmask, other=0.0)
        acc_wg += tl.load(part_ptr + base + 2, mask=kmask, other=0.0)
        start += RBLOCK
    gg = tl.sum(acc_gg, axis=0)
    ww = tl.sum(acc_ww, axis=0)
    wg = tl.sum(acc_wg, axis=0)
    r = tl.load(r_ptr + b)
    al = tl.load(al_ptr + b)
    gn = tl.sqrt(gg)
    c = tl.where(gn > 0, al / tl.maximum(gn, 1.1754944e-38), 0.0)
    n2 = tl.maximum(ww + 2.0 * c * wg + c * c * gg, 0.0)
    wn = tl.sqrt(n2)
    scale = tl.where(wn > r, r / tl.maximum(wn, 1.1754944e-38), 1.0)

    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    idx = b.to(tl.int64) * D + cols
    w = tl.load(w_ptr + idx, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + idx, mask=mask).to(tl.float32)
    w_new = (w + c * g) * scale
    tl.store(out_ptr + idx, w_new.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_X:
        s = tl.load(s_ptr + b)
        xt = tl.load(xt_ptr + idx, mask=mask).to(tl.float32)
        tl.store(xnext_ptr + idx, (xt + s * w_new).to(xnext_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def _sample_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm over all non-batch dims, shaped ``(B, 1, ...)``."""
    return x.reshape(x.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (x.dim() - 1)))


def pgd_step_ref(w: torch.Tensor, grad: torch.Tensor, radius, alpha, norm: str = "linf") -> torch.Tensor:
    """Reference PGD step in float32, returned in ``w``'s dtype."""
    r, al = per_sample(radius, w), per_sample(alpha, w)
    wf, g = w.float(), grad.float()
    if norm == "linf":
        out = torch.clamp(wf + al * torch.sign(g), -r, r)
    elif norm == "l2":
        tiny = torch.finfo(torch.float32).tiny
        gn = _sample_norm(g)
        out = wf + al * torch.where(gn > 0, g / gn.clamp_min(tiny), torch.zeros_like(g))
        wn = _sample_norm(out)
        out = out * torch.where(wn > r, r / wn.clamp_min(tiny), torch.ones_like(wn))
    else:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    return out.to(w.dtype)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def pgd_step_triton(w, grad, radius, alpha, norm="linf", x_t=None, s=None, x_out=None):
    """Fused PGD step; with ``x_t`` and ``s`` also returns the next model input ``x_t + s*w_new``
    (written into ``x_out`` when given). Returns ``w_new`` or ``(w_new, x_next)``."""
    require_triton()
    write_x = x_t is not None
    if write_x:
        w, grad, x_t = same_layout(w, grad, x_t)
        x_next = torch.empty_like(x_t) if x_out is None else x_out
        if x_next.stride() != w.stride() or x_next.shape != w.shape:
            raise ValueError("pgd_step: x_out must have the shape and memory layout of w")
    else:
        w, grad = same_layout(w, grad)
    B, D, block = launch_grid(w)
    out = torch.empty_like(w)
    if w.numel():
        dev = w.device
        r, al = per_sample_vec(radius, B, dev), per_sample_vec(alpha, B, dev)
        s_vec = per_sample_vec(s, B, dev) if write_x else r
        xt_arg, xn_arg = (x_t, x_next) if write_x else (w, out)  # placeholders are never touched
        nblk = triton.cdiv(D, block)
        grid = (B, nblk)
        if norm == "linf":
            _pgd_linf_kernel[grid](w, grad, r, al, out, xt_arg, s_vec, xn_arg, D, WRITE_X=write_x, BLOCK=block)
        else:
            part = torch.empty((B, nblk, 3), dtype=torch.float32, device=dev)
            _l2_partials_kernel[grid](w, grad, part, D, nblk, BLOCK=block)
            rblock = max(16, min(MAX_RBLOCK, triton.next_power_of_2(nblk)))
            _pgd_l2_apply_kernel[grid](
                w, grad, r, al, part, out, xt_arg, s_vec, xn_arg, D, nblk,
                WRITE_X=write_x, BLOCK=block, RBLOCK=rblock,
            )  # fmt: skip
    return (out, x_next) if write_x else out
