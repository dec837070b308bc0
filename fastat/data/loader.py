"""The batch source of the training loop: the whole dataset as one tensor on the training device.

For small-resolution sets (the known distributions, CIFAR-10: 50k x 3x32x32 float32 = 614 MB) holding
everything on the GPU means a batch is one ``index_select`` on the device: no workers, no host copies,
no host sync, and data loading never starves the step.

Order and flips are drawn on the CPU, once per epoch, from two generators of their own (so turning
flips on does not change the order, and batches do not depend on the device), then moved to the device
in one copy. ``state_dict()`` holds the generator states *at the start of the current epoch* plus the
epoch and the position in it; loading it regenerates that epoch's order and flips, so a resumed run
sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ._errors import derive_seed


class TensorLoader:
    """Shuffled fixed-size batches of ``data`` (``(N, ...)``), kept on ``device`` as one tensor.

    - each epoch is a fresh random permutation; with ``drop_last`` (default) every batch has exactly
      ``batch_size`` rows (fixed shapes, as a captured CUDA graph needs) and the last ``N % batch_size``
      samples of the permutation are left out of that epoch;
    - ``flip``: random horizontal flips (probability 1/2 per sample per epoch), images ``(N, C, H, W)``
      only, applied on the device;
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
    ) -> None:
        if not isinstance(data, torch.Tensor) or data.dim() < 1:
            raise TypeError("data must be a tensor of shape (N, ...)")
        n = data.shape[0]
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({n} samples)")
        if flip and data.dim() != 4:
            raise ValueError(f"flip is for images (N, C, H, W); data has shape {tuple(data.shape)}")
        self.device = torch.device(device) if device is not None else data.device
        self.data = data.to(self.device).contiguous()
        self.batch_size, self.flip, self.drop_last = batch_size, bool(flip), bool(drop_last)
        self.seed = int(generator_seed)
        self._g_order = torch.Generator().manual_seed(derive_seed(self.seed, "loader-order"))
        self._g_flip = torch.Generator().manual_seed(derive_seed(self.seed, "loader-flip"))
        self.epoch = 0
        self.position = 0  # batches already handed out in this epoch
        self._start_epoch()

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = len(self.data), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    # -- batches -------------------------------------------------------------------------------------
    def next_batch(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The next batch (moving on to a new epoch when this one is used up).

        ``out``: a preallocated ``(batch_size, ...)`` tensor on the device (e.g. a CUDA graph's static
        input) to write the batch into, which is then returned.
        """
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
            self._start_epoch()
        start = self.position * self.batch_size
        idx = self._order[start : start + self.batch_size]
        self.position += 1
        if out is not None and out.shape[0] != idx.shape[0]:
            raise ValueError(f"out has {out.shape[0]} rows, the batch has {idx.shape[0]}")
        batch = torch.index_select(self.data, 0, idx, out=out) if out is not None else self.data[idx]
        if self.flip:
            mask = self._flips[start : start + self.batch_size].view(-1, 1, 1, 1)
            flipped = torch.where(mask, batch.flip(-1), batch)
            batch = out.copy_(flipped) if out is not None else flipped
        return batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        """The remaining batches of the current epoch."""
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
            self._start_epoch()
        while self.position < len(self):
            yield self.next_batch()

    def _start_epoch(self) -> None:
        self._order_state = self._g_order.get_state()
        self._flip_state = self._g_flip.get_state()
        n = len(self.data)
        self._order = torch.randperm(n, generator=self._g_order).to(self.device)
        if self.flip:
            self._flips = (torch.rand(n, generator=self._g_flip) < 0.5).to(self.device)

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain ints and uint8 tensors (safe for ``torch.load(weights_only=True)``)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "order_generator": self._order_state.clone(),
            "flip_generator": self._flip_state.clone(),
            "num_samples": len(self.data),
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the loader that wrote ``state`` stood (same data size and batch size)."""
        mine = {"num_samples": len(self.data), "batch_size": self.batch_size, "drop_last": self.drop_last}
        for key in mine:
            if state[key] != mine[key]:
                raise ValueError(f"loader state has {key}={state[key]}, this loader has {mine[key]}")
        self._g_order.set_state(state["order_generator"].cpu())
        self._g_flip.set_state(state["flip_generator"].cpu())
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._start_epoch()
