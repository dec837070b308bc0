"""Minibatch replay for ``--mode free``: the device state that carries one batch across its m steps.

    replay = Replay(m=2)
    fresh = replay.begin(x0)                     # 0-dim bool on the device: this step starts a batch
    x0 = replay.keep("x0", fresh, x0)            # the new batch on a fresh step, the kept one otherwise
    t = replay.keep("t", fresh, t_drawn)         # ... and so for every value the replays share
    replay.end()                                 # the position moves on (on the device)
    replay.step_done()                           # the host's count (the engine's, once per step)

The position lives on the device and every kept value is ``torch.where(fresh, new, kept)`` written back
into its buffer, so one step body (and one captured CUDA graph) serves fresh steps and replays with no
host read. The host keeps its own count for :meth:`Replay.wants_batch`. One buffer set per batch shape;
``state_dict()`` resumes bit-exactly between two replays. Design: docs/DESIGN.md ("Loss: free").
"""

from __future__ import annotations

import torch

from fastat.utils.checks import must

__all__ = ["Replay", "check_replays"]


def check_replays(m) -> int:
    """``m`` if it is a valid replay count (an integer >= 1), else a ValueError."""
    if not (isinstance(m, int) and not isinstance(m, bool) and m >= 1):
        raise must("replays", "an integer >= 1", m)
    return m


class Replay:
    """The replay position and the values one batch shares across its ``m`` steps."""

    def __init__(self, m: int) -> None:
        self.m = check_replays(m)
        self._sets: dict[tuple, dict[str, torch.Tensor]] = {}  # batch key -> {"k": position, name: buffer}
        self._key: tuple | None = None  # the set of the last batch seen
        self._host_k = 0  # the host's copy of the position (counted by step_done, never read back)

    @staticmethod
    def _batch_key(x0: torch.Tensor) -> tuple:
        return (tuple(x0.shape), x0.dtype, x0.device)

    def begin(self, x0: torch.Tensor | None) -> torch.Tensor:
        """Select the buffers of ``x0``'s shape (``None``: the last batch's) and return the 0-dim bool
        device tensor ``k == 0``: whether this step starts a new batch."""
        if x0 is not None:
            self._key = self._batch_key(x0)
            if self._key not in self._sets:
                self._sets[self._key] = {"k": torch.zeros((), dtype=torch.int64, device=x0.device)}
        elif self._key is None:
            raise ValueError("mode free: x0 is None (replay the last batch) but no batch was given yet")
        return self._sets[self._key]["k"] == 0

    @property
    def key(self) -> tuple | None:
        """The batch key (shape, dtype, device) of the set in use (None before the first batch)."""
        return self._key

    def keep(self, name: str, fresh: torch.Tensor, new: torch.Tensor | None) -> torch.Tensor:
        """``new`` on a fresh step, the kept value otherwise; the result is kept for the next replays.
        ``new=None`` returns the kept value itself (only once one was kept)."""
        bufs = self._sets[self._key]
        buf = bufs.get(name)
        if new is None:
            if buf is None:
                raise ValueError(f"mode free: nothing kept under {name!r} to replay")
            return buf
        if buf is None or buf.shape != new.shape or buf.dtype != new.dtype:
            buf = bufs[name] = torch.zeros_like(new, memory_format=torch.contiguous_format)
        value = torch.where(fresh, new, buf)
        buf.copy_(value)
        return value

    def kept(self, name: str) -> bool:
        """Whether the current batch keeps a value under ``name`` (a host-side dict lookup)."""
        return self._key is not None and name in self._sets[self._key]

    def buffer(self, name: str) -> torch.Tensor:
        """The kept buffer ``name`` of the current batch (to write the next replay's value into)."""
        return self._sets[self._key][name]

    def end(self) -> None:
        """Move the position on: ``k = (k + 1) % m`` in place on the device."""
        self._sets[self._key]["k"].add_(1).remainder_(self.m)

    # -- the host's side: no device reads -------------------------------------------------------------

    def wants_batch(self) -> bool:
        """Whether the next step starts a new batch, by the host's count of the steps done."""
        return self._host_k == 0

    def step_done(self, replayed: tuple | None = None) -> None:
        """Count a step on the host. ``replayed``: the step was a CUDA-graph replay, which runs no Python
        (so no :meth:`begin`); the :attr:`key` taken after its capture is made current again, so that
        :meth:`state_dict` saves the captured batch's set after a batch of another shape."""
        self._host_k = (self._host_k + 1) % self.m
        if replayed is not None:
            if replayed not in self._sets:
                raise KeyError(f"no replay state for a batch {replayed}")
            self._key = replayed

    # -- checkpoints -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The current batch's position and buffers (clones: a later step does not change them)."""
        if self._key is None:
            return {"m": self.m}
        return {"m": self.m, **{k: v.detach().clone() for k, v in self._sets[self._key].items()}}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        """Continue from ``state`` (its tensors moved to ``device``, default: where they are): copied into
        the existing buffers of that shape (a captured graph keeps reading them), else allocated.
        ``{"m": m}`` alone (nothing kept yet) resets to the start. Saved with another ``m``, a position
        that does not exist under this one starts a new batch."""
        if "x0" not in state:
            self._sets, self._key, self._host_k = {}, None, 0
            return
        values = {}
        for name, value in state.items():
            if name == "m":
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"replay state {name!r} is not a tensor")
            values[name] = value.detach().to(device if device is not None else value.device)
        if values["k"].shape != () or values["k"].dtype != torch.int64:
            raise ValueError("replay state 'k' must be a 0-dim int64 tensor")
        if int(values["k"]) >= self.m:
            values["k"] = torch.zeros_like(values["k"])
        key = self._batch_key(values["x0"])
        bufs = self._sets.setdefault(key, {})
        for name, value in values.items():
            old = bufs.get(name)
            if old is not None and old.shape == value.shape and old.dtype == value.dtype:
                old.copy_(value)
            else:
                bufs[name] = value.clone()
        self._key = key
        self._host_k = int(values["k"])  # a host read, once, at load

    @property
    def position(self) -> int:
        """The replay index of the next step (a host read: for checkpoints and tests, not the step)."""
        if self._key is None:
            return 0
        return int(self._sets[self._key]["k"])
