"""Seeds for many uses and many processes: derived seeds, per-rank generators, a self-advancing noise stream.

    g = rank_generator(0, device="cuda")             # this process's own stream (rank from torch.distributed)
    t = schedule.sample_t(B, g, device="cuda")       # each rank draws its own timesteps, noise, w
    stream = NoiseStream(0, device="cuda")           # a Philox (seed, offset) pair on the device, per rank
    x_t, x_adv, eps, w0 = ops.noise_inject(x0, a, s, r, stream)   # uses the offset, then advances it

Two generators seeded alike hand out the same bits: under data parallelism every rank would draw the
same t, eps and w (the "independent" noise of N GPUs would be one noise N times). :func:`rank_seed`
derives a different, stable 63-bit seed for each (seed, rank, tag). The rank defaults to
``torch.distributed.get_rank()`` when a process group is initialised, else the ``RANK`` environment
variable (set by ``torchrun`` and ``accelerate launch``), else 0 — read at call time, never at import.
"""

from __future__ import annotations

import hashlib
import os

import torch

__all__ = ["NoiseStream", "current_rank", "derive_seed", "generator_device", "rank_generator", "rank_seed"]


def generator_device(generator: torch.Generator | None, default: torch.device | str = "cpu") -> torch.device:
    """Where draws from ``generator`` are made (its device; ``default`` for torch's global generator), so
    that a draw never moves the generator and only its result is moved to the data."""
    return generator.device if generator is not None else torch.device(default)


def derive_seed(seed: int, tag: str) -> int:
    """A 63-bit seed derived from ``(seed, tag)``, stable across processes and Python versions.

    Separate uses of one user seed (clean samples, corruption, batch order, flips) get unrelated
    generator streams: two ``torch.Generator`` seeded alike would hand out the same bits.
    """
    digest = hashlib.blake2b(f"{int(seed)}:{tag}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def current_rank() -> int:
    """This process's global rank: torch.distributed's when initialised, else ``$RANK``, else 0."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    env = os.environ.get("RANK", "")
    return int(env) if env.strip().isdigit() else 0


def rank_seed(seed: int, rank: int | None = None, tag: str = "") -> int:
    """The seed of ``rank`` (default :func:`current_rank`) for the use ``tag``: distinct for every rank."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    rank = current_rank() if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    return derive_seed(seed, f"{tag}/rank{rank}")


def rank_generator(seed: int, device=None, rank: int | None = None, tag: str = "") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`rank_seed` ``(seed, rank, tag)``."""
    g = torch.Generator(device=device if device is not None else "cpu")
    return g.manual_seed(rank_seed(seed, rank, tag))


class NoiseStream:
    """A Philox ``(seed, offset)`` pair for :func:`fastat.at.ops.noise_inject` whose offset advances by itself.

    ``ops.noise_inject(x0, a, s, radius, stream)`` draws with the current offset and then adds 1 to it
    on the device (an in-place add: no host sync, and a CUDA graph that captured the call advances it
    on every replay), so consecutive calls never repeat their noise. The seed is :func:`rank_seed`
    ``(seed, rank, tag)``: each rank gets its own stream. Keep it on the data's device.
    ``state_dict``/``load_state_dict`` checkpoint it.
    """

    def __init__(self, seed: int, device=None, rank: int | None = None, tag: str = "noise") -> None:
        dev = torch.device(device if device is not None else "cpu")
        self.seed = torch.tensor([rank_seed(seed, rank, tag)], dtype=torch.int64, device=dev)
        self.offset = torch.zeros(1, dtype=torch.int64, device=dev)

    def __repr__(self) -> str:
        return f"NoiseStream(device={self.seed.device})"

    def advance(self, n: int = 1) -> None:
        """Move the offset on by ``n`` (on the device)."""
        self.offset.add_(n)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"seed": self.seed.detach().cpu().clone(), "offset": self.offset.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.seed.copy_(state["seed"])
        self.offset.copy_(state["offset"])
