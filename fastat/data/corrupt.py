"""The corruption wrapper of SPEC section 4: fixed noisy copies (and optional outliers) of clean data.

A fraction ``p`` of the N training samples gets Gaussian noise of std ``sigma`` added **once**: the
corrupted copy is stored, so every epoch sees the same noisy sample (the paper's setting: the noise is
part of the data, not an augmentation). A further fraction ``outliers`` of the samples is replaced by
far-away junk. The three groups (clean, noisy, outlier) are disjoint, their sizes are exactly
``round(p * N)`` and ``round(outliers * N)``, and which sample falls where depends on ``seed`` only.

Outlier kinds:

- ``"uniform"``: i.i.d. uniform values over the per-coordinate range (min..max over the clean set) of
  the data, widened by ``outlier_scale`` about its centre. For images in [-1, 1] with the default scale
  1 this is uniform pixel noise: a junk image, far from any low-dimensional support.
- ``"gaussian"``: the clean sample plus Gaussian noise of std ``outlier_scale`` (a grossly corrupted
  copy; std 1 in [-1, 1] pixel units is ten times the paper's heaviest noise).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

OUTLIER_KINDS = ("uniform", "gaussian")


@dataclass(frozen=True)
class CorruptedData:
    """Training data with its clean originals.

    ``data``: what to train on, ``(N, ...)``; ``clean``: the clean copies (for evaluation only);
    ``noisy_mask`` / ``outlier_mask``: bool ``(N,)``, disjoint. Untouched rows of ``data`` are exact
    copies of ``clean``; when nothing is corrupted ``data`` *is* ``clean`` (no copy).
    """

    data: torch.Tensor
    clean: torch.Tensor
    noisy_mask: torch.Tensor
    outlier_mask: torch.Tensor
    p: float = 0.0
    sigma: float = 0.0
    outliers: float = 0.0
    seed: int = 0

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def clean_mask(self) -> torch.Tensor:
        """Bool ``(N,)``: samples left untouched."""
        return ~(self.noisy_mask | self.outlier_mask)


def _select(n: int, p, sigma, outliers, outlier_kind, outlier_scale, seed) -> tuple:
    """Check the arguments; ``(noisy indices, outlier indices, generator)``, both sorted, disjoint,
    from one CPU generator seeded with ``seed`` (which then draws the noise of :func:`corrupt`)."""
    for label, frac in (("p", p), ("outliers", outliers)):
        if not 0.0 <= frac <= 1.0:  # also rejects NaN
            raise ValueError(f"{label} must be in [0, 1], got {frac}")
    if not sigma >= 0.0 or sigma == float("inf"):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    if outlier_kind not in OUTLIER_KINDS:
        raise ValueError(f"unknown outlier_kind {outlier_kind!r}; choose one of {', '.join(OUTLIER_KINDS)}")
    if not outlier_scale >= 0.0:
        raise ValueError(f"outlier_scale must be >= 0, got {outlier_scale}")
    n_noisy, n_out = round(p * n), round(outliers * n)
    if n_noisy + n_out > n:
        raise ValueError(f"p + outliers must be <= 1 (the groups are disjoint), got {p} + {outliers}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    return perm[n_out : n_out + n_noisy].sort().values, perm[:n_out].sort().values, g


def _mask(n: int, idx: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[idx] = True
    return m


def corrupt(
    clean: torch.Tensor,
    p: float = 0.9,
    sigma: float = 0.1,
    *,
    outliers: float = 0.0,
    outlier_kind: str = "uniform",
    outlier_scale: float = 1.0,
    clip: tuple[float, float] | None = None,
    seed: int = 0,
) -> CorruptedData:
    """Corrupt a copy of ``clean`` (float ``(N, ...)``): see the module docstring.

    ``clip``: clamp the corrupted rows to this range afterwards (e.g. ``(-1, 1)`` to mimic noisy images
    saved to disk); ``None`` (default) keeps the exact Gaussian noise. All randomness is drawn on the CPU
    from one generator seeded with ``seed``, so the result does not depend on ``clean``'s device.
    """
    if not isinstance(clean, torch.Tensor) or not clean.is_floating_point() or clean.dim() < 1:
        raise TypeError("clean must be a floating-point tensor of shape (N, ...)")
    n = clean.shape[0]
    noisy_idx, out_idx, g = _select(n, p, sigma, outliers, outlier_kind, outlier_scale, seed)
    n_noisy, n_out = len(noisy_idx), len(out_idx)
    noisy_mask, outlier_mask = _mask(n, noisy_idx), _mask(n, out_idx)
    meta = dict(p=float(p), sigma=float(sigma), outliers=float(outliers), seed=int(seed))
    dev = clean.device
    if (n_noisy == 0 or sigma == 0) and n_out == 0:
        return CorruptedData(clean, clean, noisy_mask.to(dev), outlier_mask.to(dev), **meta)

    data = clean.clone()
    row = clean.shape[1:]
    if n_noisy and sigma > 0:
        noise = torch.randn(n_noisy, *row, generator=g, dtype=torch.float32)
        data[noisy_idx.to(dev)] += (sigma * noise).to(device=dev, dtype=clean.dtype)
    if n_out:
        idx = out_idx.to(dev)
        if outlier_kind == "uniform":
            lo, hi = clean.amin(dim=0), clean.amax(dim=0)
            centre, half = (hi + lo) / 2, (hi - lo) / 2 * outlier_scale
            u = torch.rand(n_out, *row, generator=g, dtype=torch.float32).to(device=dev, dtype=clean.dtype)
            data[idx] = centre + (2 * u - 1) * half
        else:
            noise = torch.randn(n_out, *row, generator=g, dtype=torch.float32)
            data[idx] = clean[idx] + (outlier_scale * noise).to(device=dev, dtype=clean.dtype)
    if clip is not None:
        touched = (noisy_mask | outlier_mask).to(dev)
        data[touched] = data[touched].clamp(*clip)
    return CorruptedData(data, clean, noisy_mask.to(dev), outlier_mask.to(dev), **meta)


# -- the same corruption, applied to batches by sample index (real image sets) ----------------------------

_GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685  # splitmix64, int64


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (``>>`` on int64 is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def hashed_bits(counter: torch.Tensor, key: int) -> torch.Tensor:
    """splitmix64 of ``key + (counter + 1) * golden``: 64 well-mixed bits (int64) per counter value.

    Pure integer tensor ops (wrapping int64 arithmetic): the same bits on every device, no generator
    state, no host sync, so it can run inside a captured CUDA graph."""
    z = (counter + 1) * _GOLDEN + key
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def hashed_normal(index: torch.Tensor, numel: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample ``index[b]`` a fixed ``(numel,)`` standard normal and a uniform ``[0, 1)`` draw
    (float32 ``(B, numel)`` each): Box-Muller on two 24-bit uniforms of :func:`hashed_bits`, one call
    for element ``e`` of sample ``i`` at counter ``i * numel + e``; the uniform is a third 16-bit field."""
    counter = index.to(torch.int64).unsqueeze(1) * numel + torch.arange(numel, device=index.device)
    z = hashed_bits(counter, key)
    scale = 1.0 / (1 << 24)
    u1 = (_shr(z, 40).to(torch.float32) + 0.5) * scale
    u2 = ((_shr(z, 16) & 0xFFFFFF).to(torch.float32) + 0.5) * scale
    normal = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * torch.pi) * u2)
    uniform = ((z & 0xFFFF).to(torch.float32) + 0.5) / (1 << 16)
    return normal, uniform


