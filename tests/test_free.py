"""``--mode free`` (minibatch replay, the ascent from the training backward), ``reg_frac``, ``lam_s_min``
and the FLOP accounting, against float64 references of their definitions."""

import copy

import pytest
import torch
from test_objective import SCHED, Net, data

from fastat.at import ops
from fastat.at.budget import Budget
from fastat.at.objective import ATObjective
from fastat.at.replay import Replay
from fastat.models import MLP
from fastat.step.engine import StepEngine


class Recorder(torch.nn.Module):
    """Records every call's input, timesteps and output (to rebuild the loss from what the model saw)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t):
        out = self.net(x, t)
        self.calls.append((x.detach().clone(), t.clone(), out.detach().clone()))
        return out


def reference_loss(net64, x_t, t, eps, w, lam, s=None, lam_s_min=0.0, n=None):
    """float64: mean_B ||p - eps||^2 + mean_n lam_t ||q - p - w||^2 (the first n samples regularised) and
    the gradient of the loss w.r.t. the perturbed input ``x_t[:n] + s w``."""
    n = n or x_t.shape[0]
    s = s.double()
    p = net64(x_t.double(), t)
    x_adv = (x_t[:n].double() + s[:n, None] * w.double()).requires_grad_(True)
    q = net64(x_adv, t[:n])
    lam_t = lam * (s[:n] >= lam_s_min).double()[:, None]
    loss = ((p - eps.double()) ** 2).mean() + (lam_t * (q - p[:n] - w.double()) ** 2).mean()
    (g,) = torch.autograd.grad(loss, [x_adv], retain_graph=True)
    return loss, g


def test_free_replays_ascend_from_the_training_backward():
    """Three replays of a batch (an optimizer step between them), then a new batch: the loss of each
    replay is L_AT at the kept x_t with w_k, and w_{k+1} = clamp(w_k + 1.25 r sign(dL/dx~), -r, r) with
    the gradient of replay k's own loss; two model calls per step (no attack passes)."""
    torch.manual_seed(0)
    net = Recorder(Net())
    budget = Budget(r_min=0.1, r_scale=0.2)
    obj = ATObjective(schedule=SCHED, mode="free", replays=3, lam=0.5, budget=budget)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x, gen = data(16), torch.Generator().manual_seed(3)
    w = t0 = None
    for k in range(4):
        net.calls.clear()
        net64 = copy.deepcopy(net.net).double()
        out = obj(net, x if k in (0, 3) else None, gen)
        assert len(net.calls) == 2  # the clean and the perturbed pass, nothing else
        t = obj.state_dict()["replay"]["t"]
        a, s = SCHED.coeffs(t)
        r = budget.radius(s)
        x_t, _, eps, w0 = ops.noise_inject(x, a, s, r, obj.state_dict()["replay"]["seed"])
        torch.testing.assert_close(net.calls[0][0], x_t, rtol=0, atol=0)  # x_t is kept across replays
        if k % 3 == 0:
            w = w0  # a new batch: the random start
            assert t0 is None or not torch.equal(t, t0)
            t0 = t
            assert float(out.stats["gain"]) == 1.0
        else:
            assert torch.equal(t, t0)
            assert float(out.stats["gain"]) != 1.0
        loss_ref, g = reference_loss(net64, x_t, t, eps, w, 0.5, s)
        torch.testing.assert_close(out.loss.double(), loss_ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.stats["w_abs"], w.abs().mean(), rtol=1e-6, atol=0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        w_ref = torch.clamp(
            w.double() + 1.25 * r.double()[:, None] * g.sign(), -r.double()[:, None], r[:, None]
        )
        sure = g.abs() > 1e-6 * g.abs().max()  # signs of float32 and float64 agree away from zero
        assert sure.float().mean() > 0.9
        w = obj.state_dict()["replay"]["w"]
        torch.testing.assert_close(w.double()[sure], w_ref[sure], rtol=1e-6, atol=1e-7)
        assert (w.abs() <= r[:, None] * (1 + 1e-6)).all()


def test_free_without_backward_keeps_w_and_a_non_finite_gradient_counts_as_zero():
    torch.manual_seed(0)
    net = Net()
    obj = ATObjective(schedule=SCHED, mode="free", replays=2, budget=Budget(norm="l2"))
    x, gen = data(8), torch.Generator().manual_seed(1)
    obj(net, x, gen)  # no backward: the next replay keeps w_0
    w0 = obj.state_dict()["replay"]["w"]
    out = obj(net, None, gen)
    assert torch.equal(obj.state_dict()["replay"]["w"], w0) and float(out.stats["gain"]) == 1.0
    out = obj(net, x, gen)  # fresh; a NaN gradient must not make w NaN
    (out.loss * float("nan")).backward()
    assert torch.isfinite(obj.state_dict()["replay"]["w"]).all()


def test_replay_state_round_trips_and_refuses_nonsense():
    rep = Replay(3)
    x = torch.randn(4, 2)
    fresh = rep.begin(x)
    kept = rep.keep("x0", fresh, x)
    assert torch.equal(kept, x) and bool(fresh)
    rep.end()
    state = rep.state_dict()
    assert int(state["k"]) == 1 and torch.equal(state["x0"], x)
    other = Replay(3)
    other.load_state_dict(state)
    assert other.position == 1 and not bool(other.begin(None))
    assert torch.equal(other.keep("x0", other.begin(None), torch.zeros(4, 2)), x)  # a replay keeps x0
    short = Replay(1)
    short.load_state_dict(state)  # saved with m = 3 at position 1: under m = 1 it starts a batch
    assert short.position == 0
    with pytest.raises(ValueError, match="replays must be an integer >= 1"):
        Replay(0)
    with pytest.raises(ValueError, match="no batch was given yet"):
        Replay(2).begin(None)
    with pytest.raises(ValueError, match="None replays, in mode free only"):
        ATObjective(mode="adv")(Net(), None)


@pytest.mark.parametrize("mode", ["rand", "adv", "free"])
def test_reg_frac_regularises_the_first_ceil_f_b_samples(mode):
    """B = 10, reg_frac 0.25: the attack and the perturbed pass see 3 samples; the loss is the DDPM term
    over all 10 plus lam times the regulariser's mean over those 3 (float64 reference from the calls)."""
    torch.manual_seed(0)
    net = Recorder(Net())
    obj = ATObjective(schedule=SCHED, mode=mode, reg_frac=0.25, lam=0.7, lam_s_min=0.3)
    x = data(10)
    out = obj(net, x, torch.Generator().manual_seed(2))
    sizes = [c[0].shape[0] for c in net.calls]
    assert sizes == {"rand": [10, 3], "adv": [10, 3, 3], "free": [10, 3]}[mode]
    (x_t, t, p), (x_adv, _, q) = net.calls[0], net.calls[-1]
    a, s = SCHED.coeffs(t)
    eps = (x_t.double() - a.double()[:, None] * x.double()) / s.double()[:, None]
    w = (x_adv.double() - x_t[:3].double()) / s.double()[:3, None]
    assert (s < 0.3).any() and (s >= 0.3).any()  # lam_s_min switches the regulariser off somewhere
    lam_t = 0.7 * (s[:3] >= 0.3).double()[:, None]
    ref = ((p.double() - eps) ** 2).mean() + (lam_t * (q.double() - p[:3].double() - w) ** 2).mean()
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        out.stats["loss_dm"].double(), ((p.double() - eps) ** 2).mean(), rtol=1e-5, atol=0
    )
    out.loss.backward()
    assert all(prm.grad is not None and torch.isfinite(prm.grad).all() for prm in net.parameters())


