"""FID, KID and Inception Score against clean reference images (optional: needs ``torch-fidelity``).

    ext = InceptionFeatures(weights="~/weights-inception-2015-12-05-6726825d.pth")   # offline
    ref = reference_stats("cifar10-train", lambda: clean_images, ext)                  # cached .npz
    scores = fid_is(generated_images, ref, ext)                         # {"fid", "is", "is_std"}

The feature network is torch-fidelity's ``inception-v3-compat`` (the TensorFlow Inception of the original
FID), fed uint8 RGB images (ours in ``[-1, 1]`` mapped to ``[0, 255]``, one channel repeated to three).
Offline, pass the weights file (``--fid-weights`` / ``--inception-weights``, ``$FASTAT_INCEPTION_WEIGHTS``)
or put it in torch's hub cache. Without the package or the weights :class:`FIDUnavailable` says so in one
line. Reference statistics are cached as ``.npz`` files named by a key in ``cache_dir`` (default
``~/.cache/fastat/fid``) and checked against the key and the number of images when read back.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastat.eval.metrics import feature_stats, frechet_distance

__all__ = [
    "FIDSpec",
    "FIDUnavailable",
    "FeatureStats",
    "InceptionFeatures",
    "INCEPTION_WEIGHTS_FILE",
    "default_cache_dir",
    "fid_from_stats",
    "fid_is",
    "find_inception_weights",
    "inception_score",
    "kid",
    "load_stats",
    "reference_stats",
    "save_stats",
]

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "FASTAT_INCEPTION_WEIGHTS"
INSTALL_HINT = "pip install 'fastat[eval]' (or pip install torch-fidelity)"


class FIDUnavailable(RuntimeError):
    """FID/IS cannot be computed here: torch-fidelity is not installed or the Inception weights are absent."""


@dataclass(frozen=True)
class FIDSpec:
    """FID options of a report: ``train``: FID/IS against the clean training images (``--fid``; an error
    when it cannot be computed); ``ref``: a folder of held-out clean images (``--ref``): FID/KID of the
    samples and of the training images against it, skipped with a one-line note when the Inception
    weights are not there; ``weights``: the Inception weights file; ``cache``: reference statistics."""

    train: bool = False
    ref: str | os.PathLike | None = None
    weights: str | os.PathLike | None = None
    cache: str | os.PathLike | None = None

    def check(self) -> FIDSpec:
        """ValueError (one line) for a ``ref`` that is not a folder."""
        if self.ref is not None and not Path(self.ref).expanduser().is_dir():
            what = "is not a folder" if Path(self.ref).expanduser().exists() else "does not exist"
            raise ValueError(f"--ref {self.ref} {what} (a folder of held-out clean images)")
        return self


# -- statistics and their cache ------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureStats:
    """Mean ``(d,)`` and covariance ``(d, d)`` (float64) of ``n`` feature vectors, named by ``key``."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    key: str = ""

    @classmethod
    def from_features(cls, features, key: str = "") -> FeatureStats:
        mu, sigma = feature_stats(features)
        return cls(mu, sigma, int(features.shape[0]), key)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastat" / "fid"


def _cache_file(cache_dir: str | os.PathLike, key: str) -> Path:
    if not key or not re.fullmatch(r"[A-Za-z0-9._=+-]+", key):
        raise ValueError(f"reference key {key!r} must be non-empty and use only letters, digits and ._=+-")
    return Path(cache_dir).expanduser() / f"{key}.npz"


def save_stats(stats: FeatureStats, path: str | os.PathLike) -> Path:
    """Write ``stats`` to an ``.npz`` file atomically."""
    from fastat.train.checkpoint import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n), key=np.array(stats.key))

    return atomic_write(path, write)


def load_stats(path: str | os.PathLike) -> FeatureStats:
    with np.load(Path(path), allow_pickle=False) as z:
        return FeatureStats(
            z["mu"].astype(np.float64), z["sigma"].astype(np.float64), int(z["n"]), str(z["key"])
        )


