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
    with pytest.raises(ValueError, match="does not support mode free"):
        ATObjective(mode="free")(model, torch.randn(4, 2), y=y[:4])


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