def test_flop_units_of_every_mode():
    assert ATObjective(mode="ddpm", reg_frac=0.5).flop_units() == 3
    assert ATObjective(mode="adv").flop_units() == 8 and ATObjective(mode="inv").flop_units() == 8
    assert (
        ATObjective(mode="pgd", pgd_steps=3).flop_units() == 12 and ATObjective(mode="rand").flop_units() == 6
    )
    assert ATObjective(mode="free", replays=4).flop_units() == 6  # per replay: no attack passes
    assert ATObjective(mode="adv", reg_frac=0.25).flop_units() == 3 + 5 * 0.25
    assert ATObjective(mode="free", reg_frac=0.5).flop_units() == 4.5
    assert ATObjective(mode="adv", reg_frac=0.25).flop_units(10) == 3 + 5 * 3 / 10  # ceil(2.5) = 3
    assert ATObjective(mode="adv", reg_frac=0.1).reg_count(30) == 3  # not 4 (0.1 * 30 > 3 in floats)
    for bad in ({"reg_frac": 0.0}, {"reg_frac": 1.5}, {"lam_s_min": 1.0}, {"replays": 0}):
        with pytest.raises(ValueError):
            ATObjective(mode="free", **bad)


def make_engine(mode="free", **kw):
    torch.manual_seed(0)
    model = MLP(3, hidden=32, depth=2, time_dim=16)
    obj = ATObjective(schedule=SCHED, mode=mode, replays=3, budget=Budget(r_min=0.1, r_scale=0.2), **kw)
    return StepEngine(model, obj, generator=torch.Generator().manual_seed(1), lr=1e-3, ema_decay=0.9)