def reference_stats(
    key: str,
    images: Callable[[], torch.Tensor] | torch.Tensor,
    extractor: Callable[[torch.Tensor], torch.Tensor],
    *,
    cache_dir: str | os.PathLike | None = None,
    n: int | None = None,
) -> FeatureStats:
    """The feature statistics of the clean reference set named ``key``, from the cache when present.

    ``images``: the reference images ``(N, C, H, W)`` in ``[-1, 1]`` (a tensor, or a view with ``shape``
    and ``blocks()`` such as :class:`fastat.data.FloatView`, read block by block), or a function that
    returns them (called only on a cache miss, so the data need not be loaded at all). ``extractor``
    maps images to features ``(N, d)`` (e.g. :class:`InceptionFeatures`). ``n``: expected number of
    images, checked against the cached file (a mismatch recomputes). Choose keys that name everything
    that matters,
    e.g. ``cifar10-train-32-n50000``.
    """
    path = _cache_file(cache_dir or default_cache_dir(), key)
    if path.is_file():
        try:
            cached = load_stats(path)
        except (OSError, ValueError, KeyError):
            cached = None
        if cached is not None and cached.key == key and (n is None or cached.n == n):
            return cached
    x = images() if callable(images) else images
    if n is not None and x.shape[0] != n:
        raise ValueError(f"reference {key!r}: expected {n} images, got {x.shape[0]}")
    feats = extractor(x) if isinstance(x, torch.Tensor) else torch.cat([extractor(b) for b in x.blocks()])
    stats = FeatureStats.from_features(feats, key)
    save_stats(stats, path)
    return stats


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` from class logits ``(N, K)``: mean and std over
    ``splits`` consecutive splits (as in Salimans et al. 2016). 1 for identical predictions, ``K`` for
    confident predictions spread evenly over ``K`` classes."""
    if logits.dim() != 2 or logits.shape[0] < splits or splits < 1:
        raise ValueError(f"need logits (N >= splits, K) and splits >= 1, got {tuple(logits.shape)}, {splits}")
    logp = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for part in logp.tensor_split(splits):
        p = part.exp()
        log_py = torch.logsumexp(part, dim=0) - math.log(part.shape[0])
        kl = (p * (part - log_py)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    s = np.asarray(scores)
    return float(s.mean()), float(s.std())


# -- the Inception network -------------------------------------------------------------------------------


def _torch_fidelity():
    try:
        import torch_fidelity  # noqa: F401
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise FIDUnavailable(f"FID/IS need torch-fidelity, which is not installed: {INSTALL_HINT}") from None
    return FeatureExtractorInceptionV3


def find_inception_weights(weights: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: ``weights``, else ``$FASTAT_INCEPTION_WEIGHTS``, else torch's hub
    cache. Raises :class:`FIDUnavailable` (saying where it looked) when there is none."""
    if weights is not None or os.environ.get(WEIGHTS_ENV):
        p = Path(weights if weights is not None else os.environ[WEIGHTS_ENV]).expanduser()
        if not p.is_file():
            raise FIDUnavailable(f"Inception weights not found at {p}")
        return p
    p = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if p.is_file():
        return p
    raise FIDUnavailable(
        f"Inception weights not installed (no {p}); download {INCEPTION_WEIGHTS_FILE} from the "
        f"torch-fidelity "
        f"releases once and pass it with --inception-weights PATH (or ${WEIGHTS_ENV})"
    )


class InceptionFeatures:
    """Images ``(N, C, H, W)`` in ``[-1, 1]`` -> Inception pool features ``(N, 2048)`` (float64, CPU);
    :meth:`logits` gives the 1008 unbiased logits for the Inception Score. Batched on ``device``."""

    def __init__(
        self, weights: str | os.PathLike | None = None, device: torch.device | str = "cpu", batch: int = 64
    ):
        cls = _torch_fidelity()
        path = find_inception_weights(weights)
        self.device, self.batch = torch.device(device), int(batch)
        self.net = cls(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
        )
        self.net = self.net.to(self.device).eval()

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images (N, 1 or 3, H, W), got {tuple(x.shape)}")
        x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, logits = [], []
        with torch.no_grad():
            for chunk in x.split(self.batch):
                f, lg = self.net(self.to_uint8(chunk).to(self.device))
                feats.append(f.double().cpu())
                logits.append(lg.double().cpu())
        return torch.cat(feats), torch.cat(logits)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[0]


def kid(a: torch.Tensor, b: torch.Tensor, *, seed: int = 0, subsets: int = 100) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over ``subsets`` random subsets) of two feature sets, by
    torch-fidelity (cubic polynomial kernel MMD, unbiased); the subset size is the smaller set's, at most
    1000."""
    try:
        from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    except ImportError:
        raise FIDUnavailable(f"KID needs torch-fidelity, which is not installed: {INSTALL_HINT}") from None
    size = min(a.shape[0], b.shape[0], 1000)
    out = kid_features_to_metric(a.double(), b.double(), kid_subsets=subsets, kid_subset_size=size,
                                 rng_seed=seed, verbose=False)  # fmt: skip
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def fid_is(
    samples: torch.Tensor, reference: FeatureStats, extractor: InceptionFeatures, *, splits: int = 10
) -> dict[str, float]:
    """FID of ``samples`` (``[-1, 1]`` images) against ``reference`` and their Inception Score."""
    feats, logits = extractor.features_and_logits(samples)
    is_mean, is_std = inception_score(logits, splits=min(splits, samples.shape[0]))
    fid = fid_from_stats(FeatureStats.from_features(feats), reference)
    return {
        "fid": fid,
        "is": is_mean,
        "is_std": is_std,
        "fid_n": int(samples.shape[0]),
        "fid_ref_n": reference.n,
    }
