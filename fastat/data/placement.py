"""Batches of a uint8 image set for the training step: held on the device, or streamed; one interface.

    loader = image_loader(images, 256, seed=0, device="cuda", placement="auto", flip=True)
    batch = loader.next_batch()          # Batch(images uint8 (B, C, H, W), index int64 (B,), flip bool (B,))
    x0 = loader.transform(batch)         # float32 in [-1, 1], flipped, corrupted: run inside the step
    state = loader.state_dict()          # exact mid-epoch resume: loader.load_state_dict(state)

``images`` is a :class:`fastat.data.PreparedImages` or a :class:`MemoryImages`. Placements ``device``
(:class:`DeviceImages`), ``stream`` (:class:`StreamImages`: worker threads, pinned buffers, async copies)
and ``auto`` (:func:`choose_placement`) give the very same batches for the same seed. Batches cross to
the device as uint8; :class:`ImageTransform` runs in the step. Details: docs/DESIGN.md ("Batches").
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from ._errors import DatasetError
from .corrupt import IndexedCorruption
from .loader import Labelled
from .order import EpochOrder

__all__ = [
    "PLACEMENTS",
    "Batch",
    "DeviceImages",
    "FloatView",
    "ImageTransform",
    "MemoryImages",
    "StreamImages",
    "choose_placement",
    "free_memory",
    "image_loader",
]

PLACEMENTS = ("auto", "device", "stream")
DEFAULT_BUDGET_FRACTION = 0.25


class Batch(NamedTuple):
    """One batch as the loaders hand it out: uint8 pixels, the samples' indices, their flips."""

    images: torch.Tensor  # uint8 (B, C, H, W)
    index: torch.Tensor  # int64 (B,)
    flip: torch.Tensor  # bool (B,)


