"""fastat's DDPM :class:`~fastat.models.unet.UNet` as diffusers' ``UNet2DModel``: its config and its weights.

    config = diffusers_config(model.config)        # UNet2DModel(**config) has the same layers
    unet.load_state_dict(diffusers_state_dict(model))   # the same function, to float rounding

Both implement Ho et al.'s network; the options that make diffusers' match fastat's exactly: the
embedding with sines first and frequencies ``10000 ** (-i / (half - 1))`` (``flip_sin_to_cos=False``,
``freq_shift=1``), single-head attention (``attention_head_dim=None``: one head of the block's width),
GroupNorm eps 1e-6, TF "SAME" stride-2 convs (``downsample_padding=0``: pad right/bottom by one) and
attention blocks at the levels whose resolution is in ``attn_resolutions``. The attention's fused
``qkv`` 1x1 conv becomes diffusers' ``to_q``/``to_k``/``to_v`` linear layers. A class-conditional UNet's
class embedding becomes ``num_class_embeds = num_classes + 1`` (label ``num_classes``: the null label, the
unconditional branch of guidance). No diffusers import here.
"""

from __future__ import annotations

import torch

from fastat.models.unet import _GN_EPS, Downsample, UNet, UNetConfig, Upsample

__all__ = ["diffusers_config", "diffusers_state_dict"]


def diffusers_config(cfg: UNetConfig) -> dict:
    """``UNet2DModel`` keyword arguments for the network :class:`UNet` builds from ``cfg``."""
    attn = [cfg.image_size // 2**i in cfg.attn_resolutions for i in range(len(cfg.ch_mult))]
    return {
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 0,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "attention_head_dim": None,
        "norm_num_groups": cfg.groups,
        "norm_eps": _GN_EPS,
        "resnet_time_scale_shift": "default",
        "add_attention": True,
        # class-conditional: one embedding per class and the null label last (added to the time embedding)
        "num_class_embeds": cfg.num_classes + 1 if cfg.num_classes else None,
    }


def _res(prefix: str, sd: dict, out: dict) -> None:
    names = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
             "conv2": "conv2", "skip": "conv_shortcut"}  # fmt: skip
    for key, value in sd.items():
        mine, _, param = key.rpartition(".")
        out[f"{prefix}.{names[mine]}.{param}"] = value


def _attn(prefix: str, sd: dict, out: dict) -> None:
    out[f"{prefix}.group_norm.weight"], out[f"{prefix}.group_norm.bias"] = sd["norm.weight"], sd["norm.bias"]
    qkv = zip(("to_q", "to_k", "to_v"), sd["qkv.weight"].chunk(3), sd["qkv.bias"].chunk(3), strict=True)
    for name, w, b in qkv:
        out[f"{prefix}.{name}.weight"], out[f"{prefix}.{name}.bias"] = w[:, :, 0, 0], b
    out[f"{prefix}.to_out.0.weight"] = sd["proj_out.weight"][:, :, 0, 0]
    out[f"{prefix}.to_out.0.bias"] = sd["proj_out.bias"]


def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def diffusers_state_dict(model: UNet) -> dict[str, torch.Tensor]:
    """``model``'s weights under ``UNet2DModel``'s parameter names (for :func:`diffusers_config`)."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    same = {"temb.0": "time_embedding.linear_1", "temb.2": "time_embedding.linear_2", "conv_in": "conv_in",
            "norm_out": "conv_norm_out", "conv_out": "conv_out"}  # fmt: skip
    for mine, theirs in same.items():
        for param in ("weight", "bias"):
            out[f"{theirs}.{param}"] = sd[f"{mine}.{param}"]
    if "class_emb.embedding.weight" in sd:
        out["class_embedding.weight"] = sd["class_emb.embedding.weight"]

    def path(side: str, modules, level_of) -> None:
        level, j = 0, 0  # level index in diffusers' block list, layer index within it
        for k, block in enumerate(modules):
            here = f"{side}.{k}."
            if isinstance(block, (Downsample, Upsample)):
                kind = "downsamplers" if isinstance(block, Downsample) else "upsamplers"
                for param in ("weight", "bias"):
                    out[f"{level_of}.{level}.{kind}.0.conv.{param}"] = sd[f"{here}conv.{param}"]
                level, j = level + 1, 0
                continue
            _res(f"{level_of}.{level}.resnets.{j}", _sub(sd, here + "0."), out)
            if len(block) > 1:
                _attn(f"{level_of}.{level}.attentions.{j}", _sub(sd, here + "1."), out)
            j += 1

    path("down", model.down, "down_blocks")
    path("up", model.up, "up_blocks")
    _res("mid_block.resnets.0", _sub(sd, "mid.0."), out)
    _attn("mid_block.attentions.0", _sub(sd, "mid.1."), out)
    _res("mid_block.resnets.1", _sub(sd, "mid.2."), out)
    return {k: v.detach().clone() for k, v in out.items()}
