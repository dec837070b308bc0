"""Checks the command line makes before a command runs or writes (issue 21: nothing accepted silently).

    unused_at_flags(set_over, flag_over, merged, flag_names)  # --mode ddpm with --lam: ConfigError
    thread_count("8")                                        # argparse type of --threads
    check_samples(x, ckpt_path, out)                          # NaN samples are never written

argparse and plain values only at import (the CLI imports torch lazily).
"""

from __future__ import annotations

import argparse
import os

from fastat.train.config import ConfigError

__all__ = ["AT_ONLY", "check_samples", "thread_count", "unused_at_flags"]

# What only the AT objective uses: set by hand (a flag or --set) with --mode ddpm, an error.
AT_ONLY = ("objective.lam", "objective.replays", "objective.reg_frac", "objective.lam_scale",
           "objective.lam_s_min")  # fmt: skip


def unused_at_flags(set_over: dict, flag_over: dict, merged: dict, flag_names: dict[str, str]) -> None:
    """ConfigError when keys of :data:`AT_ONLY` are given by hand (``--set`` or a flag: ``flag_names``
    maps keys to flags) for a ``ddpm`` run, which ignores them (a config file's are left alone)."""
    unused = [k for k in AT_ONLY if k in set_over or k in flag_over]
    if merged.get("objective.mode") == "ddpm" and unused:
        named = ", ".join(flag_names[k] if k in flag_over else k for k in unused)
        raise ConfigError(f"{named} would be ignored: --mode ddpm trains without the regulariser; drop them")


def thread_count(text: str) -> int:
    """``--threads``: a positive count up to 4 per core (100000 threads segfaulted torch's pool)."""
    most = 4 * (os.cpu_count() or 1)
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= most:
        raise argparse.ArgumentTypeError(f"expected 1 to {most} threads (4 per core), got {text!r}")
    return n


def check_samples(x, ckpt, out) -> None:
    """CheckpointError when samples ``x`` hold NaN or inf: finite weights can still overflow in sampling
    (e.g. scaled by 1e30), and a file of NaN is no sample."""
    import torch

    from fastat.train.checkpoint import CheckpointError

    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise CheckpointError(
            f"the samples from {ckpt} are not finite ({bad} of {x.numel()} values NaN or inf: the weights "
            f"overflow in sampling); nothing written to {out}"
        )
