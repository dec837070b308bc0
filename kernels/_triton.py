"""Triton import guard and the launch helpers shared by every kernel.

Triton is optional at import time (e.g. on macOS, where only the reference path runs): without it the
``@triton.jit`` decorators below become no-ops and launching a kernel raises a clear error.

A loop over a runtime bound is a ``while`` loop, not ``range(0, n, STEP)``: triton 3.6's interpreter turns
``n`` into a 1-element array whose ``int()`` numpy >= 2.4 refuses (same iterations and sums natively).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _NoTriton:
        constexpr = object

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()  # type: ignore[assignment]

__all__ = ["HAS_TRITON", "triton", "tl", "require_triton", "same_layout", "per_sample_vec", "launch_grid"]

MAX_BLOCK = 1024
MAX_GRID_Y = 65535


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("fastat: Triton is not installed; the fused kernels need it (CPU tensors use the reference)")


def _dense_batch_major(x: torch.Tensor) -> bool:
    """Each sample occupies one contiguous run of memory, samples one after another."""
    if x.is_contiguous():
        return True
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def same_layout(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in one dense, batch-major layout that the kernels can walk as flat memory.

    Contiguous and channels_last inputs (all with the same strides) are used as they are: the kernels
    are elementwise within a sample, so the order of elements inside a sample does not matter, only
    that it is the same for every tensor. Anything else (strided views, mixed layouts) is copied to
    contiguous memory first. Outputs allocated with ``torch.empty_like(first)`` share the layout.
    """
    first = tensors[0]
    if all(_dense_batch_major(t) and t.stride() == first.stride() for t in tensors):
        return tensors
    return tuple(t.contiguous() for t in tensors)


def per_sample_vec(c, batch: int, device: torch.device) -> torch.Tensor:
    """A coefficient (float, 0-dim or (B,) tensor) as a contiguous float32 (B,) tensor on ``device``.

    A Python number becomes a fill (a kernel argument, not a host-to-device copy: capturable).
    """
    if not isinstance(c, torch.Tensor):
        return torch.full((batch,), float(c), dtype=torch.float32, device=device)
    c = c.to(torch.float32)
    return c.expand(batch).contiguous() if c.dim() == 0 else c.contiguous()


def launch_grid(x: torch.Tensor) -> tuple[int, int, int]:
    """``(B, D, BLOCK)``: one program per (sample, block of the sample) on a (B, cdiv(D, BLOCK)) grid."""
    B = x.shape[0]
    D = x.numel() // B if B else 0
    block = max(16, min(MAX_BLOCK, triton.next_power_of_2(max(D, 1))))
    if triton.cdiv(D, block) > MAX_GRID_Y:
        raise ValueError(f"fastat kernels: a sample of {D} elements is too large (max {MAX_GRID_Y * block})")
    return B, D, block
