"""Known distributions: clean data whose support is known exactly, so errors can be measured exactly.

    dist = known_dataset("plane3d")          # or gmm2d (points), subspace (images, the default dataset)
    d = dist.distance_to_support(dist.sample(16, torch.Generator().manual_seed(0)))

Each distribution draws fresh clean samples from a caller's ``torch.Generator`` and measures the exact
distance of any point (or image) to the clean support, in float64. They are the proof-of-concept suite
of SPEC section 4 and need no download. The supports: docs/DESIGN.md ("Data").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fastat.at.seeding import generator_device

from ._errors import DatasetError, derive_seed

KNOWN = ("gmm2d", "plane3d", "subspace", "subspaces", "scales")
IMAGE_SETS = ("subspace", "subspaces", "scales")  # known image sets: channels, height, width, k


class KnownDistribution:
    """Base class. Subclasses set ``name``, ``kind`` ("points" or "image") and ``sample_shape``.

    ``value_range`` is the nominal range of the values: ``(-1.0, 1.0)`` for images (pixels, not clipped:
    a few clean pixels may lie slightly outside), ``None`` for points.
    """

    name: str = ""
    kind: str = ""
    sample_shape: tuple[int, ...] = ()
    value_range: tuple[float, float] | None = None

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` fresh clean samples, float32, shape ``(n, *sample_shape)``, on ``generator``'s device.

        All randomness comes from ``generator`` (the global generator when it is ``None``).
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        device = generator_device(generator)
        return self._sample(n, generator, device).to(torch.float32)

    num_classes = 0  # sets with components (a mixture's modes) label each sample with its component

    def component(self, x: torch.Tensor) -> torch.Tensor | None:
        """The component label (int64 ``(n,)``) of clean samples ``x``; None for a set without components."""
        return None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest point of the clean support to each sample of ``x`` (same shape and dtype)."""
        flat = self._flat64(x)
        return self._project(flat).to(x.dtype).reshape(x.shape)

    def distance_to_support(self, x: torch.Tensor) -> torch.Tensor:
        """Exact distance of each sample of ``x`` (``(n, *sample_shape)``) to the clean support: ``(n,)``
        float32 on ``x``'s device. See the subclass for the definition (Euclidean or RMS per pixel)."""
        flat = self._flat64(x)
        return self._distance(flat).to(torch.float32)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]`` mapped (and clamped) to ``[0, 1]`` for saving or viewing."""
        if self.kind != "image":
            raise ValueError(f"{self.name!r} holds points, which have no pixel range to map")
        return ((x + 1) / 2).clamp(0, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sample_shape={self.sample_shape})"

    # -- for subclasses ------------------------------------------------------------------------------
    def _flat64(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.sample_shape or x.dim() != len(self.sample_shape) + 1:
            raise ValueError(
                f"{self.name}: expected shape (n, {', '.join(map(str, self.sample_shape))}), "
                f"got {tuple(x.shape)}"
            )
        return x.detach().reshape(x.shape[0], -1).to(torch.float64)

    def _sample(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def _project(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _distance(self, flat: torch.Tensor) -> torch.Tensor:
        return (flat - self._project(flat)).norm(dim=1)


class GMM2D(KnownDistribution):
    """Mixture of ``n_modes`` isotropic Gaussians (std ``std``) with equal weights, centred on a circle
    of radius ``radius`` (first centre at angle 0).

    The clean *support* is taken to be the set of mode centres (the zero-width limit of the mixture), so
    ``distance_to_support`` is the Euclidean distance to the nearest centre. A clean sample measures
    about ``std * sqrt(pi / 2)`` (~0.063 at the default std) on average.
    """

    name, kind, sample_shape = "gmm2d", "points", (2,)

    def __init__(self, n_modes: int = 8, radius: float = 2.0, std: float = 0.05) -> None:
        if n_modes < 1 or radius <= 0 or std < 0:
            raise ValueError(f"need n_modes >= 1, radius > 0, std >= 0; got {n_modes}, {radius}, {std}")
        self.n_modes, self.radius, self.std = int(n_modes), float(radius), float(std)
        angle = torch.arange(self.n_modes, dtype=torch.float64) * (2 * math.pi / self.n_modes)
        self.centers = self.radius * torch.stack([angle.cos(), angle.sin()], dim=1)  # (K, 2) float64

    def _sample(self, n, generator, device):
        mode = torch.randint(0, self.n_modes, (n,), generator=generator, device=device)
        noise = torch.randn(n, 2, generator=generator, device=device, dtype=torch.float64)
        return self.centers.to(device)[mode] + self.std * noise

    @property
    def num_classes(self) -> int:
        return self.n_modes

    def component(self, x: torch.Tensor) -> torch.Tensor:
        """The mode each clean sample was drawn from: its nearest centre (std << the centres' spacing)."""
        return self.nearest_mode(x)

    def nearest_mode(self, x: torch.Tensor) -> torch.Tensor:
        """Index (int64, ``(n,)``) of the nearest mode centre: for mode-coverage counts."""
        flat = self._flat64(x)
        return torch.cdist(flat, self.centers.to(flat.device)).argmin(dim=1)

    def _project(self, flat):
        return self.centers.to(flat.device)[torch.cdist(flat, self.centers.to(flat.device)).argmin(dim=1)]

    def _distance(self, flat):
        return torch.cdist(flat, self.centers.to(flat.device)).min(dim=1).values


def _rotation(alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """Rz(alpha) @ Ry(beta) @ Rx(gamma), float64."""
    ca, sa, cb, sb, cg, sg = (f(v) for v in (alpha, beta, gamma) for f in (math.cos, math.sin))
    rz = torch.tensor([[ca, -sa, 0.0], [sa, ca, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    ry = torch.tensor([[cb, 0.0, sb], [0.0, 1.0, 0.0], [-sb, 0.0, cb]], dtype=torch.float64)
    rx = torch.tensor([[1.0, 0.0, 0.0], [0.0, cg, -sg], [0.0, sg, cg]], dtype=torch.float64)
    return rz @ ry @ rx


class Plane3D(KnownDistribution):
    """Points uniform on the square ``[-h, h]^2`` (``h = half_width``) of a plane through the origin in
    3-D. The plane has a fixed, non-axis-aligned orientation: the first two columns of a fixed rotation
    (``basis``, ``(3, 2)``) span it and the third is its unit ``normal``.

    ``distance_to_support`` is the exact Euclidean distance to the square patch: with in-plane coordinates
    ``c = basis^T x`` and height ``z = normal . x``, it is ``sqrt(z^2 + |c - clamp(c, -h, h)|^2)`` — the
    height above the plane and the in-plane overshoot beyond the square's edge, added by Pythagoras.
    """

    name, kind, sample_shape = "plane3d", "points", (3,)

    def __init__(self, half_width: float = 1.0) -> None:
        if half_width <= 0:
            raise ValueError(f"half_width must be > 0, got {half_width}")
        self.half_width = float(half_width)
        self.frame = _rotation(0.6, -0.45, 0.9)  # orthonormal columns; fixed forever (tests pin it)
        self.basis, self.normal = self.frame[:, :2], self.frame[:, 2]

    def _sample(self, n, generator, device):
        c = torch.rand(n, 2, generator=generator, device=device, dtype=torch.float64)
        return (2 * c - 1) * self.half_width @ self.basis.to(device).T

    def _coords(self, flat):
        y = flat @ self.frame.to(flat.device)  # (n, 3): in-plane (2) and height (1)
        return y[:, :2], y[:, 2]

    def _project(self, flat):
        c, _ = self._coords(flat)
        return c.clamp(-self.half_width, self.half_width) @ self.basis.to(flat.device).T

    def _distance(self, flat):
        c, z = self._coords(flat)
        over = c - c.clamp(-self.half_width, self.half_width)
        return (z.square() + over.square().sum(dim=1)).sqrt()


def _mean_image(c: int, h: int, w: int, turn: float = 0.0) -> torch.Tensor:
    """A fixed smooth image in [-1, 1] (float64): a diagonal wave whose phase shifts per channel (and
    by ``turn``)."""
    yy = torch.arange(h, dtype=torch.float64).view(1, h, 1) / h
    xx = torch.arange(w, dtype=torch.float64).view(1, 1, w) / w
    phase = torch.arange(c, dtype=torch.float64).view(c, 1, 1) * (2 * math.pi / max(c, 1)) + turn
    return torch.sin(2 * math.pi * (xx + 0.5 * yy) + phase)


class Subspace(KnownDistribution):
    """``C x H x W`` images on a known affine ``k``-dim subspace: ``x = mean + basis @ z``.

    ``basis`` (``(D, k)``, ``D = C*H*W``, float64) is orthonormal, drawn once from ``basis_seed`` (QR of
    a Gaussian matrix); ``mean`` is a fixed smooth image of amplitude ``mean_amplitude``;
    ``z ~ N(0, scale^2 I_k)`` with ``scale = pixel_std * sqrt(D / k)``, so each pixel has standard
    deviation ~``pixel_std`` around the mean. The defaults (0.25 + 0.3 std) keep ~99% of the pixels in
    ``[-1, 1]``; samples are not clipped (clipping would leave the subspace).

    ``distance_to_support`` is the **RMS per-pixel residual** ``|x - P(x)|_2 / sqrt(D)`` of the orthogonal
    projection ``P`` onto the affine subspace, so one number means the same at any resolution: pixel
    noise of std sigma measures ~``sigma * sqrt((D - k) / D)``.

    The default size, 3x8x8, is what the tiny UNet learns below the data's noise in the CPU quickstart
    (a few minutes; at 16x16 it takes ~10x longer, see ``benchmarks/RESULTS.md``).
    """

    name, kind = "subspace", "image"
    value_range = (-1.0, 1.0)

    def __init__(
        self,
        channels: int = 3,
        height: int = 8,
        width: int = 8,
        k: int = 8,
        pixel_std: float = 0.3,
        mean_amplitude: float = 0.25,
        basis_seed: int = 0,
    ) -> None:
        self.sample_shape = (int(channels), int(height), int(width))
        dim = math.prod(self.sample_shape)
        if min(self.sample_shape) < 1 or not 1 <= k <= dim:
            raise ValueError(f"need positive C, H, W and 1 <= k <= C*H*W; got {self.sample_shape}, k={k}")
        if pixel_std < 0:
            raise ValueError(f"pixel_std must be >= 0, got {pixel_std}")
        self.k, self.dim, self.pixel_std = int(k), dim, float(pixel_std)
        self.scale = self.pixel_std * math.sqrt(dim / self.k)
        g = torch.Generator().manual_seed(derive_seed(basis_seed, "subspace-basis"))
        self.basis = torch.linalg.qr(torch.randn(dim, self.k, generator=g, dtype=torch.float64))[0]
        self.mean = (mean_amplitude * _mean_image(*self.sample_shape)).reshape(-1)

    def __repr__(self) -> str:
        return f"Subspace(sample_shape={self.sample_shape}, k={self.k}, pixel_std={self.pixel_std})"

    def _sample(self, n, generator, device):
        z = torch.randn(n, self.k, generator=generator, device=device, dtype=torch.float64)
        x = self.mean.to(device) + (self.scale * z) @ self.basis.to(device).T
        return x.reshape(n, *self.sample_shape)

    def _project(self, flat):
        basis, mean = self.basis.to(flat.device), self.mean.to(flat.device)
        return mean + ((flat - mean) @ basis) @ basis.T

    def _distance(self, flat):
        return (flat - self._project(flat)).norm(dim=1) / math.sqrt(self.dim)


class Subspaces(KnownDistribution):
    """A **multimodal** image set: a union of ``components`` affine ``k``-dim subspaces with unequal
    ``weights``. Component ``j`` is ``x = mean_j + basis_j @ z``, ``z ~ N(0, scale_j^2 I_k)`` with
    ``scale_j = pixel_std_j * sqrt(D / k)``; each ``basis_j`` is orthonormal (drawn from ``basis_seed``)
    and each ``mean_j`` a different smooth image (a diagonal wave of ``mean_amplitude``, its phase
    turned by ``2 pi j / components``), so the clusters lie apart and between them the posterior
    covariance of ``x0`` exceeds the prior's (the regime a unimodal set cannot show).

    ``distance_to_support`` is the minimum over the components of the RMS per-pixel residual of the
    orthogonal projection (as :class:`Subspace`); :meth:`component` is the nearest component's index
    (a sample's label). ``pixel_std`` is one std for every component or one per component (``scales``).
    """

    kind = "image"
    value_range = (-1.0, 1.0)

    def __init__(
        self,
        channels: int = 3,
        height: int = 8,
        width: int = 8,
        k: int = 4,
        weights: tuple[float, ...] = (0.5, 0.3, 0.2),
        pixel_std: float | tuple[float, ...] = 0.2,
        mean_amplitude: float = 0.5,
        basis_seed: int = 0,
        name: str = "subspaces",
    ) -> None:
        self.name = name
        self.sample_shape = (int(channels), int(height), int(width))
        dim = math.prod(self.sample_shape)
        K = len(weights)
        stds = tuple(pixel_std) if isinstance(pixel_std, (tuple, list)) else (float(pixel_std),) * K
        if min(self.sample_shape) < 1 or not 1 <= k <= dim or K < 1 or len(stds) != K:
            raise ValueError(
                f"need positive C, H, W, 1 <= k <= C*H*W and one pixel_std per weight; got "
                f"{self.sample_shape}, k={k}, {K} weights, {len(stds)} stds"
            )
        if min(weights) <= 0 or min(stds) < 0:
            raise ValueError(f"weights must be > 0 and pixel stds >= 0; got {weights}, {stds}")
        self.k, self.dim, self.pixel_std = int(k), dim, stds
        total = float(sum(weights))
        self.weights = torch.tensor([w / total for w in weights], dtype=torch.float64)
        self.scales = torch.tensor([sd * math.sqrt(dim / self.k) for sd in stds], dtype=torch.float64)
        g = torch.Generator().manual_seed(derive_seed(basis_seed, "subspaces-basis"))
        self.bases = torch.linalg.qr(torch.randn(K, dim, self.k, generator=g, dtype=torch.float64))[0]
        c, h, w = self.sample_shape
        self.means = torch.stack([
            mean_amplitude * _mean_image(c, h, w, turn=2 * math.pi * j / K).reshape(-1) for j in range(K)
        ])  # fmt: skip

    def __repr__(self) -> str:
        return (f"Subspaces(name={self.name!r}, sample_shape={self.sample_shape}, k={self.k}, "
                f"weights={[round(w, 3) for w in self.weights.tolist()]}, pixel_std={self.pixel_std})")  # fmt: skip

    @property
    def num_classes(self) -> int:
        """Its components: :meth:`component` labels each sample with one (class-conditional training)."""
        return self.weights.shape[0]

    def sample_with_labels(self, n: int, generator: torch.Generator | None = None):
        """``(x, labels)``: ``n`` clean samples (float32) and the component each was drawn from (int64)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        device = generator_device(generator)
        labels = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator) if n else (
            torch.zeros(0, dtype=torch.int64, device=device))  # fmt: skip
        z = torch.randn(n, self.k, generator=generator, device=device, dtype=torch.float64)
        z = z * self.scales.to(device)[labels, None]
        x = self.means.to(device)[labels] + torch.einsum("ndk,nk->nd", self.bases.to(device)[labels], z)
        return x.reshape(n, *self.sample_shape).to(torch.float32), labels

    def _sample(self, n, generator, device):
        return self.sample_with_labels(n, generator)[0]

    def _residuals(self, flat):  # (n, K) residual norms to each component's affine subspace
        bases, means = self.bases.to(flat.device), self.means.to(flat.device)
        centred = flat[:, None, :] - means[None]  # (n, K, D)
        coords = torch.einsum("nkd,kde->nke", centred, bases)
        return (centred - torch.einsum("nke,kde->nkd", coords, bases)).norm(dim=2)

    def component(self, x: torch.Tensor) -> torch.Tensor:
        """Index (int64, ``(n,)``) of the component whose subspace is nearest to each sample."""
        return self._residuals(self._flat64(x)).argmin(dim=1)

    def _project(self, flat):
        j = self._residuals(flat).argmin(dim=1)
        bases, means = self.bases.to(flat.device)[j], self.means.to(flat.device)[j]
        coords = torch.einsum("nd,nde->ne", flat - means, bases)
        return means + torch.einsum("ne,nde->nd", coords, bases)

    def _distance(self, flat):
        return self._residuals(flat).min(dim=1).values / math.sqrt(self.dim)


def _scales(**kwargs) -> Subspaces:
    kwargs.setdefault("pixel_std", (0.05, 0.15, 0.35))
    return Subspaces(name="scales", **kwargs)


_CLASSES: dict[str, Callable[..., KnownDistribution]] = {
    "gmm2d": GMM2D, "plane3d": Plane3D, "subspace": Subspace, "subspaces": Subspaces, "scales": _scales,
}


def known_dataset(name: str, **kwargs) -> KnownDistribution:
    """The known distribution called ``name`` (one of ``KNOWN``), built with ``kwargs``.

    >>> dist = known_dataset("subspace", height=32, width=32)
    >>> x = dist.sample(16, torch.Generator().manual_seed(0))
    """
    if name not in _CLASSES:
        raise DatasetError(f"unknown known distribution {name!r}; choose one of {', '.join(KNOWN)}")
    return _CLASSES[name](**kwargs)
