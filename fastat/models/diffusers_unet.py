"""diffusers' ``UNet2DModel`` as a fastat model: ``forward(x, t) -> tensor``, built from a config dict.

    model = build_model("diffusers", block_out_channels=[32, 64], norm_num_groups=8,
                        down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                        up_block_types=["AttnUpBlock2D", "UpBlock2D"], sample_size=32)
    model.unet.save_pretrained("out/unet")       # the plain diffusers model inside

diffusers is optional (``pip install 'fastat[diffusers]'``): it is imported when such a model is built,
never by ``import fastat``. The keyword arguments are ``UNet2DModel``'s; :func:`read_unet_config` reads
them from a diffusers ``config.json`` (or a folder holding one, or a YAML file).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
import yaml
from torch import nn

from fastat.utils.errors import one_line

__all__ = [
    "INSTALL_HINT",
    "TINY_CONFIG",
    "DiffusersUNet",
    "diffusers_available",
    "read_unet_config",
    "require_diffusers",
]

INSTALL_HINT = "pip install 'fastat[diffusers]' (or: pip install diffusers)"

# The smallest UNet2DModel with both block kinds (two levels, one attention block): smoke tests, benchmarks.
TINY_CONFIG = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 4,
}


def diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def require_diffusers(what: str = "--model diffusers"):
    """The ``diffusers`` module, or ModuleNotFoundError saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise ModuleNotFoundError(f"{what} needs the diffusers package: {INSTALL_HINT}") from None
    return diffusers


def read_unet_config(path: str | os.PathLike) -> dict:
    """``UNet2DModel`` arguments from a JSON or YAML file, or from a folder's ``config.json`` (a saved
    model, or ``unet/`` of a pipeline). diffusers' private keys (``_class_name``, ...) are dropped."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json" if (p / "config.json").is_file() else p / "unet" / "config.json"
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"cannot read the UNet2DModel config {p}: {e.strerror or e}") from None
    try:
        d = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"cannot parse the UNet2DModel config {p}: {one_line(e, first_only=True)}") from None
    if not isinstance(d, dict):
        raise ValueError(
            f"the UNet2DModel config {p} must hold a mapping of arguments, got {type(d).__name__}"
        )
    return {k: v for k, v in d.items() if not str(k).startswith("_")}


class DiffusersUNet(nn.Module):
    """A ``diffusers.UNet2DModel(**config)`` whose forward returns the prediction tensor.

    ``sample_shape`` is ``(in_channels, H, W)`` from the config's ``sample_size``.
    """

    def __init__(self, **config) -> None:
        super().__init__()
        self.unet = require_diffusers().UNet2DModel(**config)
        c = self.unet.config
        size = c.sample_size
        if size is not None:
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            self.sample_shape = (c.in_channels, h, w)
        # class-conditional (num_class_embeds = classes + 1): the last embedding is the null label
        self.num_classes = (c.num_class_embeds or 1) - 1 if c.class_embed_type is None else 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if not self.num_classes:
            return self.unet(x, t, return_dict=False)[0]
        null = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        labels = null if y is None else torch.where(y < 0, null, y)  # -1: the null label, as fastat's
        return self.unet(x, t, class_labels=labels, return_dict=False)[0]
