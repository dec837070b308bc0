"""Small helpers shared by the references and the kernel launchers."""

from __future__ import annotations

import torch


def per_sample(c: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient (float, 0-dim or ``(B,)``) as float32, shaped to broadcast over ``like``."""
    c = torch.as_tensor(c, dtype=torch.float32, device=like.device)
    if c.dim() == 0:
        return c
    return c.to(torch.float32).reshape(-1, *([1] * (like.dim() - 1)))
