"""fastat's own UNet presets exported to diffusers: ``UNet2DModel`` of the same network (config + weight
mapping, :mod:`fastat.models.unet_diffusers`) and ``fastat export`` of a UNet run as a DDPMPipeline."""

import pytest
import torch
from train_helpers import IMAGES, POINTS, assert_one_line_error, run_cli

from fastat.models import UNet
from fastat.models.unet_diffusers import diffusers_config, diffusers_state_dict

diffusers = pytest.importorskip("diffusers", reason="diffusers not installed (pip install -e '.[test]')")

pytestmark = pytest.mark.usefixtures("one_thread")


def scrambled(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the initialisation leaves every residual branch near zero, which would
    hide a wrong mapping of those layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("preset", ["tiny", "cifar10"])
def test_a_unet_preset_is_a_unet2dmodel_with_the_same_outputs(preset):
    model = scrambled(UNet(preset))
    unet = diffusers.UNet2DModel(**diffusers_config(model.config)).eval()
    unet.load_state_dict(diffusers_state_dict(model), strict=True)  # every weight, no leftovers
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, model.image_size, model.image_size, generator=g)
    t = torch.tensor([7, 901])
    with torch.no_grad():
        ours, theirs = model(x, t), unet(x, t).sample
    assert ours.abs().max() > 0.05  # a real output, not near zero
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_a_narrowed_preset_with_attention_at_the_top_level_maps_too():
    model = scrambled(UNet("tiny", image_size=8, ch=8, groups=4, num_res_blocks=2))  # attention at level 0
    config = diffusers_config(model.config)
    assert config["down_block_types"] == ["AttnDownBlock2D", "DownBlock2D"]
    unet = diffusers.UNet2DModel(**config).eval()
    unet.load_state_dict(diffusers_state_dict(model), strict=True)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 500).sample, model(x, 500), atol=1e-5, rtol=0)


def test_export_a_unet_run_as_a_pipeline_that_samples(tmp_path, capsys):
    from fastat.eval.evaluate import load_run

    run, out = tmp_path / "run", tmp_path / "pipe"
    code, _, err = run_cli(capsys, "train", *IMAGES, "--steps", "2", "--set", "run.eval_n=0", "--out", run)
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "export", "--run", run, out)
    assert code == 0 and stdout.strip() == str(out), err
    model, _, _ = load_run(run, eps_model=False)  # the EMA weights, as exported
    unet = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet").eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, model(x, t), atol=1e-5, rtol=0)
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images  # fmt: skip
    assert images.shape == (2, 8, 8, 3) and 0 <= images.min() <= images.max() <= 1


def test_export_refuses_a_points_run(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *POINTS, "--steps", "1", "--out", run)
    assert code == 0, err
    code, _, err = run_cli(capsys, "export", "--run", run, tmp_path / "out")
    assert_one_line_error(code, err, "mlp", "points")
    assert not (tmp_path / "out").exists()


def test_a_class_conditional_unet_exports_its_class_embedding_and_the_readme_loop_samples(tmp_path, capsys):
    """Every label and the null one give fastat's outputs; the README's guided loop runs on the export."""
    import re
    from pathlib import Path

    from fastat.eval.evaluate import load_run

    run, out = tmp_path / "run", tmp_path / "cc"
    args = [a if a != "subspace" else "subspaces" for a in IMAGES]  # its 3 components are the classes
    code, _, err = run_cli(capsys, "train", *args, "--class-cond", "--steps", "2", "--set", "run.eval_n=0",
                           "--out", run)  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(capsys, "export", "--run", run, out)
    assert code == 0, err
    model, _, _ = load_run(run, eps_model=False)
    scrambled(model)
    with torch.no_grad():  # a class embedding of unit scale: every label moves the output visibly
        model.class_emb.embedding.weight.normal_(generator=torch.Generator().manual_seed(4))
    unet = diffusers.UNet2DModel(**diffusers_config(model.config)).eval()
    unet.load_state_dict(diffusers_state_dict(model), strict=True)
    assert diffusers.UNet2DModel.from_pretrained(out, subfolder="unet").config.num_class_embeds == 4
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t, y = torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        ours = model(x, t, y)
        torch.testing.assert_close(unet(x, t, class_labels=y).sample, ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(unet(x, t, class_labels=torch.full((4,), 3)).sample, model(x, t), atol=1e-5,
                                   rtol=0)  # fmt: skip
        assert (model(x, t, y.flip(0)) - ours).abs().max() > 1e-3  # the label matters (100x the tolerance)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```python\n(# guided sampling of an exported class-conditional run.*?)```", readme, re.S)
    assert block is not None, "the README lost its guided sampling loop"
    scope: dict = {}
    exec(block.group(1).replace('"out/cc"', repr(str(out))), scope)  # noqa: S102 - the README's own code
    assert scope["images"].shape == (8, 3, 8, 8) and torch.isfinite(scope["images"]).all()
