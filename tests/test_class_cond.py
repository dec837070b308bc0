"""Class-conditional training with classifier-free guidance: the class embedding (null label -1), the
objective's label dropout and labels on every model call, guided sampling, and a 2-class toy set whose
conditional samples land in their own component."""

from __future__ import annotations

import pytest
import torch

from fastat.at.objective import ATObjective
from fastat.at.sampling import Guided
from fastat.at.schedule import NoiseSchedule
from fastat.data import GMM2D, Labelled, TensorLoader
from fastat.models import build_model
from fastat.step.engine import StepEngine
from fastat.train.samples import generate


def test_class_embedding_null_label_and_unconditional_call():
    torch.manual_seed(0)
    for model in (build_model("mlp", dim=2, hidden=16, depth=1, time_dim=8, num_classes=3),
                  build_model("tiny", image_size=8, num_classes=3)):  # fmt: skip
        x = torch.randn(4, *model.sample_shape)
        t = torch.tensor([1, 5, 9, 20])
        null = torch.full((4,), 3)
        assert torch.equal(model(x, t, torch.full((4,), -1)), model(x, t, null))  # -1: the null label
        assert torch.equal(model(x, t), model(x, t, null))  # no labels: unconditional
        assert not torch.allclose(model(x, t, torch.tensor([0, 1, 2, 0])), model(x, t, null))
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        build_model("mlp", dim=2, num_classes=-2)


def test_guided_is_the_cfg_combination():
    torch.manual_seed(0)
    model = build_model("mlp", dim=2, hidden=16, depth=1, time_dim=8, num_classes=2).eval()
    x, t = torch.randn(5, 2), torch.full((5,), 7)
    cond, uncond = model(x, t, torch.ones(5, dtype=torch.long)), model(x, t, torch.full((5,), -1))
    torch.testing.assert_close(Guided(model, 1, 3.0)(x, 7), uncond + 3.0 * (cond - uncond))
    torch.testing.assert_close(Guided(model, 1, 1.0)(x, t), cond, rtol=0, atol=0)
    torch.testing.assert_close(Guided(model, 1, 0.0)(x, t), uncond, rtol=0, atol=0)


