"""Noise-prediction networks ``forward(x, t) -> eps``: the DDPM UNet (presets) and an MLP for points,
and diffusers' ``UNet2DModel`` (optional package) behind the same interface.

    model = build_model("cifar10")            # or "celeba64", "lsun256", "tiny", "mlp"
    model = build_model("mlp", dim=2)
    model = build_model("diffusers", **unet2d_config)   # needs diffusers; see fastat.models.diffusers_unet
    count_parameters(model)

Every model has ``sample_shape`` (one sample's shape, for samplers and trainers).
"""

from __future__ import annotations

from torch import nn

from fastat.models.embedding import timestep_embedding
from fastat.models.mlp import MLP
from fastat.models.unet import PRESETS, UNet, UNetConfig

__all__ = [
    "MLP",
    "MODEL_NAMES",
    "PRESETS",
    "UNet",
    "UNetConfig",
    "build_model",
    "count_parameters",
    "timestep_embedding",
]

MODEL_NAMES = (*PRESETS, "mlp", "diffusers")


def build_model(name: str, **kw) -> nn.Module:
    """A UNet preset (``PRESETS`` key, ``kw`` override :class:`UNetConfig` fields), ``"mlp"``, or
    ``"diffusers"`` (``kw`` are ``UNet2DModel`` arguments)."""
    if name == "mlp":
        return MLP(**kw)
    if name == "diffusers":
        from fastat.models.diffusers_unet import DiffusersUNet

        return DiffusersUNet(**kw)
    if name in PRESETS:
        return UNet(name, **kw)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
