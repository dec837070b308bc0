"""Capturing the training step in a CUDA graph without risking the run: host-read detection, generator
snapshots, and the thin CUDA layer the engine captures through.

    with HostReadCheck() as check:          # any device: records ops that read device memory on the host
        engine.step(x0, lr)
    assert not check.reads, check.report()

    graph, out = capture_safely(CudaGraphs(device), fn, [generator])   # CaptureFailed: nothing changed

:class:`HostReadCheck` records host reads and host-to-device copies (what a graph cannot hold) with the
fastat line that issued them. :func:`capture_safely` puts every generator a failed capture touched back
(:class:`CaptureError` with one line if it cannot). Why and how: docs/DESIGN.md ("Capture").
"""

from __future__ import annotations

import contextlib
import functools
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastat.kernels as _kernels
from fastat.utils.errors import one_line

__all__ = [
    "CaptureError",
    "CaptureFailed",
    "CudaGraphs",
    "GeneratorSnapshot",
    "HostReadCheck",
    "capture_safely",
]

_aten = torch.ops.aten
# Ops whose result the host must wait for (a device-to-host read; on CUDA a synchronisation).
HOST_READ_OPS = {
    _aten._local_scalar_dense: ".item() / float() / bool() / a Scalar argument given a tensor",
    _aten.is_nonzero: "bool(tensor)",
    _aten.equal: "torch.equal",
    _aten.nonzero: "nonzero (data-dependent shape)",
    _aten.masked_select: "masked_select (data-dependent shape)",
    _aten._unique2: "unique (data-dependent shape)",
    _aten.unique_consecutive: "unique_consecutive (data-dependent shape)",
    _aten.unique_dim: "unique (data-dependent shape)",
    # torch.tensor(python data): built on the host, then copied (to CUDA: a host-to-device copy)
    _aten.lift_fresh: "torch.tensor(host data) (a host-to-device copy on CUDA)",
}
# Copies checked for a CPU source and a destination on another device (``t.to(dev)``, ``dst.copy_(t)``):
# on CUDA a host-to-device copy, which synchronises (pageable memory) and cannot be replayed with new data.
_COPY_OPS = {_aten._to_copy, _aten.copy_, _aten.copy}
# What a host read is blamed on: fastat/ and its kernels/ (a top-level folder of the checkout, installed
# as fastat.kernels), never a site-packages or virtualenv inside them.
_PACKAGE_DIRS = (Path(__file__).resolve().parent.parent, Path(_kernels.__file__).resolve().parent)
_NOT_OURS = ("site-packages", "dist-packages", "tests")


class CaptureError(RuntimeError):
    """A capture failed and left state that cannot be repaired: the run must stop (one-line message)."""


class CaptureFailed(RuntimeError):
    """A capture failed and everything it touched was put back: the step can run uncaptured."""


class HostReadCheck(TorchDispatchMode):
    """Record the host reads (see ``HOST_READ_OPS``) of everything run inside the block.

    ``reads``: ``(op, what it is, where)`` with ``where`` the innermost fastat source line (or the
    innermost Python line outside torch). :meth:`paused` lets a caller exempt a region (e.g. an
    optimizer whose CPU kernel reads its learning rate on the host, while its CUDA kernel does not).
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str, str]] = []
        self._paused = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = getattr(func, "overloadpacket", None)
        if not self._paused and packet in HOST_READ_OPS:
            self.reads.append((str(func), HOST_READ_OPS[packet], _caller()))
        out = func(*args, **(kwargs or {}))
        if not self._paused and packet in _COPY_OPS and _host_to_device(packet, args, out):
            self.reads.append((str(func), "a host-to-device copy of host memory", _caller()))
        return out

    def report(self) -> str:
        """One line per distinct read: ``count x op (what) at file:line``."""
        counts: dict[tuple[str, str, str], int] = {}
        for r in self.reads:
            counts[r] = counts.get(r, 0) + 1
        return "\n".join(f"{n} x {op} ({what}) at {where}" for (op, what, where), n in counts.items())


def _host_to_device(packet, args, out) -> bool:
    """Whether a copy op read a CPU tensor into a tensor on another device."""
    src, dst = (args[1], args[0]) if packet in (_aten.copy_, _aten.copy) else (args[0], out)
    is_t = isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)
    return is_t and src.device.type == "cpu" and dst.device.type != "cpu"


def _caller() -> str:
    frames = traceback.extract_stack()[:-2]
    mine = [f for f in frames if _is_ours(f.filename)]
    outside_torch = [f for f in frames if "/torch/" not in f.filename and "/triton/" not in f.filename]
    f = (mine or outside_torch or frames)[-1]
    return f"{Path(f.filename).name}:{f.lineno} ({f.line})"


@functools.lru_cache(maxsize=4096)
def _is_ours(filename: str) -> bool:
    """Whether a frame's file is fastat's own source (not a venv or site-packages inside the checkout)."""
    path = Path(filename).resolve()
    for root in _PACKAGE_DIRS:
        if path.is_relative_to(root):
            parts = path.relative_to(root).parts
            return not any(p in _NOT_OURS or p.startswith((".venv", "venv")) for p in parts[:-1])
    return False


# -- generators -----------------------------------------------------------------------------------------


class GeneratorSnapshot:
    """The state of some random generators, restorable even after a failed capture left them in capture
    mode: CUDA generators get a clone of their state object back (``graphsafe_set_state``), every
    generator its seed and offset (``set_state``)."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list({id(g): g for g in generators}.values())
        self._states = [g.get_state() for g in self.generators]
        self._clones = [
            g.clone_state() if _is_cuda(g) and hasattr(g, "clone_state") else None for g in self.generators
        ]

    def restore(self) -> None:
        """Put every generator back and check that it draws; :class:`CaptureError` if one cannot."""
        for g, state, clone in zip(self.generators, self._states, self._clones, strict=True):
            try:
                if _is_cuda(g):
                    if clone is None or not hasattr(g, "graphsafe_set_state"):
                        raise RuntimeError(
                            f"torch {torch.__version__} cannot reset a generator's capture state"
                        )
                    g.graphsafe_set_state(clone)
                g.set_state(state)
                torch.randint(0, 2, (1,), generator=g, device=g.device)  # raises if still capturing
                g.set_state(state)
            except Exception as e:  # noqa: BLE001 - whatever the cause, the run cannot go on with it
                raise CaptureError(
                    f"CUDA-graph capture failed and left the {g.device} random generator unusable "
                    f"({type(e).__name__}: {one_line(e, first_only=True)[:200]}); rerun with --no-fast"
                ) from None