@dataclass(frozen=True)
class IndexedCorruption:
    """The corruption of :func:`corrupt` for sets that are never held as float: the same groups (the
    same ``noisy_mask`` / ``outlier_mask`` for the same ``(N, p, outliers, seed)``), with each sample's
    fixed noise a function of ``(seed, sample index, element)`` (:func:`hashed_normal`) computed when a
    batch is made, on the batch's device. Every epoch sees the same noisy copy of a sample; nothing of
    size N x C x H x W is stored.

    Outliers: ``"gaussian"`` as in :func:`corrupt`; ``"uniform"`` draws over the pixel range ``[-1, 1]``
    widened by ``outlier_scale`` (:func:`corrupt` uses the data's per-pixel range, which for natural
    images is that range).

    >>> c = IndexedCorruption.build(50_000, p=0.9, sigma=0.1, seed=7).to("cuda")
    >>> x = c.apply(images_in_unit_range, sample_index)     # (B, C, H, W) float32, (B,) int64
    """

    noisy_mask: torch.Tensor
    outlier_mask: torch.Tensor
    sigma: float = 0.0
    outlier_kind: str = "uniform"
    outlier_scale: float = 1.0
    seed: int = 0
    p: float = 0.0
    outliers: float = 0.0

    @classmethod
    def build(
        cls,
        n: int,
        p: float = 0.0,
        sigma: float = 0.0,
        *,
        outliers: float = 0.0,
        outlier_kind: str = "uniform",
        outlier_scale: float = 1.0,
        seed: int = 0,
    ) -> IndexedCorruption:
        """Checks the arguments as :func:`corrupt` does; the groups of ``n`` samples from ``seed``."""
        noisy_idx, out_idx, _ = _select(n, p, sigma, outliers, outlier_kind, outlier_scale, seed)
        return cls(_mask(n, noisy_idx), _mask(n, out_idx), float(sigma), outlier_kind, float(outlier_scale),
                   int(seed), float(p), float(outliers))  # fmt: skip

    @property
    def active(self) -> bool:
        """Whether applying it changes anything."""
        return bool((self.sigma > 0 and self.noisy_mask.any()) or self.outlier_mask.any())

    def to(self, device: torch.device | str) -> IndexedCorruption:
        return dataclasses.replace(self, noisy_mask=self.noisy_mask.to(device),
                                   outlier_mask=self.outlier_mask.to(device))  # fmt: skip

    def apply(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The corrupted copies of the clean samples ``x`` (float ``(B, ...)``) whose indices are
        ``index`` (int64 ``(B,)``, on ``x``'s device); ``x`` itself is not modified."""
        numel, view = x[0].numel(), (-1,) + (1,) * (x.dim() - 1)
        normal, uniform = hashed_normal(index, numel, _key(self.seed, "noise"))
        normal, uniform = normal.view_as(x), uniform.view_as(x)
        noisy = self.noisy_mask[index].view(view)
        out = x + torch.where(noisy, normal * self.sigma, torch.zeros((), device=x.device))
        if self.outliers > 0:
            if self.outlier_kind == "uniform":
                junk = (2 * uniform - 1) * self.outlier_scale
            else:
                other, _ = hashed_normal(index, numel, _key(self.seed, "outlier"))
                junk = x + self.outlier_scale * other.view_as(x)
            out = torch.where(self.outlier_mask[index].view(view), junk.to(x.dtype), out)
        return out


def _key(seed: int, tag: str) -> int:
    from ._errors import derive_seed

    return derive_seed(seed, f"indexed-corruption-{tag}")