class Recorder(torch.nn.Module):
    """An eps-model that records the labels of every call (clean, attack, perturbed)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.calls: list[tuple[int, torch.Tensor]] = []

    def forward(self, x, t, y=None):
        self.calls.append((x.shape[0], y.clone()))
        return self.lin(x) * (1 + y.float().view(-1, 1))


@pytest.mark.parametrize("mode,opts", [("adv", {}), ("pgd", {"pgd_steps": 2, "reg_frac": 0.5})])
def test_every_model_call_gets_its_samples_labels_with_dropout(mode, opts):
    model = Recorder()
    obj = ATObjective(schedule=NoiseSchedule(T=50), mode=mode, p_uncond=0.3, **opts)
    y = torch.arange(64) % 5
    obj(model, torch.randn(64, 2), torch.Generator().manual_seed(0), y=y)
    (B, y_clean), *rest = model.calls
    assert B == 64 and len(rest) == (2 if mode == "adv" else 3)
    dropped = y_clean == -1
    assert torch.equal(y_clean[~dropped], y[~dropped]) and 0.15 < dropped.float().mean() < 0.45
    for n, y_call in rest:  # the attack and the perturbed pass: the labels of the same samples
        assert torch.equal(y_call, y_clean[:n])


def test_free_replays_keep_the_labels_of_their_batch():
    """free: every call of a batch's replays gets the labels its fresh step drew (after dropout); the
    next batch draws its own."""
    model = Recorder()
    obj = ATObjective(schedule=NoiseSchedule(T=50), mode="free", replays=3, p_uncond=0.3)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 5
    seen = []
    for x0, labels in ((torch.randn(64, 2), y), (None, None), (None, None), (torch.randn(64, 2), y.flip(0))):
        model.calls.clear()
        obj(model, x0, g, y=labels)
        obj.step_done()
        (B, y_clean), *rest = model.calls
        assert B == 64 and all(torch.equal(y_call, y_clean[:n]) for n, y_call in rest)
        seen.append(y_clean)
    assert torch.equal(seen[1], seen[0]) and torch.equal(seen[2], seen[0])
    assert torch.equal(seen[0][seen[0] >= 0], y[seen[0] >= 0]) and (seen[0] == -1).any()
    assert torch.equal(seen[3][seen[3] >= 0], y.flip(0)[seen[3] >= 0])


def test_two_class_toy_set_conditional_samples_land_in_their_component():
    """gmm2d with 2 components (labels: the component), a small MLP, 400 AT steps on the CPU; samples of
    class k with guidance 2 land at component k, the unconditional ones at both."""
    torch.manual_seed(0)
    known = GMM2D(n_modes=2, radius=2.0, std=0.1)
    data = known.sample(512, torch.Generator().manual_seed(1)).float()
    labels = known.nearest_mode(data)
    loader = TensorLoader(data, 64, generator_seed=0, labels=labels)
    assert isinstance(loader.next_batch(), Labelled)
    model = build_model("mlp", dim=2, hidden=64, depth=2, time_dim=16, num_classes=2)
    obj = ATObjective(schedule=NoiseSchedule(T=100), mode="adv")
    engine = StepEngine(model.train(), obj, generator=torch.Generator().manual_seed(2), lr=3e-3,
                        ema_decay=0.99)  # fmt: skip
    for _ in range(400):
        engine.step(loader.next_batch(), 3e-3)
    noise = torch.randn(200, 2, generator=torch.Generator().manual_seed(3))
    ema = engine.ema.module
    for k in (0, 1):
        x = generate(ema, obj.schedule, noise, steps=20, labels=torch.full((200,), k), guidance=2.0)
        assert (known.nearest_mode(x) == k).float().mean() > 0.95, k
    x = generate(ema, obj.schedule, noise, steps=20, labels=torch.zeros(200, dtype=torch.long), guidance=0.0)
    share = (known.nearest_mode(x) == 0).float().mean()
    assert 0.2 < share < 0.8  # unconditional: both components


def test_cli_class_cond_trains_and_samples_a_class(tmp_path, capsys, finished_run):
    import numpy as np
    from train_helpers import IMAGES, POINTS, assert_one_line_error, run_cli

    from fastat.train.checkpoint import load_checkpoint

    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *POINTS, "--class-cond", "--steps", "4", "--sample-every", "2",
                           "--set", "run.guidance=2", "--out", run)  # fmt: skip
    assert code == 0, err
    ckpt = load_checkpoint(run)
    assert ckpt.state["model"]["kwargs"]["num_classes"] == 8  # gmm2d's components, from the data
    assert ckpt.state["config"]["objective"]["p_uncond"] == 0.1
    for label in ("3", "all"):
        out = tmp_path / f"class-{label}.npy"
        code, _, err = run_cli(capsys, "sample", "--run", run, "--class", label, "--guidance", "2",
                               "--n", "8", "--steps", "4", "--out", out)  # fmt: skip
        assert code == 0 and np.load(out).shape == (8, 2), err
    code, _, err = run_cli(capsys, "sample", "--run", run, "--class", "8", "--out", tmp_path / "x.npy")
    assert_one_line_error(code, err, "--class must be 0..7 or all")
    code, _, err = run_cli(
        capsys, "sample", "--run", finished_run, "--class", "1", "--out", tmp_path / "y.npy"
    )
    assert_one_line_error(code, err, "is not class-conditional")
    code, _, err = run_cli(capsys, "train", *IMAGES, "--class-cond", "--dry-run")
    assert_one_line_error(code, err, "dataset 'subspace' has no class labels")
    code, _, err = run_cli(capsys, "train", *POINTS, "--class-cond", "--mode", "free", "--steps", "4",
                           "--set", "run.eval_n=0", "--out", tmp_path / "free")  # fmt: skip
    assert code == 0, err


def test_diffusers_unet_class_embedding_survives_save_and_load(tmp_path):
    """A class-conditional UNet2DModel (num_class_embeds = classes + 1, the last the null label): fastat's
    labels (-1: null) reach its class embedding, and ``UNet2DModel.from_pretrained`` of the saved model
    gives the same predictions with ``class_labels``."""
    diffusers = pytest.importorskip("diffusers", reason="the test extra installs diffusers")
    from fastat.models.diffusers_unet import TINY_CONFIG

    torch.manual_seed(0)
    model = build_model("diffusers", **TINY_CONFIG, sample_size=8, num_class_embeds=4).eval()
    assert model.num_classes == 3
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([3, 50, 700]), torch.tensor([0, 2, -1])
    out = model(x, t, y)
    assert torch.equal(model(x, t), model(x, t, torch.full((3,), -1)))
    assert not torch.allclose(out, model(x, t))
    model.unet.save_pretrained(tmp_path / "unet")
    loaded = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet").eval()
    torch.testing.assert_close(loaded(x, t, class_labels=torch.tensor([0, 2, 3])).sample, out)


def test_multimodal_image_sets_label_their_components(tmp_path, capsys):
    """subspaces / scales: the component of each sample is its label (as gmm2d's modes); a class-conditional
    run on them, with gradient accumulation, trains a 3-class UNet and samples a class."""
    import numpy as np
    from train_helpers import IMAGES, run_cli

    from fastat.data import build_dataset, known_dataset
    from fastat.train.checkpoint import load_checkpoint

    for name in ("subspaces", "scales"):
        td = build_dataset(name, n=64, image_size=8, seed=0, progress=False)
        assert td.num_classes == 3 == known_dataset(name).num_classes
        assert torch.equal(td.labels, td.known.component(td.clean))
        assert set(td.labels.tolist()) == {0, 1, 2}
    run = tmp_path / "run"
    args = [a if a != "subspace" else "subspaces" for a in IMAGES]
    code, _, err = run_cli(capsys, "train", *args, "--class-cond", "--grad-accum", "2", "--steps", "2",
                           "--out", run)  # fmt: skip
    assert code == 0, err
    assert load_checkpoint(run).state["model"]["kwargs"]["num_classes"] == 3
    out = tmp_path / "class2.npy"
    code, _, err = run_cli(capsys, "sample", "--run", run, "--class", "2", "--n", "4", "--steps", "2",
                           "--out", out)  # fmt: skip
    assert code == 0 and np.load(out).shape == (4, 3, 8, 8), err


@pytest.mark.parametrize("mode,opts", [("adv", {}), ("pgd", {"pgd_steps": 2, "reg_frac": 0.5})])
def test_micro_batches_with_labels_equal_the_whole_batch(mode, opts):
    """Gradient accumulation keeps each sample's label (dropped once, at the batch's draw): the K losses
    and gradients add up to the whole batch's."""
    torch.manual_seed(0)
    model = build_model("mlp", dim=2, hidden=16, depth=1, time_dim=8, num_classes=4)
    x0, y = torch.randn(16, 2), torch.arange(16) % 4

    def run(K):
        obj = ATObjective(schedule=NoiseSchedule(T=50), mode=mode, p_uncond=0.3, **opts)
        g = torch.Generator().manual_seed(1)
        model.zero_grad()
        total = 0.0
        for k in range(K):
            out = obj(model, x0, g, y=y, **({"micro": (k, K)} if K > 1 else {}))
            out.loss.backward()
            total = total + out.loss.detach()
        return total, [p.grad.clone() for p in model.parameters()], out.stats

    loss1, grads1, stats1 = run(1)
    loss4, grads4, stats4 = run(4)
    torch.testing.assert_close(loss4, loss1)
    for a, b in zip(grads4, grads1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert stats4.keys() == stats1.keys()
    for key in stats1:
        torch.testing.assert_close(stats4[key], stats1[key], rtol=1e-5, atol=1e-6)
