"""Small helpers shared by the references and the kernel launchers."""

from __future__ import annotations

import torch


def per_sample(
    c: torch.Tensor | float, like: torch.Tensor, dtype: torch.dtype | None = torch.float32
) -> torch.Tensor | float:
    """A per-sample coefficient (float, 0-dim or ``(B,)``) in ``dtype`` (None: its own), shaped
    ``(B, 1, ...)`` to broadcast over ``like``: the one per-sample broadcast of fastat.

    Python numbers stay numbers (no host-to-device copy, so this is safe inside CUDA-graph capture).
    """
    if not isinstance(c, torch.Tensor):
        return float(c)
    c = c if dtype is None else c.to(dtype)
    return c if c.dim() == 0 else c.reshape(-1, *([1] * (like.dim() - 1)))


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss is returned in: the inputs', but float32 for float16 inputs. A float16 loss would
    make autograd cast a GradScaler's factor (2^16 by default) to float16, which is inf."""
    return torch.float32 if dtype == torch.float16 else dtype
