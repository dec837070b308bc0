"""Plots of a comparison (matplotlib, optional: every function returns None without it): the summary bar
chart and, per point setting, samples and the learned denoising field of each variant."""

from __future__ import annotations

from pathlib import Path

import torch

from fastat.at.sampling import SamplerSpec
from fastat.eval.compare.report import SettingSummary
from fastat.eval.compare.spec import CompareSpec, Setting

__all__ = ["plot_setting", "plot_summary"]


def _view(known) -> torch.Tensor:
    """A ``(dim, 2)`` frame for drawing points: identity in 2-D; for the plane, one in-plane axis and
    the normal (a side view, where the distance to the support is the height)."""
    if known.sample_shape == (2,):
        return torch.eye(2, dtype=torch.float64)
    if hasattr(known, "normal"):
        return torch.stack([known.basis[:, 0], known.normal], dim=1)
    return torch.eye(known.sample_shape[0], 2, dtype=torch.float64)


def plot_setting(
    setting: Setting, runs: dict[str, str], path: Path, *, n: int = 512, field_t: int = 50
) -> Path | None:
    """Samples (top) and the learned denoising field ``x0_hat(x, t) - x`` at ``field_t`` (bottom) of one
    seed's runs, one column per variant. Points only; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from fastat.eval.evaluate import load_run
    from fastat.eval.metrics import predict_x0
    from fastat.train.run import build_training_data
    from fastat.train.samples import generate

    first = next(iter(runs.values()))
    _, cfg, _ = load_run(first)
    td = build_training_data(cfg)
    known = td.known
    if known is None or known.kind != "points":
        return None
    V = _view(known)
    data2 = (td.data.double() @ V).numpy()
    noise = torch.randn((n, *known.sample_shape), generator=torch.Generator().manual_seed(7))
    lim = max(float(abs(data2).max()) * 1.1, 1.0)
    grid = torch.linspace(-lim, lim, 17, dtype=torch.float64)
    gy, gx = torch.meshgrid(grid, grid, indexing="ij")
    g2 = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    gpts = (g2 @ V.T).float()
    fig, axes = plt.subplots(2, len(runs), figsize=(3.2 * len(runs), 6.4), squeeze=False)
    for j, (variant, run) in enumerate(runs.items()):
        model, cfg, _ = load_run(run)
        schedule = cfg.build_objective().schedule
        x = generate(
            model, schedule, noise, SamplerSpec("ddim", 50, 1.0), generator=torch.Generator().manual_seed(8)
        )
        x2 = (x.double() @ V).numpy()
        ax = axes[0, j]
        ax.scatter(data2[:, 0], data2[:, 1], s=1, c="0.8", label="training data")
        ax.scatter(x2[:, 0], x2[:, 1], s=2, c="C0", label="samples")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_title(variant, fontsize=9)
        if j == 0:
            ax.legend(loc="upper right", fontsize=6, markerscale=3)
        with torch.no_grad():
            t = torch.full((gpts.shape[0],), field_t, dtype=torch.long)
            d = (predict_x0(model, schedule, gpts, t).double() - gpts.double()) @ V
        ax = axes[1, j]
        ax.scatter(data2[:, 0], data2[:, 1], s=1, c="0.85")
        ax.quiver(
            g2[:, 0].numpy(),
            g2[:, 1].numpy(),
            d[:, 0].numpy(),
            d[:, 1].numpy(),
            angles="xy",
            scale_units="xy",
            scale=2.0,
            width=0.004,
            color="C3",
        )
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_title(f"(x0_hat - x) / 2 at t={field_t}", fontsize=8)
    view = "side view (in-plane axis, normal)" if hasattr(known, "normal") else "x, y"
    fig.suptitle(f"{setting.name}: {setting.describe()} — {view}", fontsize=10)
    fig.tight_layout()
    from fastat.train.checkpoint import atomic_write

    try:
        return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=90))
    finally:
        plt.close(fig)


def plot_summary(summary: dict[str, SettingSummary], spec: CompareSpec, path: Path) -> Path | None:
    """Bar chart of the mean distance to the support (± std over seeds) per setting and variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    settings = list(summary)
    variants = [v for v in spec.modes if any(v in summary[s].variants for s in settings)]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.8 * len(settings) * 2), 3.6))
    w = 0.8 / max(len(variants), 1)
    for ax, key, title in (
        (axes[0], "dist_mean", "distance to clean support (mean)"),
        (axes[1], "sw", "sliced W2 to clean"),
    ):
        for i, v in enumerate(variants):
            ms = [
                summary[s].variants[v].stats.get(key) if v in summary[s].variants else None for s in settings
            ]
            m = [x[0] if x is not None else float("nan") for x in ms]
            e = [x[1] if x is not None else 0.0 for x in ms]
            ax.bar([k + i * w for k in range(len(settings))], m, w, yerr=e, label=v, capsize=2)
        ref_key = "data_dist_mean" if key == "dist_mean" else "sw_floor"
        for k, s in enumerate(settings):
            r = summary[s].reference.get(ref_key)
            if r is not None:
                ax.hlines(r, k - w / 2, k + 0.8 - w / 2, colors="k", linestyles="dashed", linewidth=1)
        ax.set_xticks([k + 0.4 - w / 2 for k in range(len(settings))], settings, fontsize=8)
        ax.set_title(
            title + (" (dashed: training data)" if key == "dist_mean" else " (dashed: floor)"), fontsize=9
        )
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    from fastat.train.checkpoint import atomic_write

    try:
        return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=90))
    finally:
        plt.close(fig)
