"""Noise-prediction networks: the DDPM UNet presets, the MLP, the shared timestep embedding."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch
from torch import nn

from fastat.models import MLP, PRESETS, UNet, UNetConfig, build_model, count_parameters, timestep_embedding

# Measured; cifar10 is the parameter count of the reference DDPM CIFAR-10 model (diffusion_tf),
# lsun256 the "114M" of Ho et al. 2020 (Appendix B) for the 256x256 models.
PARAMS = {"cifar10": 35_746_307, "celeba64": 78_700_803, "lsun256": 113_673_219, "tiny": 702_499}


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Unit-scale weights everywhere (the DDPM init makes residual branches, hence t, nearly inert)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(fan_in))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


@pytest.fixture
def tiny() -> UNet:
    torch.manual_seed(0)
    return _randomize(UNet("tiny")).eval()


# ---------------------------------------------------------------------------------------------- UNet


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameter_count(preset):
    with torch.device("meta"):  # no allocation, no init cost
        model = build_model(preset)
    assert count_parameters(model) == PARAMS[preset]


def test_cifar10_matches_reference_size():
    with torch.device("meta"):
        n = count_parameters(UNet("cifar10"))
    assert 35_600_000 <= n <= 35_800_000
    assert n == 35_746_307


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_output_shape(preset):
    # Shape propagation through the full-size graph on the meta device (no compute).
    with torch.device("meta"):
        model = UNet(preset)
        x = torch.empty(2, *model.sample_shape)
        eps = model(x, torch.zeros(2, dtype=torch.long))
    assert model.sample_shape == (3, PRESETS[preset].image_size, PRESETS[preset].image_size)
    assert eps.shape == x.shape


def test_cifar10_runs_on_cpu():
    torch.manual_seed(0)
    model = UNet("cifar10").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        eps = model(x, torch.tensor([999]))
    assert eps.shape == x.shape and torch.isfinite(eps).all() and eps.abs().max() > 0


def test_lsun256_layout_runs_reduced_width():
    # The 6-level layout at 256x256, with a narrow width so that it runs in well under a second.
    model = UNet("lsun256", ch=16, groups=16).eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert model(x, torch.tensor([3])).shape == x.shape


def test_tiny_forward_backward_is_fast(tiny):
    x = torch.randn(8, *tiny.sample_shape)
    t = torch.randint(0, 1000, (8,))
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        tiny.zero_grad(set_to_none=True)
        tiny(x, t).square().mean().backward()
        best = min(best, time.perf_counter() - start)
    assert best < 1.0, f"tiny UNet forward+backward took {best:.3f}s at batch 8"
    assert all(p.grad is not None for p in tiny.parameters())


def test_input_gradient(tiny):
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    x_before = x.detach().clone()
    t = torch.tensor([0, 10, 500, 999])
    (g,) = torch.autograd.grad(tiny(x, t).square().sum(), x)
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    assert torch.equal(x.detach(), x_before)  # no in-place op on the input
    # Also at the default (DDPM) initialisation, whose last conv is not zeroed.
    fresh = UNet("tiny")
    (g0,) = torch.autograd.grad(fresh(x, t).square().sum(), x)
    assert g0.abs().sum() > 0


def test_float_and_int_t_agree_and_t_matters(tiny):
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([1, 250, 999])
    with torch.no_grad():
        out_int = tiny(x, t)
        out_float = tiny(x, t.float())
        out_other = tiny(x, t.flip(0) + 1)
    torch.testing.assert_close(out_float, out_int, rtol=0, atol=0)
    assert (out_other - out_int).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_scalar_t_broadcasts(tiny):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = tiny(x, torch.tensor([7, 7]))
        torch.testing.assert_close(tiny(x, torch.tensor(7)), ref, rtol=0, atol=0)
        torch.testing.assert_close(tiny(x, 7), ref, rtol=0, atol=0)
        torch.testing.assert_close(tiny(x, 7.0), ref, rtol=0, atol=0)


def test_batch_independence(tiny):
    # Each sample's output depends only on its own input and timestep (GroupNorm, not BatchNorm).
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([5, 50, 500])
    with torch.no_grad():
        full = tiny(x, t)
        single = tiny(x[1:2], t[1:2])
    torch.testing.assert_close(full[1:2], single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 1, 16, 16), "channels"),
        ((2, 3, 15, 16), "divisible"),
        ((2, 3, 16, 17), "divisible"),
        ((3, 16, 16), r"\(B, C, H, W\)"),
        ((2, 3, 16, 16, 1), r"\(B, C, H, W\)"),
    ],
)
def test_bad_input_shape(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny(torch.randn(shape), torch.zeros(shape[0], dtype=torch.long))


def test_bad_timestep_shape(tiny):
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="timesteps"):
        tiny(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="timesteps"):
        tiny(x, torch.zeros(2, 1, dtype=torch.long))


def test_other_image_size_runs(tiny):
    # Fully convolutional: any size divisible by the downsampling factor works.
    x = torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        assert tiny(x, torch.tensor([3])).shape == x.shape


def test_config_and_overrides():
    model = UNet("tiny", image_size=32, in_channels=1)
    assert model.sample_shape == (1, 32, 32)
    assert model.config == dataclasses.replace(PRESETS["tiny"], image_size=32, in_channels=1)
    assert UNet(model.config).config == model.config
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.config.ch = 64  # type: ignore[misc]
    assert PRESETS["cifar10"] == UNetConfig(32, 3, 128, [1, 2, 2, 2], 2, [16], 0.1)  # lists -> tuples


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_size": 15}, "divisible"),
        ({"groups": 7}, "groups"),
        ({"attn_resolutions": (0,)}, "attn_resolutions"),
        ({"dropout": 1.0}, "dropout"),
        ({"ch_mult": ()}, "ch_mult"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"channels": 3}, "unknown UNet option"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet("tiny", **kwargs)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown UNet preset"):
        UNet("cifar100")
    with pytest.raises(ValueError, match="choose one of"):
        build_model("resnet")


def test_dropout_train_vs_eval():
    torch.manual_seed(0)
    model = _randomize(UNet("tiny", dropout=0.5))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 4])
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x, t), model(x, t))
        model.eval()
        assert torch.equal(model(x, t), model(x, t))


@pytest.mark.slow
def test_torch_compile_fullgraph_and_input_grad(tiny):
    torch._dynamo.reset()
    compiled = torch.compile(tiny, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    t = torch.tensor([10, 900])
    out = compiled(x, t)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    out_ref = tiny(x, t)
    (g_ref,) = torch.autograd.grad(out_ref.square().sum(), x)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(g, g_ref)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------- MLP


def test_mlp_shapes_and_grad():
    torch.manual_seed(0)
    model = build_model("mlp", dim=3, hidden=32, depth=2)
    assert isinstance(model, MLP) and model.sample_shape == (3,)
    x = torch.randn(5, 3, requires_grad=True)
    eps = model(x, torch.randint(0, 1000, (5,)))
    assert eps.shape == x.shape
    (g,) = torch.autograd.grad(eps.square().sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_mlp_timesteps():
    torch.manual_seed(0)
    model = MLP(2, hidden=32, depth=2).eval()
    x = torch.randn(4, 2)
    t = torch.tensor([0, 3, 300, 999])
    with torch.no_grad():
        ref = model(x, t)
        torch.testing.assert_close(model(x, t.double()), ref, rtol=0, atol=0)
        torch.testing.assert_close(model(x, 3), model(x, torch.full((4,), 3)), rtol=0, atol=0)
        assert (model(x, t + 1) - ref).abs().amax(dim=1).min() > 1e-4


def test_mlp_parameter_count():
    model = MLP(2, hidden=32, depth=2, time_dim=16)
    temb = 16 * 32 + 32 + 32 * 32 + 32
    block = 2 * 32 + 3 * (32 * 32 + 32)
    assert count_parameters(model) == temb + (2 * 32 + 32) + 2 * block + 2 * 32 + (32 * 2 + 2)
    for p in model.temb.parameters():
        p.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - temb


@pytest.mark.parametrize("shape", [(4, 3), (4,), (4, 2, 1)])
def test_mlp_bad_input(shape):
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        MLP(2)(torch.randn(shape), torch.zeros(shape[0], dtype=torch.long))


@pytest.mark.parametrize("kwargs", [{"dim": 0}, {"dim": 2, "depth": 0}, {"dim": 2, "time_dim": 1}])
def test_mlp_bad_config(kwargs):
    with pytest.raises(ValueError):
        MLP(**kwargs)


# ----------------------------------------------------------------------------------------- embedding


@pytest.mark.parametrize("dim", [2, 7, 64, 128])
def test_timestep_embedding(dim):
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
    args = t.double()[:, None] * freqs
    ref = torch.cat(
        [args.sin(), args.cos()] + ([torch.zeros(4, 1, dtype=torch.float64)] if dim % 2 else []), 1
    )
    torch.testing.assert_close(emb.double(), ref, rtol=0, atol=5e-4)  # float32 args up to 999 rad
    torch.testing.assert_close(timestep_embedding(t.float(), dim), emb, rtol=0, atol=0)
