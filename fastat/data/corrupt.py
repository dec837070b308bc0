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
    for label, frac in (("p", p), ("outliers", outliers)):
        if not 0.0 <= frac <= 1.0:  # also rejects NaN
            raise ValueError(f"{label} must be in [0, 1], got {frac}")
    if not sigma >= 0.0 or sigma == float("inf"):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    if outlier_kind not in OUTLIER_KINDS:
        raise ValueError(f"unknown outlier_kind {outlier_kind!r}; choose one of {', '.join(OUTLIER_KINDS)}")
    if not outlier_scale >= 0.0:
        raise ValueError(f"outlier_scale must be >= 0, got {outlier_scale}")
    n = clean.shape[0]
    n_noisy, n_out = round(p * n), round(outliers * n)
    if n_noisy + n_out > n:
        raise ValueError(f"p + outliers must be <= 1 (the groups are disjoint), got {p} + {outliers}")

    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    out_idx, noisy_idx = perm[:n_out].sort().values, perm[n_out : n_out + n_noisy].sort().values
    noisy_mask = torch.zeros(n, dtype=torch.bool)
    outlier_mask = torch.zeros(n, dtype=torch.bool)
    noisy_mask[noisy_idx], outlier_mask[out_idx] = True, True
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
