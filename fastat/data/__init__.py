"""Training data: known distributions, image sets, the corruption wrapper and the GPU-resident loader.

The trainer's entry points are :func:`build_dataset` (a name or a folder -> one tensor of training data,
its clean copy and metadata) and :class:`TensorLoader` (shuffled fixed-size batches on the device,
resumable). Everything here is float32; images are ``(C, H, W)`` in ``[-1, 1]``.

>>> td = build_dataset("subspace", seed=0, noise_p=0.9, noise_sigma=0.1)
>>> loader = TensorLoader(td.data, 128, generator_seed=0, device="cuda")
>>> x0 = loader.next_batch()
>>> err = td.known.distance_to_support(generated).mean()  # exact error of generated samples
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ._errors import DatasetError, derive_seed
from .corrupt import OUTLIER_KINDS, CorruptedData, IndexedCorruption, corrupt
from .decode import decode_image
from .images import IMAGE_EXTENSIONS, ImageFolder, TensorImages, cifar10, load_tensor, to_unit
from .known import GMM2D, KNOWN, KnownDistribution, Plane3D, Subspace, known_dataset
from .loader import TensorLoader
from .order import EpochOrder
from .placement import PLACEMENTS, Batch, ImageTransform, MemoryImages, choose_placement, image_loader
from .preparation import prepare
from .prepared import PreparedImages, is_prepared

DATASETS = KNOWN + ("cifar10",)

__all__ = [
    "PLACEMENTS",
    "Batch",
    "EpochOrder",
    "ImageTransform",
    "IndexedCorruption",
    "MemoryImages",
    "PreparedImages",
    "choose_placement",
    "decode_image",
    "image_loader",
    "is_prepared",
    "prepare",
    "DATASETS",
    "GMM2D",
    "IMAGE_EXTENSIONS",
    "KNOWN",
    "OUTLIER_KINDS",
    "CorruptedData",
    "DatasetError",
    "ImageFolder",
    "KnownDistribution",
    "Plane3D",
    "Subspace",
    "TensorImages",
    "TensorLoader",
    "TrainingData",
    "build_dataset",
    "cifar10",
    "corrupt",
    "derive_seed",
    "known_dataset",
    "load_tensor",
    "to_unit",
]


@dataclass(frozen=True)
class TrainingData:
    """What :func:`build_dataset` returns.

    ``data`` (train on this) and ``clean`` (evaluation only) are float32 ``(N, *sample_shape)`` on the
    CPU; they are the same tensor when nothing was corrupted. ``noisy_mask`` / ``outlier_mask`` are bool
    ``(N,)``. ``known`` is the distribution object (exact ``distance_to_support``, fresh ``sample``) for
    the known sets, ``None`` for real images. ``source`` says where the data came from.
    """

    name: str
    kind: str
    sample_shape: tuple[int, ...]
    data: torch.Tensor
    clean: torch.Tensor
    noisy_mask: torch.Tensor
    outlier_mask: torch.Tensor
    known: KnownDistribution | None
    source: str

    def __len__(self) -> int:
        return self.data.shape[0]


def build_dataset(
    name_or_path: str | os.PathLike,
    *,
    data_root: str | os.PathLike = "data",
    image_size: int | None = None,
    seed: int = 0,
    n: int = 4096,
    max_items: int | None = None,
    download: bool = True,
    num_workers: int = 0,
    noise_p: float = 0.0,
    noise_sigma: float = 0.0,
    outliers: float = 0.0,
    outlier_kind: str = "uniform",
    known_kwargs: dict | None = None,
) -> TrainingData:
    """Training data for a dataset name (:data:`DATASETS`) or an image folder path.

    - known sets (``gmm2d``, ``plane3d``, ``subspace``): ``n`` clean samples drawn from ``seed``;
      ``known_kwargs`` go to the distribution; ``image_size`` sets ``subspace``'s height and width
      (and is ignored by the point sets).
    - ``cifar10``: the training split from the torchvision root ``data_root`` (fetched if ``download``),
      resized if ``image_size`` is given and not 32; the first ``max_items`` images if given.
    - any other value must be an existing folder of images; ``image_size`` is then required. A name in
      :data:`DATASETS` wins over a folder of the same name (write ``./subspace`` for the folder).

    Then a fraction ``noise_p`` of the samples gets fixed Gaussian noise ``noise_sigma`` and a fraction
    ``outliers`` becomes outliers (:func:`corrupt`, seeded from ``seed``). Unknown names that are not
    folders raise :class:`DatasetError` listing the valid names.
    """
    known: KnownDistribution | None = None
    spec = os.fspath(name_or_path)
    if spec in KNOWN:
        kw = dict(known_kwargs or {})
        if spec == "subspace" and image_size is not None:
            kw.setdefault("height", image_size)
            kw.setdefault("width", image_size)
        known = known_dataset(spec, **kw)
        g = torch.Generator().manual_seed(derive_seed(seed, "known-samples"))
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        clean, name, source = known.sample(n, g), spec, f"known:{spec}"
    elif spec == "cifar10":
        size = None if image_size in (None, 32) else image_size
        ds = cifar10(data_root, train=True, download=download, image_size=size)
        clean, name, source = load_tensor(ds, max_items), spec, ds.source
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DatasetError(
                f"unknown dataset {spec!r}: not one of {', '.join(DATASETS)} and not an existing folder"
            )
        if image_size is None:
            raise ValueError(f"image_size is required to load the image folder {path}")
        ds = ImageFolder(path, image_size)
        clean, name, source = load_tensor(ds, max_items, num_workers), "folder", ds.source
    c = corrupt(
        clean,
        noise_p,
        noise_sigma,
        outliers=outliers,
        outlier_kind=outlier_kind,
        seed=derive_seed(seed, "corrupt"),
    )
    kind = known.kind if known is not None else "image"
    return TrainingData(
        name, kind, tuple(clean.shape[1:]), c.data, c.clean, c.noisy_mask, c.outlier_mask, known, source
    )
