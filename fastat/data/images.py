"""Image datasets: float32 tensors ``(C, H, W)`` in ``[-1, 1]``, RGB.

- :func:`cifar10`: CIFAR-10 through torchvision (download on the user's machine, or an existing copy).
- :class:`ImageFolder`: every image under a folder, recursively (CelebA, LSUN exports, ...), resized so
  the short side is ``image_size`` and centre-cropped to a square.
- :func:`load_tensor`: a whole (small) dataset as one ``(N, C, H, W)`` tensor, for the GPU-resident path.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ._errors import DatasetError
from .decode import IMAGE_EXTENSIONS, decode_image
from .decode import READ_ERRORS as _READ_ERRORS

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def uint8_to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in ``[-1, 1]``."""
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Images in ``[-1, 1]`` -> ``[0, 1]`` (clamped), for saving or metrics that want that range."""
    return ((x + 1) / 2).clamp(0, 1)


def _resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float ``(N, C, h, w)`` -> ``(N, C, size, size)``: short side to ``size``, centre crop."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size].clamp(-1, 1)


# -- CIFAR-10 ----------------------------------------------------------------------------------------


class TensorImages(Dataset):
    """Images held in memory as uint8 ``(N, C, H, W)``; items are float32 in ``[-1, 1]``.

    ``tensor()`` converts them all at once (the fast path of :func:`load_tensor`).
    """

    def __init__(self, images: torch.Tensor, image_size: int | None = None, source: str = "",
                 labels: torch.Tensor | None = None, classes: tuple[str, ...] | None = None) -> None:  # fmt: skip
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"expected uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.image_size, self.source = images, image_size, source
        self.labels, self.classes = labels, classes  # int64 (N,) class labels and their names, if any

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tensor_of(self.images[i : i + 1])[0]

    def tensor_of(self, images: torch.Tensor) -> torch.Tensor:
        x = uint8_to_float(images)
        return x if self.image_size is None else _resize_square(x, self.image_size)

    def tensor(self, max_items: int | None = None, chunk: int = 4096) -> torch.Tensor:
        """The first ``max_items`` images (all by default) as one float32 tensor."""
        n = len(self) if max_items is None else min(max_items, len(self))
        if n == 0:
            c, h, w = self.images.shape[1:]
            size = (h, w) if self.image_size is None else (self.image_size, self.image_size)
            return torch.empty(0, c, *size)
        return torch.cat([self.tensor_of(self.images[i : min(i + chunk, n)]) for i in range(0, n, chunk)])


def cifar10(
    root: str | os.PathLike,
    *,
    train: bool = True,
    download: bool = True,
    image_size: int | None = None,
    timeout_s: float = 60.0,
) -> TensorImages:
    """CIFAR-10 (train or test split) from ``root`` as :class:`TensorImages`, ``(3, 32, 32)`` images, or
    resized to ``image_size`` if given.

    ``root`` is a torchvision root (the data lives in ``root/cifar-10-batches-py``). With ``download``,
    a missing copy is fetched by torchvision (socket timeout ``timeout_s`` while it runs, so a dead
    network fails instead of hanging). Raises :class:`DatasetError` when no copy can be had.
    """
    from torchvision.datasets import CIFAR10

    if image_size is not None:
        _check_size(image_size)
    root = Path(root).expanduser()
    where = root / CIFAR10.base_folder
    hint = (
        f"CIFAR-10 not found or unreadable in {where} (the torchvision copy under root {root}). "
        f"Get it with download=True on a machine with network access, or download {CIFAR10_URL} "
        f"and extract it in {root}"
    )
    old_timeout = socket.getdefaulttimeout()
    try:
        if download and old_timeout is None:
            socket.setdefaulttimeout(timeout_s)
        ds = CIFAR10(str(root), train=train, download=download)
    except (RuntimeError, OSError) as e:  # urllib.error.URLError is an OSError
        cause = f"download failed: {e}" if download else f"download disabled; {e}"
        raise DatasetError(f"{hint} ({cause})") from e
    finally:
        socket.setdefaulttimeout(old_timeout)
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(ds.targets, dtype=torch.int64)
    return TensorImages(images, image_size, source=f"cifar10:{where}", labels=labels, classes=tuple(ds.classes))


# -- image folders -----------------------------------------------------------------------------------


def _check_size(image_size: int) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


def _warn_unreadable(bad: Sequence[tuple[Path, str]], root: Path) -> None:
    if not bad:
        return
    shown = "; ".join(f"{_rel(p, root)} ({why})" for p, why in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    warnings.warn(f"skipped {len(bad)} unreadable image file(s) under {root}: {shown}{more}", stacklevel=3)


def _rel(p: Path, root: Path) -> str:
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


class ImageFolder(Dataset):
    """Every image under ``root`` (recursive, sorted paths, extensions :data:`IMAGE_EXTENSIONS` in any
    case), as RGB float32 ``(3, image_size, image_size)`` in ``[-1, 1]``: EXIF orientation applied, short
    side resized to ``image_size`` (bicubic, antialiased), centre crop. Labels are ignored.

    With ``verify`` (default), each file's header is read once here; unreadable files are skipped with
    one warning (count and first names). A file that still fails to decode later raises
    :class:`DatasetError` from ``__getitem__`` (and is skipped with a warning by :func:`load_tensor`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        *,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        verify: bool = True,
    ) -> None:
        _check_size(image_size)
        self.root, self.image_size = Path(root).expanduser(), image_size
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise DatasetError(f"image folder {self.root} {what}")
        exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
        paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in exts and p.is_file())
        if verify:
            bad: list[tuple[Path, str]] = []
            good = []
            for p in paths:
                try:
                    with Image.open(p):  # parses the header only: cheap
                        pass
                    good.append(p)
                except _READ_ERRORS as e:
                    bad.append((p, type(e).__name__))
            _warn_unreadable(bad, self.root)
            paths = good
        if not paths:
            raise DatasetError(
                f"no readable images in {self.root} (searched recursively for {', '.join(sorted(exts))})"
            )
        self.paths = paths
        self.source = f"folder:{self.root}"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.paths[i]
        try:
            return self.read(path)
        except _READ_ERRORS as e:
            raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from e

    def read(self, path: str | os.PathLike) -> torch.Tensor:
        """One image file -> float32 ``(3, image_size, image_size)`` in ``[-1, 1]`` (see
        :func:`fastat.data.decode.decode_image` for the conversion of modes and bit depths)."""
        return uint8_to_float(torch.from_numpy(decode_image(path, self.image_size)))


