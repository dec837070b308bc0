"""Which process of a ``torchrun`` job this is, read from the environment torchrun sets (no torch import:
the command line reads it before torch loads).

    rank, world, local = job_ranks()   # (0, 1, 0) outside a job; ConfigError for a half-set environment
"""

from __future__ import annotations

import os

from fastat.train.config import ConfigError

__all__ = ["job_ranks"]


def job_ranks(env: dict | None = None) -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` of this process from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``); ``(0, 1, 0)`` outside a job. ConfigError (one line) for an
    environment that names a job incompletely or with values that are not ranks."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return 0, 1, 0
        rank = int(env["RANK"])
        local = int(env.get("LOCAL_RANK", rank))
        if not 0 <= rank < world or local < 0:
            raise ValueError
    except (KeyError, ValueError):
        names = ", ".join(f"{k}={env.get(k)!r}" for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
        raise ConfigError(
            f"the environment names an incomplete torchrun job ({names}): start fastat with torchrun, "
            f"which sets all of them, or unset WORLD_SIZE to run one process"
        ) from None
    return rank, world, local
