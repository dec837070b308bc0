"""Drawing samples from a trained model and writing them where people (and programs) can look.

    x = generate(ema_model, schedule, noise, SamplerSpec("ddim", steps=50, clip_x0=1.0))
    write_samples(x, "grid.png", kind="image")     # a grid of images (torchvision.utils.save_image)
    write_samples(x, "samples.npy", kind="image")  # float32 N x C x H x W in [0, 1]
    write_samples(p, "points.npy", kind="points")  # float32 N x D in data units
    write_samples(p, "points.png", kind="points")  # scatter plot (needs matplotlib)
    save_image_folder(x, "exported/")               # one 8-bit PNG per image (a folder fastat can train on)

Images are held in ``[-1, 1]`` during training and written in ``[0, 1]``; points are written as they are.
Every file is written atomically (temp file + rename).
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastat.at.sampling import Guided, SamplerSpec, ddim_sample, ddpm_sample, model_device
from fastat.at.schedule import NoiseSchedule
from fastat.train.checkpoint import atomic_write

__all__ = [
    "SAMPLE_SUFFIXES",
    "generate",
    "save_grid",
    "save_image_folder",
    "save_npy",
    "save_scatter",
    "to_output",
    "write_samples",
]

SAMPLE_SUFFIXES = (".png", ".npy")


def generate(
    model: nn.Module,
    schedule: NoiseSchedule,
    noise: torch.Tensor,
    spec: SamplerSpec | None = None,
    *,
    generator: torch.Generator | None = None,
    batch: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
    labels: torch.Tensor | None = None,  # class-conditional: a class per sample (N,)
    guidance: float = 1.0,  # ... and the classifier-free guidance scale (fastat.at.sampling.Guided)
    **changes,
) -> torch.Tensor:
    """Samples (float32, on the CPU) from the starting noise ``noise`` ``(N, ...)``, ``batch`` at a time.

    ``spec``: how (:class:`~fastat.at.sampling.SamplerSpec`; ``changes`` replace its fields, e.g.
    ``steps=10``); ddpm's per-step noise comes from ``generator``. ``progress``: a tqdm bar over all the
    sampler's steps. The model is run in eval mode and left as it was.
    """
    spec = replace(spec or SamplerSpec(), **changes)
    if spec.sampler not in ("ddim", "ddpm"):
        raise ValueError(f"unknown sampler {spec.sampler!r}; choose ddim or ddpm")
    chunks = noise.split(batch)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chunks) * spec.visited(schedule.T), desc="sampling", unit="step", leave=False)
    out = []
    parts = labels.split(batch) if labels is not None else [None] * len(chunks)
    try:
        for chunk, y in zip(chunks, parts, strict=True):
            net = model if y is None else Guided(model, y.to(model_device(model, device)), guidance)
            if spec.sampler == "ddim":
                x = ddim_sample(net, schedule, chunk, steps=spec.steps, eta=spec.eta, generator=generator,
                                device=device, clip_x0=spec.clip_x0, progress=bar)  # fmt: skip
            else:
                x = ddpm_sample(net, schedule, chunk, generator=generator, device=device,
                                clip_x0=spec.clip_x0, progress=bar)  # fmt: skip
            out.append(x.float().cpu())
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(out)


def to_output(x: torch.Tensor, kind: str) -> torch.Tensor:
    """What files hold: images mapped from ``[-1, 1]`` to ``[0, 1]`` (clamped); points unchanged."""
    x = x.detach().float().cpu()
    return ((x + 1) / 2).clamp(0, 1) if kind == "image" else x


GRID_MIN_PX = 256  # small images are enlarged (nearest, whole factors) until a grid row is this wide


def save_grid(images01: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """A PNG grid of ``(N, C, H, W)`` images in ``[0, 1]``, ``nrow`` per row (default ~sqrt(N)). Images
    of a row narrower than :data:`GRID_MIN_PX` are enlarged by the smallest whole factor that reaches it
    (nearest neighbour: every pixel a visible square, no smoothing), so an 8x8 run's grid is seen."""
    from torchvision.utils import save_image

    nrow = nrow or max(1, math.ceil(math.sqrt(images01.shape[0])))
    width = min(nrow, images01.shape[0]) * images01.shape[-1]
    factor = max(1, math.ceil(GRID_MIN_PX / max(width, 1)))
    if factor > 1:
        images01 = torch.nn.functional.interpolate(images01, scale_factor=factor, mode="nearest")
    return atomic_write(path, lambda p: save_image(images01, p, nrow=nrow, padding=1, format="png"))


def save_image_folder(x: torch.Tensor, folder: str | os.PathLike) -> Path:
    """Images ``(N, C, H, W)`` in ``[-1, 1]`` as 8-bit PNGs ``folder/NNNNNN.png`` (clamped, rounded to the
    nearest of 256 levels: what a folder for ``fastat train --dataset FOLDER`` holds). Returns ``folder``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    u8 = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    mode = {1: "L", 3: "RGB"}.get(u8.shape[1])
    if u8.dim() != 4 or mode is None:
        raise ValueError(f"expected images (N, 1 or 3, H, W), got {tuple(x.shape)}")
    for i, img in enumerate(u8.permute(0, 2, 3, 1).numpy()):
        arr = np.ascontiguousarray(img[..., 0] if mode == "L" else img)
        atomic_write(folder / f"{i:06d}.png", lambda p, a=arr: Image.fromarray(a, mode).save(p, format="png"))
    return folder


def save_npy(x: torch.Tensor, path: str | os.PathLike) -> Path:
    """``x`` as a float32 ``.npy`` file."""
    arr = x.detach().cpu().numpy().astype(np.float32)

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, arr)

    return atomic_write(path, write)


def save_scatter(
    points: torch.Tensor, path: str | os.PathLike, reference: torch.Tensor | None = None, title: str = ""
) -> Path | None:
    """A scatter plot of 2-D or 3-D points (and, faint, ``reference`` points); ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts = points.detach().cpu().numpy()
    ref = reference.detach().cpu().numpy() if reference is not None else None
    fig = plt.figure(figsize=(5, 5))
    if pts.shape[1] == 3:
        ax = fig.add_subplot(projection="3d")
        if ref is not None:
            ax.scatter(*ref.T, s=2, c="0.75", label="training data")
        ax.scatter(*pts.T, s=3, c="C0", label="samples")
    else:
        ax = fig.add_subplot()
        if ref is not None:
            ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.75", label="training data")
        ax.scatter(pts[:, 0], pts[:, 1], s=3, c="C0", label="samples")
        ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize="small")
    try:
        return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    finally:
        plt.close(fig)


def write_samples(
    x: torch.Tensor, path: str | os.PathLike, kind: str, reference: torch.Tensor | None = None
) -> Path | None:
    """Write samples ``x`` (data units) to ``path`` by its suffix: ``.png`` (grid for images, scatter for
    points) or ``.npy`` (raw, see :func:`to_output`). Returns the path (None: a scatter without
    matplotlib)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAMPLE_SUFFIXES:
        raise ValueError(f"sample file {path} must end in {' or '.join(SAMPLE_SUFFIXES)}")
    y = to_output(x, kind)
    if suffix == ".npy":
        return save_npy(y, path)
    if kind == "image":
        return save_grid(y, path)
    if y.dim() != 2 or y.shape[1] not in (2, 3):
        raise ValueError(f"a .png of points needs 2-D or 3-D points, got shape {tuple(y.shape)}; use .npy")
    return save_scatter(y, path, reference)
