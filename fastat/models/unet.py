"""The DDPM UNet of Ho et al. 2020 (``diffusion_tf/models/unet.py``), ported to PyTorch.

    model = UNet("cifar10")               # 35,746,307 parameters, as the reference
    eps = model(x_t, t)                   # x_t (B, 3, 32, 32), t (B,) integer timesteps

Layout: sinusoidal timestep embedding -> Linear/SiLU/Linear (4*ch); ``conv_in``; per resolution
``num_res_blocks`` residual blocks (+ self-attention at ``attn_resolutions``) and a stride-2 conv;
middle Res/Attn/Res; the mirror path with ``num_res_blocks + 1`` blocks per resolution, each taking a
skip connection, and nearest upsample + conv; GroupNorm/SiLU/conv to the input channels.

The forward has no data-dependent Python control flow and no in-place ops on its inputs, so it works
under ``torch.compile(fullgraph=True)`` and ``torch.autograd.grad`` with respect to ``x``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastat.models.embedding import ClassEmbedding, batch_timesteps, timestep_embedding

__all__ = ["PRESETS", "UNet", "UNetConfig"]

_GN_EPS = 1e-6  # tf.contrib.layers.group_norm's epsilon, as in the reference
_SMALL_GAIN = 1e-5  # xavier gain of the last layer of each residual branch (reference: variance 1e-10)


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of :class:`UNet`; the output has ``in_channels`` channels (the predicted noise).

    Self-attention follows the residual blocks working at a resolution listed in ``attn_resolutions``
    (as in the reference, a listed size the model never reaches is ignored: overriding ``image_size``
    of a preset keeps it valid); the middle block always has attention.
    """

    image_size: int
    in_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    groups: int = 32
    num_classes: int = 0  # > 0: class-conditional (a class embedding added to the time embedding)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        for name in ("image_size", "in_channels", "ch", "num_res_blocks", "groups"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {v!r}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(
                f"UNetConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.groups]
        if bad:
            raise ValueError(f"GroupNorm groups={self.groups} must divide every channel count, not {bad}")
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by "
                f"2**(len(ch_mult)-1) = {self.downsample_factor}"
            )
        if min(self.attn_resolutions, default=1) < 1:
            raise ValueError(f"UNetConfig.attn_resolutions must be positive, got {self.attn_resolutions}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))


PRESETS: dict[str, UNetConfig] = {
    # Ho et al. 2020, Appendix B: CIFAR-10 35.7M, CelebA-HQ/LSUN 256x256 114M parameters.
    "cifar10": UNetConfig(32, 3, 128, (1, 2, 2, 2), 2, (16,), 0.1),
    "celeba64": UNetConfig(64, 3, 128, (1, 2, 2, 2, 4), 2, (16,), 0.1),
    "lsun256": UNetConfig(256, 3, 128, (1, 1, 2, 2, 4, 4), 2, (16,), 0.0),
    # CPU tests and smoke runs.
    "tiny": UNetConfig(16, 3, 32, (1, 2), 1, (8,), 0.0, groups=8),
}


def _norm(groups: int, ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch, eps=_GN_EPS)


class ResBlock(nn.Module):
    """GroupNorm/SiLU/conv3x3, + projected timestep embedding, GroupNorm/SiLU/dropout/conv3x3, + skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = _norm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()  # "nin_shortcut"

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions: GroupNorm, qkv 1x1 conv, softmax, 1x1 conv."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale C**-0.5
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """3x3 conv with stride 2 and TF "SAME" padding (one row/column after, none before)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """A residual block, optionally followed by attention, both receiving the timestep embedding."""

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, temb)
        return x


def _resolve_config(preset: str | UNetConfig, overrides: dict) -> UNetConfig:
    if isinstance(preset, UNetConfig):
        base = preset
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise ValueError(f"unknown UNet preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(UNetConfig)})
    if unknown:
        raise ValueError(
            f"unknown UNet option(s) {unknown}; UNetConfig fields are "
            f"{[f.name for f in dataclasses.fields(UNetConfig)]}"
        )
    return dataclasses.replace(base, **overrides)


class UNet(nn.Module):
    """DDPM UNet ``forward(x, t) -> eps``: ``UNet("cifar10")``, ``UNet("tiny", image_size=32)``, ``UNet(cfg)``

    ``t`` is a ``(B,)`` tensor of timesteps (integer or float), a 0-dim tensor or a number (broadcast).
    Initialisation follows the reference (xavier-uniform weights, zero biases, near-zero last layer of
    every residual/attention branch) except ``conv_out``, kept at unit scale so that the prediction and
    its input gradient are not vanishingly small at initialisation (adversarial training needs them).
    """

    def __init__(self, preset: str | UNetConfig = "cifar10", **overrides) -> None:
        super().__init__()
        cfg = _resolve_config(preset, overrides)
        self.config = cfg
        self.image_size, self.in_channels = cfg.image_size, cfg.in_channels
        ch, g, p = cfg.ch, cfg.groups, cfg.dropout
        temb_ch = 4 * ch

        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.num_classes = cfg.num_classes
        self.class_emb = ClassEmbedding(cfg.num_classes, temb_ch) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_chs, cur, res = [ch], ch, cfg.image_size
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                block = TimestepSequential(ResBlock(cur, ch * mult, temb_ch, p, g))
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    block.append(AttnBlock(cur, g))
                self.down.append(block)
                skip_chs.append(cur)
            if level != len(cfg.ch_mult) - 1:
                self.down.append(Downsample(cur))
                skip_chs.append(cur)
                res //= 2

        self.mid = TimestepSequential(
            ResBlock(cur, cur, temb_ch, p, g), AttnBlock(cur, g), ResBlock(cur, cur, temb_ch, p, g)
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                block = TimestepSequential(ResBlock(cur + skip_chs.pop(), ch * mult, temb_ch, p, g))
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    block.append(AttnBlock(cur, g))
                self.up.append(block)
            if level != 0:
                self.up.append(Upsample(cur))
                res *= 2
        assert not skip_chs

        self.norm_out = _norm(g, cur)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.xavier_uniform_(m.conv2.weight, gain=_SMALL_GAIN)
            elif isinstance(m, AttnBlock):
                nn.init.xavier_uniform_(m.proj_out.weight, gain=_SMALL_GAIN)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one sample."""
        return (self.in_channels, self.image_size, self.image_size)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"UNet expects x of shape (B, C, H, W), got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet built for {self.in_channels} input channels, got x of shape {tuple(x.shape)}"
            )
        f = self.config.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"UNet spatial size must be divisible by 2**(len(ch_mult)-1) = {f}, got {tuple(x.shape[2:])}"
            )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | int | float, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted noise ``eps`` of the same shape as ``x`` (``y``: class labels, None: unconditional)."""
        self._check_input(x)
        t = batch_timesteps(t, x.shape[0], x.device)
        temb = self.temb(timestep_embedding(t, self.config.ch).to(self.conv_in.weight.dtype))
        if self.class_emb is not None:
            temb = temb + self.class_emb(y, x.shape[0], x.device)

        hs = [self.conv_in(x)]
        for block in self.down:
            hs.append(block(hs[-1], temb))
        h = self.mid(hs[-1], temb)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))
