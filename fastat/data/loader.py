"""The batch source for float data held whole on the training device (the known distributions).

For small sets (the known distributions: a few MB) holding everything on the device means a batch is
one ``index_select`` on the device: no workers, no host copies, no host sync, and data loading never
starves the step. Real image sets go through :mod:`fastat.data.placement` instead (uint8, on the
device or streamed), with the same order.

Which samples each batch holds, and which are flipped, comes from :class:`fastat.data.order.EpochOrder`
(one shuffled global order per epoch, split across ranks, resumable mid-epoch).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from .order import EpochOrder


class Labelled(NamedTuple):
    """A batch with its class labels (class-conditional training): what the step engine unpacks."""

    x: torch.Tensor
    y: torch.Tensor


class TensorLoader:
    """Shuffled fixed-size batches of ``data`` (``(N, ...)``), kept on ``device`` as one tensor.

    - each epoch is a fresh random permutation; with ``drop_last`` (default) every batch has exactly
      ``batch_size`` rows (fixed shapes, as a captured CUDA graph needs) and the last ``N % batch_size``
      samples of the permutation are left out of that epoch;
    - ``flip``: random horizontal flips (probability 1/2 per sample per epoch), images ``(N, C, H, W)``
      only, applied on the device;
    - ``rank`` / ``world_size``: this process's share of each global batch of ``batch_size`` rows;
    - ``next_batch()`` is an endless stream across epochs; ``for x in loader`` yields the rest of the
      current epoch (then the epoch advances); ``len(loader)`` is the number of batches per epoch.

    >>> loader = TensorLoader(x, 128, generator_seed=0, device="cuda", flip=True)
    >>> batch = loader.next_batch()
    """

    def __init__(
        self,
        data: torch.Tensor,
        batch_size: int,
        *,
        generator_seed: int,
        device: torch.device | str | None = None,
        flip: bool = False,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        labels: torch.Tensor | None = None,  # (N,) int64 class labels: batches are Labelled(x, y)
    ) -> None:
        if not isinstance(data, torch.Tensor) or data.dim() < 1:
            raise TypeError("data must be a tensor of shape (N, ...)")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if flip and data.dim() != 4:
            raise ValueError(f"flip is for images (N, C, H, W); data has shape {tuple(data.shape)}")
        self.device = torch.device(device) if device is not None else data.device
        self.order = EpochOrder(data.shape[0], batch_size, seed=generator_seed, flip=flip, rank=rank,
                                world_size=world_size, drop_last=drop_last, device=self.device)  # fmt: skip
        self.data = data.to(self.device).contiguous()
        if labels is not None and tuple(labels.shape) != (data.shape[0],):
            raise ValueError(f"labels must have shape ({data.shape[0]},), got {tuple(labels.shape)}")
        self.labels = labels.to(self.device, torch.long) if labels is not None else None
        self.batch_size, self.flip, self.drop_last = batch_size, bool(flip), bool(drop_last)
        self.seed = int(generator_seed)

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.order)

    @property
    def epoch(self) -> int:
        return self.order.epoch

    @property
    def position(self) -> int:
        """Batches already handed out in this epoch."""
        return self.order.position

    # -- batches -------------------------------------------------------------------------------------
    def next_batch(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The next batch (moving on to a new epoch when this one is used up).

        ``out``: a preallocated ``(batch_size, ...)`` tensor on the device (e.g. a CUDA graph's static
        input) to write the batch into, which is then returned.
        """
        idx, flips = self.order.next()
        if out is not None and out.shape[0] != idx.shape[0]:
            raise ValueError(f"out has {out.shape[0]} rows, the batch has {idx.shape[0]}")
        batch = torch.index_select(self.data, 0, idx, out=out) if out is not None else self.data[idx]
        if flips is not None:
            flipped = torch.where(flips.view(-1, 1, 1, 1), batch.flip(-1), batch)
            batch = out.copy_(flipped) if out is not None else flipped
        return batch if self.labels is None else Labelled(batch, self.labels[idx])

    def __iter__(self) -> Iterator[torch.Tensor]:
        """The remaining batches of the current epoch."""
        if self.order.epoch_done():
            self.order.next_epoch()
        while not self.order.epoch_done():
            yield self.next_batch()

    def close(self) -> None:
        """Nothing runs in the background (the same interface as the image loaders)."""

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain ints and uint8 tensors (safe for ``torch.load(weights_only=True)``)."""
        return self.order.state_dict()

    def load_state_dict(self, state: dict, *, strict: bool = True) -> bool:
        """Continue exactly where the loader that wrote ``state`` stood (see
        :meth:`EpochOrder.load_state_dict`); returns whether the continuation is exact."""
        return self.order.load_state_dict(state, strict=strict)
