"""torch.compile's on-disk caches, made safe for the torch versions fastat meets.

torch < 2.14 keys its AOTAutograd cache on whether autocast is on, not on its dtype: a graph compiled
under bf16 autocast was loaded by a later fp16 process on the same cache folder, which then trained in
bf16 (torch 2.11 logged exactly the bf16 run's losses). Under autocast on those versions the cache is
turned off for the process; Inductor's FX graph cache, which keys on the traced graph and its dtypes,
stays on, so a second process still skips Inductor's code generation.
"""

from __future__ import annotations

import os

import torch

__all__ = ["AUTOCAST_CACHE_FIXED", "guard_autograd_cache"]

AUTOCAST_CACHE_FIXED = "2.14"  # the first torch whose AOTAutograd cache keys on the autocast dtype
_ENV = "TORCHINDUCTOR_AUTOGRAD_CACHE"


def guard_autograd_cache(precision: str) -> str | None:
    """Turn the AOTAutograd cache off if ``precision`` runs under autocast on a torch that needs it.
    Returns a line to log when it cannot be: ``TORCHINDUCTOR_AUTOGRAD_CACHE=1`` forces it on (an
    environment variable beats any setting made in the process)."""
    if precision == "fp32" or torch.__version__ >= AUTOCAST_CACHE_FIXED:
        return None
    from torch._functorch import config

    config.enable_autograd_cache = False
    if os.environ.get(_ENV, "").strip().lower() in ("1", "true"):
        return (
            f"fastat: {_ENV}=1 keeps torch {torch.__version__}'s AOTAutograd cache on under "
            f"{precision} autocast, and it does not tell bf16 from fp16 graphs; unset it or set it to 0"
        )
    return None