# -- everything as one tensor ------------------------------------------------------------------------


class _Safe(Dataset):
    """Wraps a dataset so that a failing item comes back as ``(i, None, reason)`` instead of raising."""

    def __init__(self, ds: Dataset, n: int) -> None:
        self.ds, self.n = ds, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        try:
            item = self.ds[i]
        except DatasetError as e:
            return i, None, str(e)
        if isinstance(item, (tuple, list)):  # (image, label) datasets: keep the image
            item = item[0]
        return i, item, ""


def _as_list(batch):
    return batch


def load_tensor(dataset: Dataset, max_items: int | None = None, num_workers: int = 0) -> torch.Tensor:
    """The first ``max_items`` items of ``dataset`` (all by default) as one float32 ``(N, C, H, W)`` tensor.

    Items may be tensors or ``(tensor, label)`` pairs. Items that fail with :class:`DatasetError` (an
    unreadable file) are skipped with one warning. ``num_workers > 0`` decodes in worker processes.
    """
    if max_items is not None and max_items < 0:
        raise ValueError(f"max_items must be >= 0, got {max_items}")
    n = len(dataset) if max_items is None else min(max_items, len(dataset))
    if hasattr(dataset, "tensor"):
        return dataset.tensor(n)
    loader = DataLoader(_Safe(dataset, n), batch_size=64, num_workers=num_workers, collate_fn=_as_list)
    items, bad = [], []
    for batch in loader:
        for i, x, why in batch:
            if x is None:
                bad.append((i, why))
            else:
                items.append(torch.as_tensor(x, dtype=torch.float32))
    if bad:
        shown = "; ".join(why for _, why in bad[:3])
        warnings.warn(f"skipped {len(bad)} unreadable item(s) of {n}: {shown}", stacklevel=2)
    if not items:
        raise DatasetError(f"no readable items in {getattr(dataset, 'source', type(dataset).__name__)}")
    return torch.stack(items)
