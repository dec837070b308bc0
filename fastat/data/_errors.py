"""The one exception the data package raises for a dataset that cannot be found or read."""

from __future__ import annotations

import hashlib


class DatasetError(ValueError):
    """A dataset could not be found, fetched or read. The message says where we looked and what to do."""


def derive_seed(seed: int, tag: str) -> int:
    """A 63-bit seed derived from ``(seed, tag)``, stable across processes and Python versions.

    Separate uses of one user seed (clean samples, corruption, batch order, flips) get unrelated
    generator streams: two ``torch.Generator`` seeded alike would hand out the same bits.
    """
    digest = hashlib.blake2b(f"{int(seed)}:{tag}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