def test_engine_replays_the_kept_batch_and_says_when_it_wants_one():
    xs = [torch.randn(16, 3, generator=torch.Generator().manual_seed(i)) for i in range(7)]
    given, none = make_engine(), make_engine()
    wants = []
    for i, x in enumerate(xs):
        wants.append(none.wants_batch)
        a = given.step(xs[i - i % 3], 1e-3)  # the batch again on its replays
        b = none.step(x if none.wants_batch else None, 1e-3)
        assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["gain"], b["gain"])
    assert wants == [True, False, False, True, False, False, True]
    for p, q in zip(given.model.parameters(), none.model.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="starts a new batch"):
        make_engine().step(None, 1e-3)
    state = none.objective_state_dict()
    fresh = make_engine()
    fresh.model.load_state_dict(none.model.state_dict())
    fresh.generator.set_state(none.generator.get_state())
    fresh.load_objective_state(state)  # 7 steps: position 1, a replay
    assert not fresh.wants_batch and torch.equal(
        fresh.step(None, 1e-3)["loss"], none.step(None, 1e-3)["loss"]
    )


def test_objective_says_when_it_wants_a_batch_and_follows_a_graph_replay():
    """What the engine asks: ``wants_batch`` by the host's count of ``step_done`` calls (no device read),
    ``steps_per_batch``, and ``host_state`` handed back after a replay, which makes the captured shape's
    replay set current again (what a checkpoint then saves)."""
    adv = ATObjective(schedule=SCHED, mode="adv")
    adv.step_done()
    assert adv.wants_batch() and adv.steps_per_batch == 1
    assert adv.host_state() is None and adv.state_dict() == {}
    obj, net = ATObjective(schedule=SCHED, mode="free", replays=3), Net()
    x, gen = data(8), torch.Generator().manual_seed(0)
    wants = []
    for _ in range(7):
        wants.append(obj.wants_batch())
        obj(net, x if wants[-1] else None, gen)
        obj.step_done()
    assert wants == [True, False, False, True, False, False, True] and obj.steps_per_batch == 3
    captured = obj.host_state()
    obj(net, x[:5], gen)  # a batch of another shape (run uncaptured): its own replay set
    assert obj.state_dict()["replay"]["x0"].shape == (5, 3)
    obj.step_done(replayed=captured)  # a graph replay of the 8-sample step runs no Python
    assert obj.state_dict()["replay"]["x0"].shape == (8, 3) and not obj.wants_batch()
    with pytest.raises(KeyError, match="no replay state"):
        obj.step_done(replayed=((3, 3), torch.float32, torch.device("cpu")))


def test_engine_takes_an_objective_without_the_hooks():
    """Any callable objective: a new batch every step, one step per batch, nothing to checkpoint."""
    inner = ATObjective(schedule=SCHED, mode="adv", budget=Budget(r_min=0.1, r_scale=0.2))
    eng = StepEngine(MLP(3, hidden=8, depth=1, time_dim=8), lambda *a, **k: inner(*a, **k),
                     generator=torch.Generator().manual_seed(0), lr=1e-3)  # fmt: skip
    for _ in range(2):
        assert eng.wants_batch and eng.steps_per_batch == 1
        assert torch.isfinite(eng.step(torch.randn(4, 3), 1e-3)["loss"])
    assert eng.objective_state_dict() == {}
