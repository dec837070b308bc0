"""Exact and distributional metrics for generated samples (SPEC section 4).

    d = support_distance(known, x)                   # exact distance of each sample to the clean support
    sw = sliced_wasserstein(x, fresh_clean)          # distribution distance with a known zero
    fd = frechet_distance(mu1, s1, mu2, s2)          # the FID formula, on any features
    psnr = denoiser_psnr(model, schedule, clean, [50, 200, 500], known=subspace)

Every function takes plain tensors and returns Python floats or tensors; all randomness (projection
directions, the noise of the denoiser test) comes from fixed seeds, so two calls on the same inputs give
the same number. Arithmetic is float64 where rounding would show (distances, covariances, square roots).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fastat.at.schedule import NoiseSchedule

__all__ = [
    "denoiser_psnr",
    "distance_summary",
    "feature_stats",
    "frechet_distance",
    "mode_balance",
    "oracle_x0_subspace",
    "predict_x0",
    "projection_directions",
    "psnr",
    "sliced_wasserstein",
    "support_distance",
]


# -- distance to the clean support ---------------------------------------------------------------------


def support_distance(known, x: torch.Tensor) -> torch.Tensor:
    """Exact distance of each sample of ``x`` to ``known``'s clean support, ``(n,)`` float32 on the CPU
    (Euclidean for points, RMS per pixel for ``subspace``; see :mod:`fastat.data.known`)."""
    return known.distance_to_support(x.detach().cpu())


def distance_summary(d: torch.Tensor, prefix: str = "dist") -> dict[str, float]:
    """Mean, median and 90th percentile of per-sample distances ``d`` as ``{prefix}_mean`` etc.

    The median and p90 are reported beside the mean because a handful of divergent samples (e.g. of a
    deterministic DDIM sampler) can move the mean by more than the whole effect being measured.
    """
    d = d.detach().double().reshape(-1).cpu()
    if d.numel() == 0:
        raise ValueError("no distances to summarise")
    q = torch.quantile(d, torch.tensor([0.5, 0.9], dtype=torch.float64))
    return {f"{prefix}_mean": d.mean().item(), f"{prefix}_median": q[0].item(), f"{prefix}_p90": q[1].item()}


def mode_balance(known, x: torch.Tensor, min_share: float = 0.25) -> dict[str, float]:
    """For a mixture with ``nearest_mode`` (``gmm2d``): modes covered (those holding at least
    ``min_share`` of their fair share 1/K of the samples) and the total-variation distance of the mode
    histogram from uniform (0 for perfectly balanced samples, up to 1 - 1/K for one mode only)."""
    k = known.n_modes
    counts = torch.bincount(known.nearest_mode(x.detach().cpu()), minlength=k).double()
    share = counts / counts.sum()
    return {
        "modes_covered": int((share >= min_share / k).sum().item()),
        "mode_tv": 0.5 * (share - 1.0 / k).abs().sum().item(),
    }


# -- sliced Wasserstein --------------------------------------------------------------------------------


def projection_directions(dim: int, n_proj: int, seed: int = 0) -> torch.Tensor:
    """``n_proj`` directions uniform on the unit sphere of R^dim, ``(n_proj, dim)`` float64, from ``seed``."""
    if dim < 1 or n_proj < 1:
        raise ValueError(f"need dim >= 1 and n_proj >= 1, got {dim}, {n_proj}")
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(n_proj, dim, generator=g, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


def _wasserstein_1d_pow(a: torch.Tensor, b: torch.Tensor, p: float) -> torch.Tensor:
    """Exact ``W_p^p`` between the empirical measures of the rows of ``a`` (P, n) and ``b`` (P, m).

    The quantile functions are step functions with jumps at i/n and j/m; on the merged grid both are
    constant, so the integral of |F^-1(u) - G^-1(u)|^p is an exact finite sum.
    """
    a, b = a.sort(dim=1).values, b.sort(dim=1).values
    n, m = a.shape[1], b.shape[1]
    if n == m:
        return (a - b).abs().pow(p).mean(dim=1)
    dev = a.device
    u = torch.cat([torch.arange(1, n + 1, device=dev) / n, torch.arange(1, m + 1, device=dev) / m])
    u = u.double().unique()  # sorted, ends at 1
    w = torch.diff(u, prepend=u.new_zeros(1))
    mid = u - w / 2
    ia = (mid * n).floor().long().clamp_(max=n - 1)
    ib = (mid * m).floor().long().clamp_(max=m - 1)
    return ((a[:, ia] - b[:, ib]).abs().pow(p) * w).sum(dim=1)


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, *, n_proj: int = 512, seed: int = 0, p: float = 2.0
) -> float:
    """Sliced ``p``-Wasserstein distance between the samples ``x`` (n, ...) and ``y`` (m, ...):

        SW_p = ( mean_k W_p^p(<theta_k, x>, <theta_k, y>) )^(1/p)

    over ``n_proj`` fixed random directions ``theta_k`` (from ``seed``: the same directions in every call,
    so numbers are comparable across models). Each 1-D distance is exact between the empirical
    measures (n and m may differ). Zero for identical sets; for ``y = x + c`` it is exactly
    ``sqrt(mean_k <theta_k, c>^2)`` (``p = 2``), about ``|c| / sqrt(dim)``. Two finite samples of the same
    distribution measure a small positive floor that shrinks like ``n^-1/2``: compare against it.
    """
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"sample shapes differ: {tuple(x.shape[1:])} vs {tuple(y.shape[1:])}")
    if x.shape[0] < 1 or y.shape[0] < 1:
        raise ValueError("both sample sets must be non-empty")
    if not p >= 1:
        raise ValueError(f"p must be >= 1, got {p}")
    xf = x.detach().reshape(x.shape[0], -1).double().cpu()
    yf = y.detach().reshape(y.shape[0], -1).double().cpu()
    theta = projection_directions(xf.shape[1], n_proj, seed)
    wp = _wasserstein_1d_pow(theta @ xf.T, theta @ yf.T, p)
    return wp.mean().pow(1.0 / p).item()


# -- the implied denoiser ------------------------------------------------------------------------------


def predict_x0(model: nn.Module, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's implied clean estimate ``x0_hat = (x_t - s_t eps_theta(x_t, t)) / a_t`` (no clamping)."""
    a, s = schedule.coeffs(t)
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    eps = model(x_t, t).float()
    return (x_t - s.view(shape) * eps) / a.view(shape)


