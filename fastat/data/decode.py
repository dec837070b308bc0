"""One image file -> uint8 RGB ``(3, size, size)``: the single decode used by ``fastat prepare`` and
:class:`fastat.data.ImageFolder`.

    arr = decode_image("img/0001.png", 64)        # numpy uint8 (3, 64, 64)

Every PIL format and mode is converted to 8-bit RGB by its meaning, not by clipping (16-bit greyscale
scaled, float images read as [0, 1] or [0, 255], transparency composited over white); then EXIF
orientation, the short side resized to ``size`` (bicubic, antialiased; JPEGs DCT-reduced first) and the
centre cropped. PIL and numpy only (no torch), so decode workers start quickly. The rules:
docs/DESIGN.md ("Data").
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "READ_ERRORS", "decode_image", "resize_crop", "to_rgb"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# What a damaged or foreign file raises while PIL opens or decodes it.
READ_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)

_WHITE = (255, 255, 255)


def _to_8bit(im: Image.Image) -> Image.Image:
    """High-bit-depth single-channel modes -> ``L`` by value (not by clipping)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit ``RGB`` (see the module docstring for the rules)."""
    im = _to_8bit(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def decode_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """The file at ``path`` as uint8 ``(3, size, size)``: RGB, short side ``size``, centre crop.

    Raises one of :data:`READ_ERRORS` for a file PIL cannot read.
    """
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (2 * size, 2 * size))  # DCT scaling: never below twice the target size
        return resize_crop(to_rgb(ImageOps.exif_transpose(im)), size)


def resize_crop(im: Image.Image, size: int) -> np.ndarray:
    """An RGB image as uint8 ``(3, size, size)``: bicubic resize of the short side to ``size`` (none when it
    is already), then the centre crop."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
