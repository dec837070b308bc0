"""fastat inside other codebases: diffusers' UNet2DModel and schedulers, denoising-diffusion-pytorch's
GaussianDiffusion; ``--model diffusers`` in the trainer and ``fastat export --format diffusers``.

Each test skips with "X not installed" where its optional package is missing (``pip install -e '.[test]'``
installs them all).
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from train_helpers import IMAGES, assert_one_line_error, run_cli, snapshot, weights

from fastat.at.objective import ATObjective
from fastat.at.schedule import NoiseSchedule
from fastat.models.diffusers_unet import TINY_CONFIG as TINY_UNET


def needs(module: str, package: str | None = None):
    return pytest.importorskip(module, reason=f"{package or module} not installed (pip install -e '.[test]')")


pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(torch.nn.Module):
    """Records the inputs of every call of ``model`` (the objective's x_t first, x_t + s w last)."""

    def __init__(self, model, call=None):
        super().__init__()
        self.model, self.call, self.calls = model, call, []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.clone()))
        return self.model(x, t) if self.call is None else self.call(self.model, x, t)


def unet(sample_size=8, seed=0):
    diffusers = needs("diffusers")
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, **TINY_UNET)


def images(n=4, size=8, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


# -- diffusers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_diffusers_schedules_by_name_and_from_the_scheduler(kind):
    diffusers = needs("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=kind, prediction_type="sample")
    ours = NoiseSchedule(kind, T=1000)
    theirs = NoiseSchedule.from_scheduler(sched)
    assert theirs.prediction == "x0" and theirs.T == 1000
    for s in (ours, theirs):  # diffusers computes in float32
        torch.testing.assert_close(s.alphas_cumprod, sched.alphas_cumprod.double(), atol=5e-7, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_mode_is_diffusers_training_loss(prediction_type):
    """mode="ddpm" with the scheduler object is exactly the loss of diffusers' training scripts:
    add_noise, then MSE against noise / get_velocity / the clean sample."""
    diffusers = needs("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    model = Recorder(unet())  # returns UNet2DOutput: read through .sample
    x0 = images()
    loss = ATObjective(schedule=sched, mode="ddpm")(model, x0, torch.Generator().manual_seed(3)).loss
    ((x_t, t),) = model.calls
    a, s = (c.reshape(-1, 1, 1, 1) for c in NoiseSchedule.from_scheduler(sched).coeffs(t))
    noise = (x_t - a * x0) / s
    torch.testing.assert_close(sched.add_noise(x0, noise, t), x_t, atol=1e-5, rtol=1e-5)
    target = {"epsilon": noise, "v_prediction": sched.get_velocity(x0, noise, t), "sample": x0}[
        prediction_type
    ]
    with torch.no_grad():
        ref = F.mse_loss(model.model(x_t, t).sample, target)
    torch.testing.assert_close(loss.detach(), ref, atol=1e-5, rtol=1e-4)


def test_at_on_a_diffusers_unet_with_any_output_form():
    diffusers = needs("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    net, x0 = unet(), images()
    obj = ATObjective(schedule=sched, mode="adv")
    outs = [
        obj(m, x0, torch.Generator().manual_seed(1)) for m in (net, lambda x, t: net(x, t, return_dict=False))
    ]
    assert torch.equal(outs[0].loss, outs[1].loss)
    outs[0].loss.backward()
    assert torch.isfinite(outs[0].loss) and outs[0].stats["gain"] > 1
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_fast_path_trains_a_diffusers_unet_like_the_eager_step(tmp_path, capsys, monkeypatch):
    """``fastat train --model diffusers --fast``: the compiled model and the attack's compiled
    detached-parameter copy (one graph each: no graph breaks) train the eager step's weights. Compiled
    with the ``aot_eager`` backend (dynamo's graph capture and AOTAutograd's forward and backward graphs,
    everything but inductor's code generation): inductor compiles this UNet in minutes on a 2-core CPU
    (benchmarks/diffusers_fast_path.py measures that path)."""
    needs("diffusers")
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compile_(m, **{**kw, "backend": "aot_eager"}))
    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for flag in ("--no-fast", "--fast"):
        run = tmp_path / flag.strip("-")
        code, _, err = run_cli(capsys, "train", *IMAGES, "--model", "diffusers", "--set",
                               f"model.kwargs={json.dumps(TINY_UNET)}", "--set", "objective.prediction=v",
                               "--set", "run.eval_n=0", "--steps", "2", flag, "--out", run)  # fmt: skip
        assert code == 0 and "falling back" not in err, err
        runs[flag] = weights(run)
    assert counters["stats"]["unique_graphs"] >= 2
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph per compiled module
    eager, fast = runs["--no-fast"], runs["--fast"]
    assert eager.keys() == fast.keys()
    for k in eager:
        torch.testing.assert_close(fast[k], eager[k], atol=1e-4, rtol=1e-3, msg=k)


# -- denoising-diffusion-pytorch -------------------------------------------------------------------------


def test_ddpm_mode_is_lucidrains_p_losses():
    """With lucidrains' GaussianDiffusion as the schedule (pred_v, sigmoid betas by default) and its
    loss_weight, mode="ddpm" is its p_losses; dm_weight="eps" is the same weighting by name."""
    ddp = needs("denoising_diffusion_pytorch", "denoising-diffusion-pytorch")
    torch.manual_seed(0)
    net = ddp.Unet(dim=8, dim_mults=(1, 2), flash_attn=False)
    diffusion = ddp.GaussianDiffusion(net, image_size=8, timesteps=100)
    x0 = images()
    losses = []
    for weight in (diffusion.loss_weight, "eps"):
        model = Recorder(net)
        obj = ATObjective(schedule=diffusion, mode="ddpm", dm_weight=weight)
        assert obj.prediction == "v"
        losses.append(obj(model, x0, torch.Generator().manual_seed(4)).loss)
        ((x_t, t),) = model.calls
        noise = (x_t - diffusion.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1) * x0) / (
            diffusion.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
        )
        with torch.no_grad():
            ref = diffusion.p_losses(x0, t, noise=noise)
        torch.testing.assert_close(losses[-1].detach(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-5)


# -- the trainer and the export ---------------------------------------------------------------------------


def test_train_with_model_diffusers_then_export_a_pipeline(tmp_path, capsys):
    diffusers = needs("diffusers")
    cfg = tmp_path / "unet.json"
    cfg.write_text(json.dumps({"_class_name": "UNet2DModel", **TINY_UNET, "block_out_channels": [8, 8]}))
    run = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "train",
        *IMAGES,
        "--model",
        "diffusers",
        "--set",
        "model.kwargs={}",
        "--set",
        f"model.kwargs.config={cfg}",
        "--set",
        "model.kwargs.block_out_channels=[8, 16]",
        "--set",
        "objective.prediction=v",
        "--set",
        "objective.schedule=scaled_linear",
        "--steps",
        "2",
        "--out",
        run,
    )
    assert code == 0, err
    saved = (run / "config.yaml").read_text()
    assert "DownBlock2D" in saved and "config:" not in saved  # the config file is inlined: self-contained
    out = tmp_path / "pipe"
    code, stdout, err = run_cli(capsys, "export", "--run", run, out)
    assert code == 0 and stdout.strip() == str(out), err
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    unet_ = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet")
    assert tuple(unet_.config.block_out_channels) == (8, 16) and unet_.config.sample_size == 8
    # the EMA weights, the run's schedule and prediction type
    ema = weights(run, "ema")
    for k, v in unet_.state_dict().items():
        assert torch.equal(v, ema[f"unet.{k}"]), k
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.clip_sample
    torch.testing.assert_close(
        pipe.scheduler.alphas_cumprod.double(),
        NoiseSchedule("scaled_linear").alphas_cumprod,
        atol=5e-7,
        rtol=0,
    )
    x = pipe(
        batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert x.shape == (2, 8, 8, 3) and 0 <= x.min() <= x.max() <= 1
    # fastat's own sampling of the same run reads the v-prediction
    code, _, err = run_cli(
        capsys, "sample", "--run", run, "--n", "2", "--steps", "2", "--out", tmp_path / "s.npy"
    )
    assert code == 0, err
    # an existing OUT is left alone; --overwrite replaces it
    before = snapshot(out)
    code, _, err = run_cli(capsys, "export", "--run", run, out)
    assert_one_line_error(code, err, "already exists")
    assert snapshot(out) == before
    code, _, err = run_cli(capsys, "export", "--run", run, out, "--overwrite", "--no-ema")
    assert code == 0, err
    raw = weights(run, "model")
    loaded = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet").state_dict()
    assert all(torch.equal(v, raw[f"unet.{k}"]) for k, v in loaded.items())
    assert not any(p.name.startswith((".tmp", ".trash")) for p in Path(tmp_path).iterdir())


def test_model_diffusers_errors_are_one_line(tmp_path, capsys, monkeypatch):
    needs("diffusers")  # without it, the install hint comes first (checked last, below)
    import fastat.models.diffusers_unet as du

    code, _, err = run_cli(capsys, "train", "--dataset", "gmm2d", "--model", "diffusers", "--dry-run")
    assert_one_line_error(code, err, "for images")
    code, _, err = run_cli(
        capsys, "train", "--model", "diffusers", "--set", "model.kwargs.config=/nonexistent.json", "--dry-run"
    )
    assert_one_line_error(code, err, "/nonexistent.json")
    code, _, err = run_cli(
        capsys, "train", "--model", "diffusers", "--set", "model.kwargs.in_channels=1", "--dry-run"
    )
    assert_one_line_error(code, err, "in_channels=1", "3 channels")
    monkeypatch.setattr(du, "diffusers_available", lambda: False)  # as where diffusers is not installed
    code, _, err = run_cli(capsys, "train", "--model", "diffusers", "--dry-run")
    assert_one_line_error(code, err, "pip install 'fastat[diffusers]'")