def oracle_x0_subspace(known, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact posterior mean ``E[x0 | x_t]`` for the ``subspace`` distribution (the best any denoiser
    can do in mean squared error): with ``x0 = mean + B z``, ``z ~ N(0, c^2 I_k)``,

        E[x0 | x_t] = mean + B * (a c^2 / (a^2 c^2 + s^2)) * B^T (x_t - a mean)

    (the component of ``x_t`` off the subspace is pure noise and is dropped). float64 arithmetic."""
    a, s = (v.double() for v in schedule.coeffs(t.cpu(), torch.float64))
    B, mean = known.basis, known.mean
    flat = x_t.detach().reshape(x_t.shape[0], -1).double().cpu()
    c2 = known.scale**2
    gain = (a * c2 / (a * a * c2 + s * s)).view(-1, 1)
    z = (flat - a.view(-1, 1) * mean) @ B
    return (mean + (gain * z) @ B.T).reshape(x_t.shape).to(torch.float32)


def psnr(x: torch.Tensor, ref: torch.Tensor, peak: float = 2.0) -> float:
    """``10 log10(peak^2 / MSE)`` over all elements; ``peak = 2`` is the range of images in [-1, 1]."""
    mse = (x.detach().double().cpu() - ref.detach().double().cpu()).square().mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def denoiser_psnr(
    model: nn.Module,
    schedule: NoiseSchedule,
    clean: torch.Tensor,
    ts: Sequence[int],
    *,
    known=None,
    seed: int = 0,
    batch: int = 256,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """PSNR (peak 2, i.e. [-1, 1] images) of the implied denoiser ``x0_hat`` on fresh clean samples.

    For each ``t`` in ``ts``: ``x_t = a_t x0 + s_t eps`` with ``eps`` from ``seed`` (the same draws for
    every model), then ``x0_hat`` of the model. Returns ``{"psnr_t{t}": ...}``, and when ``known`` has a
    closed-form posterior mean (``subspace``) also ``{"psnr_oracle_t{t}": ...}``, the ceiling. The model
    runs in eval mode without gradients and is left as it was.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for t_val in ts:
                if not 0 <= int(t_val) < schedule.T:
                    raise ValueError(f"timestep {t_val} is outside [0, {schedule.T})")
                g = torch.Generator().manual_seed(seed * 1_000_003 + int(t_val))
                eps = torch.randn(clean.shape, generator=g)
                t = torch.full((clean.shape[0],), int(t_val), dtype=torch.long)
                a, s = schedule.coeffs(t)
                shape = (-1,) + (1,) * (clean.dim() - 1)
                x_t = a.view(shape) * clean + s.view(shape) * eps
                x0 = torch.cat(
                    [
                        predict_x0(model, schedule, xb.to(device), tb.to(device)).cpu()
                        for xb, tb in zip(x_t.split(batch), t.split(batch), strict=True)
                    ]
                )
                out[f"psnr_t{int(t_val)}"] = psnr(x0, clean)
                if known is not None and hasattr(known, "basis") and hasattr(known, "scale"):
                    out[f"psnr_oracle_t{int(t_val)}"] = psnr(
                        oracle_x0_subspace(known, schedule, x_t, t), clean
                    )
    finally:
        model.train(was_training)
    return out


# -- Fréchet distance ----------------------------------------------------------------------------------


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and unbiased covariance ``(d, d)`` of ``features`` ``(n, d)``, float64 numpy."""
    f = np.asarray(
        features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64
    )
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (n >= 2, d), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (FID's formula):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

    The trace term uses ``tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2))``, whose inner matrix is
    symmetric positive semi-definite: two symmetric eigendecompositions in float64, no complex parts and
    no ``sqrtm`` iteration (the tests check it against ``scipy.linalg.sqrtm``). Clamped at 0. Runs in
    torch (its thread setting applies: 2048-d Inception statistics take a few seconds on one core).
    """
    mu1, mu2 = (torch.as_tensor(np.asarray(m, dtype=np.float64)).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    s1, s2 = (s.reshape(1, 1) if s.dim() == 0 else s for s in (s1, s2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shapes do not match: mu {tuple(mu1.shape)}, {tuple(mu2.shape)}; "
            f"sigma {tuple(s1.shape)}, {tuple(s2.shape)}"
        )
    r1 = _psd_sqrt(s1)
    inner = r1 @ s2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    value = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2.0 * tr_sqrt
    return float(value.clamp(min=0).item())
