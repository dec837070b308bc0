"""Exponential moving average of a model's weights, the weights that sampling uses.

    ema = EMA(model, decay=0.9999)
    ...; optimizer.step(); ema.update(model)
    samples = ddim_sample(ema.module, ...)

With ``warmup`` the decay after ``n`` updates is ``min(decay, (1 + n) / (10 + n))`` (a Python float from a
host counter). The update is three ``torch._foreach_*`` ops, so its weight may be a 0-dim device tensor a
captured CUDA graph reads at replay (no host sync; ``_foreach_lerp_`` would read it back). Buffers are
copied; a weight of 0 (a skipped step) leaves the average untouched. Details: docs/DESIGN.md ("EMA").
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """A frozen copy of ``model`` (``self.module``, eval mode, no gradients) tracking its weights."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0
        self._ema_params = list(self.module.parameters())
        self._ema_buffers = list(self.module.buffers())

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def lerp_(self, model: nn.Module, weight: float | torch.Tensor) -> None:
        """``ema <- ema + weight * (model - ema)`` for every parameter; buffers copied where ``weight > 0``.
        ``weight`` may be a 0-dim device tensor (a captured CUDA graph fills it before each replay; the
        step engine multiplies it by 0 to skip a non-finite step). Does not count."""
        params = [p.detach() for p in model.parameters()]
        if len(params) != len(self._ema_params):
            raise ValueError("EMA: the model's parameters do not match the tracked copy")
        if params:
            delta = torch._foreach_sub(params, self._ema_params)
            torch._foreach_mul_(delta, weight)  # the Tensor overload reads no scalar on the host
            torch._foreach_add_(self._ema_params, delta)
        for b_ema, b in zip(self._ema_buffers, model.buffers(), strict=True):
            if isinstance(weight, torch.Tensor):
                b_ema.copy_(torch.where(weight > 0, b, b_ema))
            elif weight > 0:
                b_ema.copy_(b)

    def update(self, model: nn.Module) -> None:
        """One EMA step: ``lerp_`` with weight ``1 - current_decay()``, then count it."""
        self.lerp_(model, 1.0 - self.current_decay())
        self.num_updates += 1

    def state_dict(self) -> dict:
        """The counter and settings (the weights are saved apart, from ``self.module``)."""
        return {"num_updates": self.num_updates, "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
