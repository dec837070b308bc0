"""A residual MLP noise predictor for low-dimensional points: ``MLP(2)(x (B, 2), t (B,)) -> eps (B, 2)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastat.models.embedding import ClassEmbedding, batch_timesteps, timestep_embedding

__all__ = ["MLP"]


class _Block(nn.Module):
    """Pre-norm residual block: LayerNorm/SiLU/Linear, + projected time embedding, SiLU/Linear, + skip."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.temb_proj = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.fc1(F.silu(self.norm(x))) + self.temb_proj(F.silu(temb))
        return x + self.fc2(F.silu(h))


class MLP(nn.Module):
    """``forward(x, t) -> eps`` for points ``x`` of shape ``(B, dim)``; ``t`` as for the UNet.

    ``depth`` residual blocks of width ``hidden``; the sinusoidal embedding of ``t`` (``time_dim`` wide,
    periods up to ``max_period``) goes through Linear/SiLU/Linear and is added inside every block.
    """

    def __init__(
        self, dim: int, hidden: int = 256, depth: int = 4, time_dim: int = 64, max_period: float = 10000.0,
        num_classes: int = 0,  # > 0: class-conditional, forward(x, t, y) (fastat.models.embedding)
    ) -> None:  # fmt: skip
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MLP {name} must be a positive integer, got {v!r}")
        if not isinstance(time_dim, int) or time_dim < 2:
            raise ValueError(f"MLP time_dim must be an integer >= 2, got {time_dim!r}")
        if max_period <= 1:
            raise ValueError(f"MLP max_period must be > 1, got {max_period!r}")
        self.dim, self.hidden, self.depth = dim, hidden, depth
        self.time_dim, self.max_period = time_dim, float(max_period)
        self.temb = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.num_classes = num_classes
        self.class_emb = ClassEmbedding(num_classes, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_Block(hidden) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    @property
    def sample_shape(self) -> tuple[int]:
        """Shape ``(dim,)`` of one sample."""
        return (self.dim,)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | int | float, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted noise ``eps`` of the same shape as ``x`` (``y``: class labels, None: unconditional)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        t = batch_timesteps(t, x.shape[0], x.device)
        emb = timestep_embedding(t, self.time_dim, self.max_period).to(self.inp.weight.dtype)
        temb = self.temb(emb)
        if self.class_emb is not None:
            temb = temb + self.class_emb(y, x.shape[0], x.device)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(F.silu(self.norm_out(h)))
