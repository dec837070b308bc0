"""Training data: known distributions, image sets (prepared uint8), the corruption wrapper, the loaders.

The trainer's entry points are :func:`build_dataset` (a name or a folder -> the training data and its
metadata: a float tensor for the known distributions, a uint8 image set for real images), and the batch
sources: :class:`TensorLoader` (float data on the device) and :func:`image_loader` (uint8 images on the
device or streamed; ``fastat prepare`` writes the format it reads). Training batches are float32,
images ``(C, H, W)`` in ``[-1, 1]``.

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
from .known import GMM2D, IMAGE_SETS, KNOWN, KnownDistribution, Plane3D, Subspace, Subspaces, known_dataset
from .loader import Labelled, TensorLoader
from .order import EpochOrder
from .placement import (
    PLACEMENTS,
    Batch,
    FloatView,
    ImageTransform,
    MemoryImages,
    choose_placement,
    image_loader,
)
from .preparation import prepare
from .prepared import PreparedImages, is_prepared, read_manifest
from .sources import open_images

DATASETS = KNOWN + ("cifar10",)

__all__ = [
    "PLACEMENTS",
    "Batch",
    "EpochOrder",
    "FloatView",
    "ImageTransform",
    "IndexedCorruption",
    "MemoryImages",
    "PreparedImages",
    "choose_placement",
    "decode_image",
    "image_loader",
    "is_prepared",
    "read_manifest",
    "prepare",
    "DATASETS",
    "GMM2D",
    "IMAGE_EXTENSIONS",
    "IMAGE_SETS",
    "KNOWN",
    "OUTLIER_KINDS",
    "CorruptedData",
    "DatasetError",
    "ImageFolder",
    "KnownDistribution",
    "Plane3D",
    "Subspace",
    "Subspaces",
    "TensorImages",
    "Labelled",
    "TensorLoader",
    "TrainingData",
    "build_dataset",
    "cifar10",
    "corrupt",
    "derive_seed",
    "known_dataset",
    "open_images",
    "load_tensor",
    "to_unit",
]


@dataclass(frozen=True)
class TrainingData:
    """What :func:`build_dataset` returns.

    Known sets: ``data`` (train on this) and ``clean`` (evaluation only) are float32
    ``(N, *sample_shape)`` on the CPU, the same tensor when nothing was corrupted.
    Real images: ``images`` is the uint8 set (:class:`PreparedImages` or :class:`MemoryImages`, never
    converted whole), ``corruption`` the :class:`IndexedCorruption` applied to each batch on the
    device, and ``data`` / ``clean`` are ``None``; :meth:`train_view` / :meth:`clean_view` slice it as
    float blocks for evaluation.
    ``noisy_mask`` / ``outlier_mask`` are bool ``(N,)``. ``known`` is the distribution object (exact
    ``distance_to_support``, fresh ``sample``) for the known sets, ``None`` for real images. ``source``
    says where the data came from.
    """

    name: str
    kind: str
    sample_shape: tuple[int, ...]
    data: torch.Tensor | None
    clean: torch.Tensor | None
    noisy_mask: torch.Tensor
    outlier_mask: torch.Tensor
    known: KnownDistribution | None
    source: str
    images: PreparedImages | MemoryImages | None = None
    corruption: IndexedCorruption | None = None
    labels: torch.Tensor | None = None  # int64 (N,) class labels (a known set's components), if any
    num_classes: int = 0
    # the class names of an image set (sub-folders, CIFAR-10's); None: a set prepared without labels
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else self.data.shape[0]

    def train_view(self) -> torch.Tensor | FloatView:
        """The training samples as trained on (corrupted): ``data``, or a float view of ``images``."""
        return self.data if self.images is None else FloatView(self.images, self.corruption)

    def clean_view(self) -> torch.Tensor | FloatView:
        """The clean samples: ``clean``, or a float view of ``images``."""
        return self.clean if self.images is None else FloatView(self.images, clean=True)


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
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log=None,
    min_items: int | None = None,
    prepare_wait: float | None = None,
) -> TrainingData:
    """Training data for a dataset name (:data:`DATASETS`) or a folder path.

    - known sets (:data:`KNOWN`): ``n`` clean samples drawn from ``seed``; ``known_kwargs`` go to the
      distribution; ``image_size`` sets the image sets' (:data:`IMAGE_SETS`) height and width
      (and is ignored by the point sets). A fraction ``noise_p`` of the samples gets fixed Gaussian
      noise ``noise_sigma`` and a fraction ``outliers`` becomes outliers (:func:`corrupt`).
    - ``cifar10``, a prepared folder (``fastat prepare``) or an image folder (prepared into the cache
      on first use; ``num_workers`` decode processes, 0: all cores): a uint8 image set
      (:func:`fastat.data.sources.open_images`), the first ``max_items`` images if given, with the
      same corruption as an :class:`IndexedCorruption` (the same groups; noise made per batch).
      A name in :data:`DATASETS` wins over a folder of the same name (write ``./subspace``).

    Unknown names that are not folders raise :class:`DatasetError` listing the valid names. ``min_items``
    (the batch size): an image folder with fewer files is an error before anything is prepared.
    ``prepare_wait``: seconds to wait for another process preparing the same folder (None: an error).
    """
    known: KnownDistribution | None = None
    spec = os.fspath(name_or_path)
    if spec in KNOWN:
        kw = dict(known_kwargs or {})
        if spec in IMAGE_SETS and image_size is not None:
            kw.setdefault("height", image_size)
            kw.setdefault("width", image_size)
        known = known_dataset(spec, **kw)
        g = torch.Generator().manual_seed(derive_seed(seed, "known-samples"))
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        clean = known.sample(n, g)
        c = corrupt(clean, noise_p, noise_sigma, outliers=outliers, outlier_kind=outlier_kind,
                    seed=derive_seed(seed, "corrupt"))  # fmt: skip
        return TrainingData(spec, known.kind, tuple(clean.shape[1:]), c.data, c.clean, c.noisy_mask,
                            c.outlier_mask, known, f"known:{spec}", labels=known.component(clean),
                            num_classes=known.num_classes)  # fmt: skip
    if spec != "cifar10" and not Path(spec).expanduser().exists():
        raise DatasetError(
            f"unknown dataset {spec!r}: not one of {', '.join(DATASETS)} and not an existing folder"
        )
    if max_items is not None and max_items < 0:
        raise ValueError(f"max_items must be >= 0, got {max_items}")
    images, name, source = open_images(spec, image_size=image_size, data_root=data_root, download=download,
                                       cache_dir=cache_dir, max_items=max_items, workers=num_workers or None,
                                       progress=progress, log=log, min_images=min_items,
                                       wait=prepare_wait)  # fmt: skip
    ic = IndexedCorruption.build(len(images), noise_p, noise_sigma, outliers=outliers,
                                 outlier_kind=outlier_kind, seed=derive_seed(seed, "corrupt"))  # fmt: skip
    return TrainingData(name, "image", tuple(images.shape), None, None, ic.noisy_mask, ic.outlier_mask, None,
                        source, images=images, corruption=ic, labels=images.labels,
                        num_classes=len(images.classes or ()), classes=images.classes)  # fmt: skip
