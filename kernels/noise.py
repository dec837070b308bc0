"""Noise injection: the DDPM forward process, and the fused kernel that also draws the noise.

    x_t  = a*x0 + s*eps                      (q_sample, per-sample a, s)
    x~_t = x_t + s*w0,  eps ~ N(0, 1), w0 ~ U[-r, r]     (noise_inject: draws eps and w0 in-kernel)

The fused kernel draws from Philox with the counter (element index, offset) under the key ``seed``:
the same (seed, offset) gives the same numbers, and two different offsets give independent streams
(a training loop passes its step number as the offset). Seed and offset may be device tensors, so a
CUDA graph can advance them between replays without re-capture. CPU tensors use the reference, which
draws from a ``torch.Generator`` seeded from (seed, offset): same distribution, different bits.
"""

from __future__ import annotations

import torch

from ._common import per_sample
from ._triton import launch_grid, per_sample_vec, require_triton, same_layout, tl, triton

# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _q_sample_kernel(x0_ptr, eps_ptr, a_ptr, s_ptr, out_ptr, D, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    idx = b.to(tl.int64) * D + cols
    a = tl.load(a_ptr + b)
    s = tl.load(s_ptr + b)
    x0 = tl.load(x0_ptr + idx, mask=mask).to(tl.float32)
    eps = tl.load(eps_ptr + idx, mask=mask).to(tl.float32)
    tl.store(out_ptr + idx, (a * x0 + s * eps).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _noise_inject_kernel(
    x0_ptr, a_ptr, s_ptr, r_ptr, seed_ptr, offset_ptr,
    xt_ptr, xadv_ptr, eps_ptr, w_ptr,
    D, STORE_NOISE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    idx = b.to(tl.int64) * D + cols
    seed = tl.load(seed_ptr)
    offset = tl.load(offset_ptr).to(tl.int64)
    zero = cols.to(tl.uint32) * 0
    c2 = zero + offset.to(tl.uint32)
    c3 = zero + (offset >> 32).to(tl.uint32)
    # One Philox call per element gives four 32-bit words: two for a normal (Box-Muller), one uniform.
    i1, i2, i3, _ = tl.philox(seed, idx.to(tl.uint32), (idx >> 32).to(tl.uint32), c2, c3)
    eps, _ = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i1), tl.uint_to_uniform_float(i2))
    r = tl.load(r_ptr + b)
    w = r * (2.0 * tl.uint_to_uniform_float(i3) - 1.0)
    a = tl.load(a_ptr + b)
    s = tl.load(s_ptr + b)
    x0 = tl.load(x0_ptr + idx, mask=mask).to(tl.float32)
    xt = a * x0 + s * eps
    tl.store(xt_ptr + idx, xt.to(xt_ptr.dtype.element_ty), mask=mask)
    tl.store(xadv_ptr + idx, (xt + s * w).to(xadv_ptr.dtype.element_ty), mask=mask)
    if STORE_NOISE:
        tl.store(eps_ptr + idx, eps.to(eps_ptr.dtype.element_ty), mask=mask)
        tl.store(w_ptr + idx, w.to(w_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------


def q_sample_ref(x0: torch.Tensor, a, s, eps: torch.Tensor) -> torch.Tensor:
    """Reference: ``a*x0 + s*eps`` in float32, returned in ``x0``'s dtype."""
    out = per_sample(a, x0) * x0.float() + per_sample(s, x0) * eps.float()
    return out.to(x0.dtype)


def noise_inject_formula(x0, a, s, eps, w0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, x~_t)`` from given noise, in float32 (``x~_t`` from the unrounded ``x_t``)."""
    xt = per_sample(a, x0) * x0.float() + per_sample(s, x0) * eps.float()
    return xt, xt + per_sample(s, x0) * w0.float()


def _generator_for(seed: int, offset: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 0x9E3779B1 + int(offset)) % (2**63))
    return g


def noise_inject_ref(x0, a, s, radius, seed, offset, out=None):
    """Reference noise injection: ``(x_t, x~_t, eps, w0)`` with eps, w0 from a seeded generator."""
    g = _generator_for(int(seed), int(offset), x0.device)
    eps = torch.randn(x0.shape, generator=g, device=x0.device)
    w0 = (2 * torch.rand(x0.shape, generator=g, device=x0.device) - 1) * per_sample(radius, x0)
    xt, xadv = noise_inject_formula(x0, a, s, eps, w0)
    xt, xadv = xt.to(x0.dtype), xadv.to(x0.dtype)
    if out is not None:
        out[: x0.shape[0]].copy_(xt)
        out[x0.shape[0] :].copy_(xadv)
        xt, xadv = out[: x0.shape[0]], out[x0.shape[0] :]
    return xt, xadv, eps.to(x0.dtype), w0.to(x0.dtype)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def q_sample_triton(x0: torch.Tensor, a, s, eps: torch.Tensor) -> torch.Tensor:
    """``a*x0 + s*eps`` in one launch (forward only; see :class:`QSampleFunction`)."""
    require_triton()
    x0, eps = same_layout(x0, eps)
    B, D, block = launch_grid(x0)
    out = torch.empty_like(x0)
    if x0.numel():
        a, s = per_sample_vec(a, B, x0.device), per_sample_vec(s, B, x0.device)
        _q_sample_kernel[(B, triton.cdiv(D, block))](x0, eps, a, s, out, D, BLOCK=block)
    return out


class QSampleFunction(torch.autograd.Function):
    """Differentiable Triton ``q_sample``: the attack differentiates ``x_t + s*w`` w.r.t. ``w``."""

    @staticmethod
    def forward(ctx, x0, a, s, eps):
        ctx.coeffs = (a, s)  # floats or (B,) tensors that do not require grad
        return q_sample_triton(x0, a, s, eps)

    @staticmethod
    def backward(ctx, grad):
        a, s = ctx.coeffs
        g = grad.float()
        gx = (per_sample(a, grad) * g).to(grad.dtype) if ctx.needs_input_grad[0] else None
        ge = (per_sample(s, grad) * g).to(grad.dtype) if ctx.needs_input_grad[3] else None
        return gx, None, None, ge


def _as_index_tensor(v, device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.reshape(1).to(device=device, dtype=torch.int64)
    return torch.full((1,), int(v), dtype=torch.int64, device=device)


def noise_inject_triton(x0, a, s, radius, seed, offset, out=None, store_noise=True):
    """Fused noise injection in one launch; returns ``(x_t, x~_t, eps, w0)`` (eps, w0 None unless stored).

    ``out``: optional preallocated ``[2B, ...]`` model-input buffer; ``x_t`` goes to its first half
    and ``x~_t`` to its second, so the clean and perturbed passes can run as one batch.
    """
    require_triton()
    (x0,) = same_layout(x0)
    B, D, block = launch_grid(x0)
    if out is None:
        xt, xadv = torch.empty_like(x0), torch.empty_like(x0)
    else:
        xt, xadv = out[:B], out[B:]
        if xt.stride() != x0.stride():
            raise ValueError("noise_inject: out must have the same memory layout as x0")
    eps = torch.empty_like(x0) if store_noise else xt  # placeholders are never written
    w0 = torch.empty_like(x0) if store_noise else xt
    if x0.numel():
        dev = x0.device
        coeffs = [per_sample_vec(c, B, dev) for c in (a, s, radius)]
        seed_t, off_t = _as_index_tensor(seed, dev), _as_index_tensor(offset, dev)
        _noise_inject_kernel[(B, triton.cdiv(D, block))](
            x0, *coeffs, seed_t, off_t, xt, xadv, eps, w0, D, STORE_NOISE=store_noise, BLOCK=block
        )
    return xt, xadv, (eps if store_noise else None), (w0 if store_noise else None)
