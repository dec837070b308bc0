"""Which uint8 image set a ``--dataset`` value names: a prepared folder, an image folder (prepared into
a cache on first use), or CIFAR-10.

    images, name, source = open_images("~/data/celeba", image_size=64)
    images.read_into(idx, out)                            # PreparedImages or MemoryImages

- a folder holding a ``manifest.json`` (``fastat prepare``) is opened as it is (its image size must
  equal ``image_size`` when that is given);
- any other folder is prepared once into ``CACHE/prepared/<name>-<hash of its path>-<size>px`` and
  reused while the folder is unchanged (same files, sizes and modification times), prepared again
  otherwise. ``CACHE`` is ``cache_dir``, else ``$FASTAT_CACHE``, else ``$XDG_CACHE_HOME/fastat``,
  else ``~/.cache/fastat``;
- ``cifar10`` at 32 px is the torchvision copy held in memory as uint8 (150 MB); at another size it
  is prepared into the cache like a folder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from ._errors import DatasetError
from .placement import MemoryImages
from .prepared import PreparedImages, is_prepared

__all__ = ["cache_root", "open_images", "prepared_cache_path"]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder (see the module docstring), read when called."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("FASTAT_CACHE"):
        return Path(os.environ["FASTAT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "fastat"


def prepared_cache_path(src: str | os.PathLike, image_size: int, cache_dir=None) -> Path:
    """Where the trainer keeps the prepared copy of ``src`` (a folder, or ``cifar10``) at ``image_size``."""
    if os.fspath(src) == "cifar10":
        name, key = "cifar10", "cifar10"
    else:
        p = Path(src).expanduser().resolve()
        name, key = p.name or "folder", str(p)
    digest = hashlib.blake2b(key.encode(), digest_size=4).hexdigest()
    return cache_root(cache_dir) / "prepared" / f"{name}-{digest}-{image_size}px"


def open_images(
    spec: str | os.PathLike,
    *,
    image_size: int | None = None,
    data_root: str | os.PathLike = "data",
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
    max_items: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    min_images: int | None = None,
    wait: float | None = None,
) -> tuple[PreparedImages | MemoryImages, str, str]:
    """``(images, name, source)`` for ``spec`` (see the module docstring); the first ``max_items``
    images if given. ``log`` gets the lines of :func:`prepare` (which says when it prepares);
    ``min_images`` (the batch size) is checked before anything is prepared; ``wait``: seconds to wait for
    another process preparing the same cache entry (:func:`prepare`)."""
    from .preparation import prepare

    if os.fspath(spec) == "cifar10":
        if image_size in (None, 32):
            from .images import cifar10

            ds = cifar10(data_root, download=download)
            images: PreparedImages | MemoryImages = MemoryImages(ds.images, ds.source, ds.labels, ds.classes)
        else:
            out = prepared_cache_path("cifar10", image_size, cache_dir)
            images = prepare("cifar10", out, image_size, data_root=data_root, download=download,
                             workers=workers, progress=progress, replace=True, log=log,
                             min_images=min_images, wait=wait)  # fmt: skip
        name = "cifar10"
    else:
        path = Path(spec).expanduser()
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise DatasetError(f"image folder {path} {what}")
        if is_prepared(path):
            images = PreparedImages.open(path, image_size)
        else:
            if image_size is None:
                raise DatasetError(f"image_size (--image-size) is required to prepare the folder {path}")
            out = prepared_cache_path(path, image_size, cache_dir)
            images = prepare(path, out, image_size, workers=workers, progress=progress, replace=True, log=log,
                             min_images=min_images, wait=wait)  # fmt: skip
        name = "folder"
    if max_items is not None and max_items < len(images):
        images = images.head(max_items)
    return images, name, images.source
