"""The gradient average of a data-parallel step: :class:`GradSync`, the step engine's ``reduce_grads``.

    sync = ctx.grad_sync(model)   # a GradSync with more than one rank, else None
    mean_loss = sync(loss)        # once per step, after the training backward: gradients averaged in place

No autograd hook: the attack's input-only backward cannot start a collective, and the one explicit call
in the step body is what a CUDA graph captures (why not DDP: docs/DESIGN.md, "Many processes").
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["BUCKET_BYTES", "GradSync"]

BUCKET_BYTES = 64 << 20  # gradient bucket: few, large all-reduces (a CUDA graph replays them as they are)


class GradSync:
    """Averages the gradients of ``params`` over the ranks, and the loss with them: the step engine's
    ``reduce_grads`` hook, called once per step after the training backward. ``ctx``: the run's
    :class:`fastat.train.distributed.DistContext` (its ``world_size`` and ``talking``).

    The gradients are packed into flat buckets of at most :data:`BUCKET_BYTES` (one per dtype at least),
    each summed over the ranks by one all-reduce and divided by the world size, then copied back. The
    bucket layout is computed on the first call (host only, again only if the set of gradients changes).
    Shapes and allocations are the same every step, so a CUDA graph can capture it.
    """

    def __init__(self, params: list[torch.Tensor], ctx: Any, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.params, self.ctx, self.bucket_bytes = params, ctx, bucket_bytes
        self._key: tuple | None = None  # which parameters have gradients, and their dtypes
        self._layout: list[list[int]] = []  # parameter indices per bucket, computed once per key

    def _buckets(self) -> list[list[torch.Tensor]]:
        """The gradients in buckets: one dtype each, parameter order within a dtype (the layout is
        computed again only when the parameters that have gradients, or their dtypes, change)."""
        grads = [p.grad for p in self.params]
        key = tuple(None if g is None else g.dtype for g in grads)
        if key != self._key:
            self._key, self._layout, size = key, [], 0
            present = [i for i, g in enumerate(grads) if g is not None]
            last = None
            for i in sorted(present, key=lambda i: str(key[i])):  # stable: parameter order within a dtype
                nbytes = grads[i].numel() * grads[i].element_size()
                if not self._layout or key[i] != last or size + nbytes > self.bucket_bytes:
                    self._layout.append([])
                    size, last = 0, key[i]
                self._layout[-1].append(i)
                size += nbytes
        return [[grads[i] for i in bucket] for bucket in self._layout]

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        """Average the gradients in place; returns the mean of ``loss`` (0-dim) over the ranks."""
        import torch.distributed as dist

        buckets = self._buckets()
        # the loss rides along in the first float32 bucket (else in a bucket of its own)
        lead = next((b for b in buckets if b[0].dtype == torch.float32), None)
        if lead is None:
            lead = []
            buckets.insert(0, lead)
        with self.ctx.talking("the gradient all-reduce"):
            for bucket in buckets:
                parts = [g.reshape(-1) for g in bucket]
                if bucket is lead:
                    parts.insert(0, loss.detach().float().reshape(1))
                flat = torch.cat(parts)
                dist.all_reduce(flat)
                flat.div_(self.ctx.world_size)
                if bucket is lead:
                    mean_loss, flat = flat[0], flat[1:]
                if bucket:
                    views = flat.split([g.numel() for g in bucket])
                    torch._foreach_copy_(bucket, [v.view_as(g) for v, g in zip(views, bucket, strict=True)])
        return mean_loss.to(loss.dtype)
