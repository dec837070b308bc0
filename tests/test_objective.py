"""ATObjective and the attack: equivariance, ascent, determinism, nothing left behind in the model."""

import pytest
import torch
from torch import nn

from fastat.at.attack import pgd_attack
from fastat.at.budget import Budget
from fastat.at.objective import MODES, ATObjective
from fastat.at.schedule import NoiseSchedule

SCHED = NoiseSchedule(T=100)


class Net(nn.Module):
    """A small eps-model for points, with a batch-norm layer and dropout to catch leaked state."""

    def __init__(self, dim=3, hidden=64, bn=False, dropout=0.0):
        super().__init__()
        self.inp = nn.Linear(dim + 1, hidden)
        self.bn = nn.BatchNorm1d(hidden) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x, t):
        h = self.inp(torch.cat([x, t.float()[:, None] / 100], dim=1))
        return self.out(self.drop(torch.tanh(self.bn(h))))


class Equivariant(nn.Module):
    """eps(x, t) = (x - a_t c) / s_t: the exact eps-predictor of the point mass at c. Moving x_t by
    s_t*w moves the prediction by exactly w, so the equivariance regulariser is 0 for every w."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, t):
        a, s = SCHED.coeffs(t)
        return (x - a[:, None] * self.c) / s[:, None]


class Invariant(nn.Module):
    """A prediction that ignores its input: perfectly invariant, maximally non-equivariant."""

    def forward(self, x, t):
        return torch.ones_like(x) * 0.5


def data(n=32, dim=3, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_equivariant_model_has_zero_regulariser_invariant_does_not():
    budget = Budget(r_min=0.05, r_scale=0.2, space="eps")
    obj = ATObjective(schedule=SCHED, mode="rand", lam=1.0, budget=budget)
    eq = obj(Equivariant(torch.tensor([0.3, -0.2, 0.1])), data(), torch.Generator().manual_seed(0))
    inv = obj(Invariant(), data(), torch.Generator().manual_seed(0))
    assert abs(eq.stats["reg"].item()) < 1e-6
    assert inv.stats["reg"].item() > 1e-3
    # the invariance ablation judges them the other way round
    abl = ATObjective(schedule=SCHED, mode="inv", lam=1.0, budget=budget)
    assert abl(Invariant(), data(), torch.Generator().manual_seed(0)).stats["reg"].item() == 0.0
    assert abl(Equivariant(torch.zeros(3) + 0.3), data(), torch.Generator().manual_seed(0)).stats["reg"] > 1e-3


@pytest.mark.parametrize(
    "mode,target,norm",
    [("adv", "prediction", "linf"), ("pgd", "prediction", "linf"), ("pgd", "equivariance", "linf"),
     ("pgd", "prediction", "l2"), ("pgd", "equivariance", "l2")],
)  # fmt: skip
def test_ascent_increases_the_attack_objective(mode, target, norm):
    torch.manual_seed(0)
    net = Net()
    budget = Budget(r_min=0.1, r_scale=0.3, norm=norm)
    obj = ATObjective(schedule=SCHED, mode=mode, budget=budget, attack_target=target)
    gains = [obj(net, data(seed=i), torch.Generator().manual_seed(i)).stats["gain"].item() for i in range(5)]
    assert min(gains) > 1.0, gains


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack_stays_in_budget_and_leaves_no_gradients_or_norm_state(norm):
    torch.manual_seed(0)
    net = Net(bn=True, dropout=0.1).train()
    x, t = data(16), torch.randint(0, 100, (16,))
    a, s = SCHED.coeffs(t)
    budget = Budget(norm=norm)
    r = budget.radius(s, 3)
    w0 = budget.random_start(r, (16, 3), torch.Generator().manual_seed(0))
    clean = net(x, t).detach()  # the training forward: the only one allowed to move the statistics
    running = net.bn.running_mean.clone(), net.bn.running_var.clone(), net.bn.num_batches_tracked.clone()
    w, x_adv, j0 = pgd_attack(net, x, t, s, clean, w0, r, 0.5 * r, 3, norm)
    torch.testing.assert_close(x_adv, x + s[:, None] * w)  # the next input comes with w
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(net.bn.running_mean, running[0]) and torch.equal(net.bn.running_var, running[1])
    assert torch.equal(net.bn.num_batches_tracked, running[2])
    assert net.training and not w.requires_grad and j0.shape == (16,)
    if norm == "linf":
        assert (w.abs() <= r[:, None]).all()
    else:
        assert (w.norm(dim=1) <= r * (1 + 1e-6)).all()


@pytest.mark.parametrize("mode", MODES)
def test_objective_is_deterministic_and_keeps_model_mode(mode):
    torch.manual_seed(0)
    net = Net().eval()
    obj = ATObjective(schedule=SCHED, mode=mode)
    outs = [obj(net, data(), torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(outs[0].loss, outs[1].loss)
    assert not net.training
    outs[0].loss.backward()  # differentiable w.r.t. the parameters
    assert all(p.grad is not None for p in net.parameters())
    # statistics are detached 0-dim tensors
    assert all(v.dim() == 0 and not v.requires_grad for v in outs[0].stats.values())


def test_lam_zero_gives_the_ddpm_loss():
    net = Net()
    out = ATObjective(schedule=SCHED, mode="adv", lam=0.0)(net, data(), torch.Generator().manual_seed(3))
    assert torch.equal(out.loss.detach(), out.stats["loss_dm"])


def test_lam_scale_radius_normalises_per_sample():
    obj = ATObjective(schedule=SCHED, lam=0.5, lam_scale="radius", budget=Budget(norm="l2"))
    r = torch.tensor([1.0, 2.0]) * 3.0  # l2 radius over 9 elements -> per-element 1, 2
    torch.testing.assert_close(obj.lam_per_sample(r, 9), torch.tensor([0.5, 0.125]))


def test_bad_objective_arguments():
    with pytest.raises(ValueError, match="unknown mode"):
        ATObjective(mode="fgsm")
    with pytest.raises(ValueError, match="lam"):
        ATObjective(lam=-1.0)
    with pytest.raises(ValueError, match="pgd_steps"):
        ATObjective(pgd_steps=0)
    with pytest.raises(ValueError, match="attack target"):
        ATObjective(attack_target="loss")
    with pytest.raises(ValueError, match="x0"):
        ATObjective()(Net(), torch.randn(4), None)


@pytest.mark.parametrize("target", ["prediction", "equivariance"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack_step_equals_ascent_on_w_by_autograd(target, norm):
    """The attack differentiates w.r.t. the model input; its step must equal one taken with dJ/dw."""
    from fastat.at import ops
    from fastat.at.attack import attack_objective

    torch.manual_seed(1)
    net = Net()
    x, t = data(8), torch.randint(0, 100, (8,))
    _, s = SCHED.coeffs(t)
    r = torch.full((8,), 0.4 if norm == "linf" else 0.7)
    w0 = Budget(norm=norm).random_start(r, (8, 3), torch.Generator().manual_seed(2))
    clean = net(x, t).detach()
    w, _, _ = pgd_attack(net, x, t, s, clean, w0, r, 0.3 * r, 1, norm, target)
    w_leaf = w0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(attack_objective(net(x + s[:, None] * w_leaf, t), clean, w_leaf, target).sum(), [w_leaf])
    torch.testing.assert_close(w, ops.pgd_step(w0, g, r, 0.3 * r, norm), atol=1e-6, rtol=1e-5)