class MemoryImages:
    """A uint8 ``(N, C, H, W)`` tensor with the reading interface of :class:`fastat.data.PreparedImages`."""

    def __init__(self, images: torch.Tensor, source: str = "", labels: torch.Tensor | None = None,
                 classes: tuple[str, ...] | None = None) -> None:  # fmt: skip
        if images.dtype != torch.uint8 or images.dim() != 4 or images.device.type != "cpu":
            raise TypeError(
                f"expected a CPU uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}"
            )
        self.images, self.source = images.contiguous(), source
        self.labels, self.classes = labels, classes  # as PreparedImages': int64 (N,) and the names
        self.shape = tuple(images.shape[1:])
        self.count = images.shape[0]
        self.nbytes = self.images.numel()

    def __len__(self) -> int:
        return self.count

    def head(self, k: int) -> MemoryImages:
        """The first ``k`` images (a view, no copy)."""
        k = max(0, int(k))
        return MemoryImages(self.images[:k], self.source, self.labels[:k] if self.labels is not None else None,
                            self.classes)  # fmt: skip

    def read_into(self, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.index_select(self.images, 0, index, out=out)

    def read_range(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        part = self.images[max(0, start) : stop]
        return part.clone() if out is None else out.copy_(part)


class ImageTransform:
    """uint8 batch -> the float32 training batch: ``x / 127.5 - 1``, mirrored where ``flip``, then the
    dataset's corruption (if any) by sample index. Pure tensor ops on the batch's device: no host
    reads, fixed shapes, so it can run inside a captured CUDA graph. ``labels`` (int64 ``(N,)``, kept on
    the device; class-conditional training): the batch comes as ``Labelled(x, labels[index])``."""

    def __init__(
        self, corruption: IndexedCorruption | None = None, device: torch.device | str = "cpu",
        labels: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        self.corruption = corruption.to(device) if corruption is not None and corruption.active else None
        self.labels = labels.to(device, torch.int64) if labels is not None else None

    def __call__(self, batch: Batch) -> torch.Tensor | Labelled:
        # flip while still uint8 (4x less to move than float32)
        images = torch.where(batch.flip.view(-1, 1, 1, 1), batch.images.flip(-1), batch.images)
        x = images.to(torch.float32).div_(127.5).sub_(1.0)
        if self.corruption is not None:
            x = self.corruption.apply(x, batch.index)
        return x if self.labels is None else Labelled(x, self.labels.index_select(0, batch.index))


# -- placements ------------------------------------------------------------------------------------------


class _Loader:
    """What both placements share: the order, the transform, the interface."""

    placement = ""

    def __init__(self, images, order: EpochOrder, transform: ImageTransform, device: torch.device) -> None:
        self.images, self.order, self.transform, self.device = images, order, transform, device
        self.batch_size = order.local_batch_size
        self._no_flip = torch.zeros(self.batch_size, dtype=torch.bool, device=order.device)

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.order)

    def _next_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx, flips = self.order.next()
        return idx, flips if flips is not None else self._no_flip[: idx.shape[0]]

    def close(self) -> None:
        """Stop background work (nothing for the device placement)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DeviceImages(_Loader):
    """Placement ``device``: the uint8 set held whole on ``device``; a batch is an ``index_select``."""

    placement = "device"

    def __init__(self, images, order: EpochOrder, transform: ImageTransform, device: torch.device,
                 chunk_bytes: int = 256 << 20) -> None:  # fmt: skip
        super().__init__(images, order, transform, device)
        n, shape = len(images), tuple(images.shape)
        if device.type == "cpu" and isinstance(images, MemoryImages):
            self.data = images.images  # already in RAM: no copy
            return
        self.data = torch.empty((n, *shape), dtype=torch.uint8, device=device)
        rows = max(1, chunk_bytes // max(1, self.data[0].numel()))
        if device.type == "cpu":
            for i in range(0, n, rows):
                images.read_range(i, min(i + rows, n), out=self.data[i : i + rows])
            return
        staging = torch.empty((min(rows, n), *shape), dtype=torch.uint8).pin_memory()
        for i in range(0, n, rows):
            m = min(rows, n - i)
            torch.cuda.current_stream(device).synchronize()  # the previous copy out of `staging` is done
            images.read_range(i, i + m, out=staging[:m])
            self.data[i : i + m].copy_(staging[:m], non_blocking=True)
        torch.cuda.current_stream(device).synchronize()

    @property
    def epoch(self) -> int:
        return self.order.epoch

    def next_batch(self) -> Batch:
        idx, flips = self._next_indices()
        return Batch(self.data.index_select(0, idx), idx, flips)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict, *, strict: bool = True) -> bool:
        return self.order.load_state_dict(state, strict=strict)


class _Slot:
    """One batch in flight: host buffers (pinned on CUDA), device buffers and their events."""

    def __init__(self, b: int, shape: tuple, device: torch.device) -> None:
        cuda = device.type == "cuda"
        host = [torch.empty((b, *shape), dtype=torch.uint8), torch.empty(b, dtype=torch.int64),
                torch.empty(b, dtype=torch.bool)]  # fmt: skip
        self.host = [t.pin_memory() for t in host] if cuda else host
        self.dev = [torch.empty_like(t, device=device) for t in host] if cuda else self.host
        self.copied = torch.cuda.Event() if cuda else None  # the host -> device copy is done
        self.consumed = torch.cuda.Event() if cuda else None  # the step has read the device buffers


class StreamImages(_Loader):
    """Placement ``stream``: ``workers`` threads read batches ahead (see the module docstring).

    A returned batch stays valid until the next call of :meth:`next_batch` on the CPU (its buffers are
    then refilled); on CUDA the step's reads are ordered before the refill by events, without a host
    sync.
    """

    placement = "stream"

    def __init__(self, images, order: EpochOrder, transform: ImageTransform, device: torch.device,
                 workers: int = 2, prefetch: int = 4) -> None:  # fmt: skip
        if order.device.type != "cpu":
            raise ValueError("the stream placement needs the order on the CPU")
        if workers < 1 or prefetch < 1:
            raise ValueError(f"workers and prefetch must be >= 1, got {workers}, {prefetch}")
        super().__init__(images, order, transform, device)
        self.cuda = device.type == "cuda"
        self.prefetch = prefetch
        self._slots = [_Slot(self.batch_size, tuple(images.shape), device) for _ in range(prefetch + 1)]
        self._copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="fastat-loader")
        self._pending: deque = deque()
        self._submitted = 0
        self._state = order.state_dict()  # the order's state after the last batch handed out
        self._fill_queue()

    @property
    def epoch(self) -> int:
        return int(self._state["epoch"])

    def _fill_queue(self) -> None:
        while len(self._pending) < self.prefetch:
            slot = self._slots[self._submitted % len(self._slots)]
            self._submitted += 1
            idx, flips = self._next_indices()
            if self.cuda:  # everything the step enqueued on this slot's previous batch comes before
                slot.consumed.record(torch.cuda.current_stream(self.device))
            fut = self._pool.submit(self._fill, slot, idx, flips)
            self._pending.append((slot, fut, self.order.state_dict()))

    def _fill(self, slot: _Slot, idx: torch.Tensor, flips: torch.Tensor) -> None:
        if self.cuda:
            slot.copied.synchronize()  # the previous host -> device copy out of these buffers is done
        self.images.read_into(idx, slot.host[0])
        slot.host[1].copy_(idx)
        slot.host[2].copy_(flips)
        if self.cuda:
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(slot.consumed)
                for d, h in zip(slot.dev, slot.host, strict=True):
                    d.copy_(h, non_blocking=True)
                slot.copied.record(self._copy_stream)

    def next_batch(self) -> Batch:
        slot, fut, state = self._pending.popleft()
        try:
            fut.result()
        except BaseException:
            self.close()
            raise
        self._state = state
        self._fill_queue()
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.copied)
        return Batch(*slot.dev)

    def _drain(self) -> None:
        while self._pending:
            _, fut, _ = self._pending.popleft()
            try:
                fut.result()
            except BaseException:  # noqa: BLE001 - being discarded
                pass

    def state_dict(self) -> dict:
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self._state.items()}

    def load_state_dict(self, state: dict, *, strict: bool = True) -> bool:
        self._drain()
        exact = self.order.load_state_dict(state, strict=strict)
        self._state = self.order.state_dict()
        self._fill_queue()
        return exact

    def close(self) -> None:
        self._drain()
        self._pool.shutdown(wait=True)


# -- choosing -----------------------------------------------------------------------------------------------


def free_memory(device: torch.device) -> tuple[int, str]:
    """Free bytes on ``device`` and what they are: free CUDA memory, or the available RAM on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "free RAM"


def choose_placement(requested: str, nbytes: int, device: torch.device,
                     budget_bytes: int | None = None) -> tuple[str, str]:  # fmt: skip
    """``(placement, reason)`` for a set of ``nbytes`` on ``device``. ``auto``: ``device`` when it fits
    ``budget_bytes`` (default 25% of :func:`free_memory`), else ``stream``. An explicit ``device`` that
    cannot fit the free memory at all is a :class:`DatasetError`."""
    if requested not in PLACEMENTS:
        raise DatasetError(f"unknown data placement {requested!r}; choose one of {', '.join(PLACEMENTS)}")
    gb = f"{nbytes / 1e9:.2f} GB as uint8"
    if requested == "stream":
        return "stream", f"requested (the set is {gb})"
    free, what = free_memory(device)
    if requested == "device":
        if nbytes > free:
            raise DatasetError(
                f"--data-placement device: the set ({gb}) does not fit the {what} ({free / 1e9:.2f} GB); "
                f"use --data-placement stream or auto"
            )
        return "device", f"requested (the set is {gb})"
    if budget_bytes is None:
        budget_bytes, rule = (
            int(DEFAULT_BUDGET_FRACTION * free),
            f"{DEFAULT_BUDGET_FRACTION:.0%} of the {what}",
        )
    else:
        rule = "data.device_budget_gb"
    fits = nbytes <= budget_bytes
    verdict = "fits" if fits else "exceeds"
    return (
        "device" if fits else "stream"
    ), f"the set ({gb}) {verdict} the budget of {budget_bytes / 1e9:.2f} GB ({rule})"


def image_loader(
    images,
    batch_size: int,
    *,
    seed: int,
    device: torch.device | str,
    placement: str = "auto",
    flip: bool = False,
    corruption: IndexedCorruption | None = None,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 2,
    prefetch: int = 4,
    budget_bytes: int | None = None,
    labels: torch.Tensor | None = None,
) -> DeviceImages | StreamImages:
    """The loader for ``images`` (see the module docstring). ``batch_size`` is global (all ranks);
    each rank gets ``batch_size // world_size`` rows of one shared order. The chosen placement and why
    are in ``loader.placement`` and ``loader.reason``. ``labels``: each batch's transform returns
    ``Labelled(x, y)`` (:class:`ImageTransform`)."""
    device = torch.device(device)
    where, reason = choose_placement(placement, int(images.nbytes), device, budget_bytes)
    transform = ImageTransform(corruption, device, labels)
    if where == "device":
        order = EpochOrder(len(images), batch_size, seed=seed, flip=flip, rank=rank, world_size=world_size,
                           device=device)  # fmt: skip
        loader: DeviceImages | StreamImages = DeviceImages(images, order, transform, device)
    else:
        order = EpochOrder(len(images), batch_size, seed=seed, flip=flip, rank=rank, world_size=world_size)
        loader = StreamImages(images, order, transform, device, workers=workers, prefetch=prefetch)
    loader.reason = reason
    return loader


class FloatView:
    """A uint8 image set seen as the float32 ``(N, C, H, W)`` tensor it stands for (``[-1, 1]``, with
    the corruption unless ``clean``), converted block by block on demand: for evaluation code that
    slices a training set (nearest neighbours, reference statistics) without a float copy of it.

    >>> view = FloatView(images, corruption)
    >>> view[0:1024]          # float32 (1024, C, H, W)
    """

    def __init__(self, images, corruption: IndexedCorruption | None = None, *, clean: bool = False) -> None:
        self.images = images
        self.transform = ImageTransform(None if clean else corruption)
        self.shape = (len(images), *images.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item: slice) -> torch.Tensor:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("FloatView supports contiguous slices only")
        start, stop, _ = item.indices(len(self))
        u8 = self.images.read_range(start, max(start, stop))
        idx = torch.arange(start, start + u8.shape[0])
        return self.transform(Batch(u8, idx, torch.zeros(u8.shape[0], dtype=torch.bool)))

    def blocks(self, block: int = 1024):
        """The whole set in order, ``block`` rows at a time."""
        for i in range(0, len(self), block):
            yield self[i : i + block]
