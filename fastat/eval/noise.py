"""Noise level of images: scikit-image's wavelet estimate of the Gaussian noise sigma, per image.

    levels = noise_sigma(images)                  # (N,) sigma in pixel units (0-255), or None
    noise_summary(images, "sigma")                # {"sigma_mean", "sigma_median"} ({} without skimage)

``skimage.restoration.estimate_sigma`` (Donoho's MAD of the finest diagonal wavelet coefficients, averaged
over the channels) on images in ``[-1, 1]`` mapped to ``[0, 255]``. It is the direct measure of "the model
learned the dirt": samples of a model that copies noisy training images carry their sigma. Optional:
without scikit-image (``pip install 'fastat[eval]'``) the functions return None / ``{}`` and
:data:`SIGMA_MISSING` says why.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["SIGMA_MISSING", "noise_sigma", "noise_summary", "sigma_available"]

SIGMA_MISSING = "noise level skipped: scikit-image is not installed (pip install 'fastat[eval]')"


def sigma_available() -> bool:
    try:
        import pywt  # noqa: F401  (estimate_sigma's wavelets)
        from skimage.restoration import estimate_sigma  # noqa: F401
    except ImportError:
        return False
    return True


def noise_sigma(images: torch.Tensor) -> torch.Tensor | None:
    """Per image ``(N,)`` float64: the estimated noise sigma in pixel units (0-255) of ``images``
    ``(N, C, H, W)`` in ``[-1, 1]`` (clamped); None without scikit-image."""
    if not sigma_available():
        return None
    from skimage.restoration import estimate_sigma

    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"expected images (N, C, H, W), got {tuple(images.shape)}")
    px = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).double().permute(0, 2, 3, 1).numpy()
    one = px.shape[-1] == 1
    out = []
    with warnings.catch_warnings():  # tiny images: pywt warns that the level is too high; level 1 is used
        warnings.simplefilter("ignore")
        for img in px:
            if one:
                out.append(float(estimate_sigma(img[..., 0])))
            else:
                out.append(float(estimate_sigma(img, average_sigmas=True, channel_axis=-1)))
    return torch.tensor(out, dtype=torch.float64)


def noise_summary(images: torch.Tensor, prefix: str = "sigma") -> dict[str, float]:
    """``{prefix_mean, prefix_median}`` of :func:`noise_sigma` (``{}`` without scikit-image)."""
    s = noise_sigma(images)
    if s is None:
        return {}
    s = s[torch.isfinite(s)]
    if s.numel() == 0:
        return {}
    return {f"{prefix}_mean": s.mean().item(), f"{prefix}_median": s.median().item()}
