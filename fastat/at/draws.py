"""What one objective call draws, held as per-sample rows, and the helpers that slice and weigh rows.

    z = Noised(x0, t, a, s, radius, x_t, x_adv, eps, w)   # the whole batch's draw
    z.rows(slice(0, n))                                   # reg_frac's head, or a micro-batch (views)
    d = Drawn(z, head, keep, y)                           # kept across the K calls of gradient accumulation

Gradient accumulation splits a batch into micro-batches after its randomness is drawn (so the K calls
compute the function of one call); each call returns its rows' share of the batch's means (:func:`share`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastat.kernels import per_sample

__all__ = ["Drawn", "Noised", "labelled", "rows", "scaled", "share"]


@dataclass(frozen=True)
class Noised:
    """One call's draw, per sample on the device: the batch, timesteps, coefficients and radius, the
    noised batch ``x_t``, the noise and the random start ``w`` with ``x_adv = x_t + s w``."""

    x0: torch.Tensor
    t: torch.Tensor
    a: torch.Tensor
    s: torch.Tensor
    radius: torch.Tensor
    x_t: torch.Tensor
    x_adv: torch.Tensor
    eps: torch.Tensor
    w: torch.Tensor

    @property
    def n(self) -> int:
        return self.x0.shape[0]

    def rows(self, rows: slice) -> Noised:
        """The samples ``rows`` (views)."""
        return Noised(*(v[rows] for v in (self.x0, self.t, self.a, self.s, self.radius, self.x_t,
                                          self.x_adv, self.eps, self.w)))  # fmt: skip


@dataclass(frozen=True)
class Drawn:
    """A batch's draws: the whole batch ``z``, its regularised head (``None`` in ddpm; ``free``: its ``w``
    the kept one), ``free``'s ``keep`` and the class labels after label dropout (``None``: unconditional)."""

    z: Noised
    head: Noised | None
    keep: Callable[[str, torch.Tensor], torch.Tensor]
    y: torch.Tensor | None = None


def rows(v: torch.Tensor | float, rows: slice) -> torch.Tensor | float:
    """``v[rows]`` of a per-sample tensor (a view); a scalar as it is."""
    return v[rows] if isinstance(v, torch.Tensor) else v


def share(v: torch.Tensor, fraction: float) -> torch.Tensor:
    """A micro-batch's mean weighted by its share of the batch (no arithmetic for the whole batch)."""
    return v if fraction == 1.0 else v * fraction


def labelled(model: Callable, y: torch.Tensor | None) -> Callable:
    """``model(x, t)`` with its rows' labels, the first ``len(x)`` of ``y`` (a micro-batch's head);
    ``model`` itself without labels."""
    if y is None:
        return model
    return lambda x, t: model(x, t, y[: x.shape[0]])


def scaled(w: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor:
    """``c * w`` with a per-sample ``c`` (float32 arithmetic, ``w``'s dtype); 1 and 0 without arithmetic."""
    if isinstance(c, float):
        if c == 1.0:
            return w
        if c == 0.0:
            return torch.zeros_like(w)
        return (w.float() * c).to(w.dtype)
    return (w.float() * per_sample(c, w)).to(w.dtype)