def _is_cuda(g: torch.Generator) -> bool:
    return g.device.type == "cuda"


# -- the CUDA layer -------------------------------------------------------------------------------------


class CudaGraphs:
    """What the engine needs from CUDA to capture its step: a side stream for the warm-up steps, the
    generators a capture touches, and the capture itself. (Tests replace it with a CPU stand-in that
    has the same methods.)"""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.device = device
        self._stream = torch.cuda.Stream(device)  # warm-up
        self._capture_stream = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        """Run a block on the side stream (warm-up before capture must not run on the default stream)."""
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        try:
            with torch.cuda.stream(self._stream):
                yield
        finally:
            current.wait_stream(self._stream)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def sync_check(self) -> Iterator[list[str]]:
        """Yield a list that receives the message of every synchronising CUDA call made inside the block
        (``torch.cuda.set_sync_debug_mode("warn")``: the block still runs to its end)."""
        found: list[str] = []
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield found
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        for w in caught:
            if "synchroniz" in str(w.message):
                found.append(str(w.message).strip().splitlines()[0])
            else:  # not ours: pass it on
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def generators(self, registered: Sequence[torch.Generator]) -> list[torch.Generator]:
        """Every generator a capture touches: the registered ones and the device's default generator."""
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return [*registered, torch.cuda.default_generators[index]]

    def capture(self, fn: Callable[[], object], registered: Sequence[torch.Generator]):
        """``(graph, fn's outputs)``: ``fn`` captured once; ``graph.replay()`` reruns it.

        If the capture fails, the current stream is put back before the error propagates:
        ``torch.cuda.graph.__exit__`` skips restoring it when ``capture_end`` raises."""
        graph = torch.cuda.CUDAGraph()
        for g in registered:
            if _is_cuda(g):
                graph.register_generator_state(g)
        previous = torch.cuda.current_stream(self.device)
        try:
            # thread_local: another thread's CUDA calls (a data loader's) cannot invalidate this capture
            with torch.cuda.graph(graph, stream=self._capture_stream, capture_error_mode="thread_local"):
                out = fn()
        except BaseException:
            torch.cuda.set_stream(previous)
            with torch.cuda.stream(self._capture_stream):
                if torch.cuda.is_current_stream_capturing():
                    raise CaptureError("CUDA-graph capture failed and its stream is still capturing; "
                                       "rerun with --no-fast") from None  # fmt: skip
            raise
        return graph, out


def capture_safely(backend, fn: Callable[[], object], registered: Sequence[torch.Generator]):
    """``backend.capture(fn, registered)``, or, if that raises, every generator it touched put back and
    :class:`CaptureFailed` (or :class:`CaptureError` when a generator or the stream cannot be repaired)."""
    snapshot = GeneratorSnapshot(backend.generators(registered))
    try:
        return backend.capture(fn, registered)
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001 - capture fails in many ways; all of them are handled alike
        snapshot.restore()
        raise CaptureFailed(f"{type(e).__name__}: {one_line(e, first_only=True)[:200]}") from e
