"""The one exception the data package raises for a dataset that cannot be found or read."""

from __future__ import annotations

from fastat.at.seeding import derive_seed

__all__ = ["DatasetError", "derive_seed"]


class DatasetError(ValueError):
    """A dataset could not be found, fetched or read. The message says where we looked and what to do."""
