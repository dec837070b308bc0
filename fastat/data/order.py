"""Which samples each batch holds: one shuffled global order per epoch, split across ranks, resumable.

    order = EpochOrder(50_000, 512, seed=0, flip=True, rank=r, world_size=4)   # 128 per rank
    idx, flips = order.next()          # this rank's (128,) sample indices and flip flags
    state = order.state_dict()         # plain values; load_state_dict(state) continues exactly

Every rank draws the same global permutation and takes its slice of each global batch; the position is
counted in samples, so a run can continue with another world size or batch size (``strict=False``). The
state holds the generators at the start of the epoch: loading regenerates the permutation, so a resumed
run sees exactly the batches an uninterrupted one would. Details: docs/DESIGN.md ("Batches").
"""

from __future__ import annotations

import torch

from ._errors import derive_seed

__all__ = ["EpochOrder"]


class EpochOrder:
    """Sample indices and flip flags of each batch (see the module docstring).

    ``batch_size`` is the global batch (all ranks together); ``device`` is where :meth:`next` returns
    its tensors (the epoch's permutation is moved there once per epoch: no copy per batch).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        flip: bool = False,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        for name, v, lo in (("num_samples", num_samples, 1), ("batch_size", batch_size, 1),
                            ("world_size", world_size, 1), ("rank", rank, 0)):  # fmt: skip
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if rank >= world_size:
            raise ValueError(f"rank {rank} is not below world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"the batch size {batch_size} (global) must be divisible by the world size {world_size}"
            )
        if batch_size > num_samples:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({num_samples} samples)")
        if not drop_last and world_size > 1:
            raise ValueError("drop_last=False needs world_size 1 (ranks need equal batches)")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, int(seed)
        self.rank, self.world_size, self.flip, self.drop_last = rank, world_size, bool(flip), bool(drop_last)
        self.local_batch_size = batch_size // world_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._g_order = torch.Generator().manual_seed(derive_seed(self.seed, "loader-order"))
        self._g_flip = torch.Generator().manual_seed(derive_seed(self.seed, "loader-flip"))
        self.epoch = 0
        self.samples = 0  # global samples handed out in this epoch
        self._start_epoch()

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    @property
    def position(self) -> int:
        """Batches handed out in this epoch."""
        return -(-self.samples // self.batch_size)

    def epoch_done(self) -> bool:
        left = self.num_samples - self.samples
        return left < self.batch_size if self.drop_last else left <= 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's indices (int64 ``(local_batch_size,)``) and flips (bool, or None without flips)
        of the next batch, moving on to a new epoch when this one is used up."""
        if self.epoch_done():
            self.next_epoch()
        s = self.samples + self.rank * self.local_batch_size
        e = min(s + self.local_batch_size, self.num_samples)
        self.samples = min(self.samples + self.batch_size, self.num_samples)
        return self._order[s:e], (self._flips[s:e] if self.flip else None)

    def next_epoch(self) -> None:
        """Skip the rest of this epoch."""
        self.epoch += 1
        self.samples = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        self._order_state = self._g_order.get_state()
        self._flip_state = self._g_flip.get_state()
        n = self.num_samples
        self._order = torch.randperm(n, generator=self._g_order).to(self.device)
        if self.flip:
            self._flips = (torch.rand(n, generator=self._g_flip) < 0.5).to(self.device)

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain ints and uint8 tensors (safe for ``torch.load(weights_only=True)``)."""
        return {
            "epoch": self.epoch,
            "samples": self.samples,
            "position": self.position,
            "order_generator": self._order_state.clone(),
            "flip_generator": self._flip_state.clone(),
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict, *, strict: bool = True) -> bool:
        """Continue where the order that wrote ``state`` stood. The number of samples must match.
        ``strict`` (default) also requires the same global batch size and world size (then the batches
        are exactly those of an uninterrupted run); without it, the position in samples carries over.
        Returns whether the continuation is exact. States of older fastat versions (``position`` in
        batches, no ``samples``) load too."""
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"loader state has num_samples={state['num_samples']}, this loader has {self.num_samples}"
            )
        mine = {"batch_size": self.batch_size, "world_size": self.world_size, "drop_last": self.drop_last}
        theirs = {"world_size": 1, **{k: state[k] for k in mine if k in state}}
        exact = theirs == mine
        if strict and not exact:
            key = next(k for k in mine if theirs.get(k) != mine[k])
            raise ValueError(f"loader state has {key}={theirs.get(key)}, this loader has {mine[key]}")
        self._g_order.set_state(state["order_generator"].cpu())
        self._g_flip.set_state(state["flip_generator"].cpu())
        self.epoch = int(state["epoch"])
        samples = state.get("samples")
        self.samples = int(
            samples if samples is not None else int(state["position"]) * int(state["batch_size"])
        )
        self._start_epoch()
        return exact
