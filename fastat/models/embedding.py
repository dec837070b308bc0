"""Sinusoidal timestep embedding shared by every fastat denoiser (UNet and MLP)."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DDPM (Ho et al. 2020) sinusoidal embedding of timesteps ``t`` (shape ``(B,)``): ``(B, dim)`` float32.

    Frequencies ``max_period ** (-i / (half - 1))`` for ``i < half = dim // 2``; sines first, then cosines
    (``diffusion_tf/nn.py::get_timestep_embedding``); an odd ``dim`` gets a zero column at the end.
    Integer and floating ``t`` give the same embedding for the same values.
    """
    if dim < 2:
        raise ValueError(f"timestep embedding dim must be >= 2, got {dim}")
    half = dim // 2
    scale = math.log(max_period) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -scale)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def batch_timesteps(t: torch.Tensor | int | float, batch: int, device: torch.device) -> torch.Tensor:
    """``t`` as a ``(batch,)`` tensor on ``device``: a number or 0-dim tensor is broadcast to the batch."""
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t, device=device)
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"timesteps must be an integer or floating tensor, got {t.dtype}")
    if t.dim() == 0:
        return t.to(device).expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"timesteps must have shape () or ({batch},), got {tuple(t.shape)}")
    return t.to(device)


class ClassEmbedding(nn.Module):
    """Class labels ``y`` (int64 ``(B,)``) to vectors added to the time embedding (as diffusers'
    ``UNet2DModel(num_class_embeds=num_classes + 1)`` does). Label ``num_classes`` is the null label, the
    unconditional model of classifier-free guidance: ``y=None`` and negative labels (the objective's
    dropped ones) mean it."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        else:
            y = torch.where(y < 0, self.num_classes, y)
        return self.embedding(y)
