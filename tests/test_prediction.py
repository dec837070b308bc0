"""Prediction types (eps | v | x0) and model outputs (tensor | tuple | .sample): the conversions, the
objective against a float64 reference and against the eps-model, and the samplers."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastat.at import prediction as P
from fastat.at.budget import Budget
from fastat.at.objective import ATObjective
from fastat.at.sampling import ddim_sample, ddpm_sample
from fastat.at.schedule import NoiseSchedule

SCHED = NoiseSchedule(T=100)


def bs(c, like):
    return c.reshape(-1, *([1] * (like.dim() - 1)))


# Written out here in float64, independently of fastat.at.prediction.
def eps_hat64(pred, o, x, a, s):
    a, s = bs(a, o), bs(s, o)
    return {"eps": o, "v": a * o + s * x, "x0": (x - a * o) / s}[pred]


def target64(pred, x0, eps, a, s):
    a, s = bs(a, x0), bs(s, x0)
    return {"eps": eps, "v": a * eps - s * x0, "x0": x0}[pred]


class Net(nn.Module):
    """A small eps-model for points."""

    def __init__(self, dim=3, hidden=32):
        super().__init__()
        self.inp, self.out = nn.Linear(dim + 1, hidden), nn.Linear(hidden, dim)

    def forward(self, x, t):
        return self.out(torch.tanh(self.inp(torch.cat([x, t.to(x.dtype)[:, None] / 100], dim=1))))


class Reparam(nn.Module):
    """The same network seen through another parameterisation: its implied eps is ``net``'s output. The
    output comes back as ``wrap`` says (tensor, tuple, or an object with ``.sample``), and every call's
    input is recorded."""

    def __init__(self, net, pred, wrap="tensor"):
        super().__init__()
        self.net, self.pred, self.wrap, self.calls = net, pred, wrap, []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.clone()))
        f = self.net(x, t)
        a, s = (bs(c.to(x.dtype), x) for c in SCHED.coeffs(t, dtype=torch.float64))
        o = {"eps": f, "v": (f - s * x) / a, "x0": (x - s * f) / a}[self.pred]
        return {"tensor": o, "tuple": (o,), "sample": SimpleNamespace(sample=o)}[self.wrap]


def data(n=24, dim=3, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ conversions


@pytest.mark.parametrize("pred", P.PREDICTIONS)
def test_conversions_invert_the_forward_process(pred):
    x0, eps = data(seed=1).double(), data(seed=2).double()
    t = torch.randint(0, 100, (24,), generator=torch.Generator().manual_seed(3))
    a, s = SCHED.coeffs(t, dtype=torch.float64)
    x_t = bs(a, x0) * x0 + bs(s, x0) * eps
    o = P.target(pred, x0.float(), eps.float(), a.float(), s.float()).double()  # a perfect model's output
    torch.testing.assert_close(o, target64(pred, x0, eps, a, s), atol=1e-6, rtol=1e-6)
    o = target64(pred, x0, eps, a, s)
    torch.testing.assert_close(P.to_eps(pred, o, x_t, a, s), eps, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(P.to_x0(pred, o, x_t, a, s), x0, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("pred", P.PREDICTIONS)
@pytest.mark.parametrize("equivariant", [True, False])
def test_regulariser_coeffs_rewrite_the_eps_space_residual(pred, equivariant):
    """lam ||eps_hat(o~, x~) - eps_hat(o, x) - [w]||^2 == lam * factor * ||o~ - o - c_w w||^2, any o, o~."""
    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, 100, (16,), generator=g)
    a, s = SCHED.coeffs(t, dtype=torch.float64)
    x, w, o, o_adv = (torch.randn(16, 5, generator=g, dtype=torch.float64) for _ in range(4))
    x_adv = x + bs(s, x) * w
    lhs = eps_hat64(pred, o_adv, x_adv, a, s) - eps_hat64(pred, o, x, a, s) - (w if equivariant else 0)
    c_w, factor = P.regulariser_coeffs(pred, a, s, equivariant)
    rhs = o_adv - o - bs(torch.as_tensor(c_w, dtype=torch.float64), w) * w
    torch.testing.assert_close(
        (lhs**2).sum(1), bs(torch.as_tensor(factor, dtype=torch.float64), rhs[:, 0]) * (rhs**2).sum(1)
    )


def test_model_output_reads_tensors_tuples_and_sample():
    x = torch.randn(2, 3)
    assert P.model_output(x) is x
    assert P.model_output((x, "extra")) is x and P.model_output([x]) is x
    assert P.model_output(SimpleNamespace(sample=x)) is x
    for bad in ({"sample": 1}, (), ("a",), None, 3.0):
        with pytest.raises(TypeError, match="tensor, a tuple or list"):
            P.model_output(bad)


def test_prediction_names_and_errors():
    for name, want in [("epsilon", "eps"), ("v_prediction", "v"), ("sample", "x0"), ("pred_noise", "eps"),
                       ("pred_v", "v"), ("pred_x0", "x0"), ("V", "v")]:  # fmt: skip
        assert P.canonical_prediction(name) == want
    with pytest.raises(ValueError, match="unknown prediction type 'score'"):
        P.canonical_prediction("score")
    with pytest.raises(ValueError, match="contradicts the scheduler"):
        P.resolve_prediction("eps", "v")
    assert P.resolve_prediction(None, "x0") == "x0" and P.resolve_prediction(None, None) == "eps"


# ---------------------------------------------------------------------------------------- the objective


def reference_loss(net64, pred, calls, x0, lam, mode, dm_weight=None):
    """The objective's loss in float64 from the inputs the model saw (x_t first, x_t + s w last)."""
    (x_t, t), (x_adv, _) = calls[0], calls[-1]
    x_t, x_adv, x0 = x_t.double(), x_adv.double(), x0.double()
    a, s = SCHED.coeffs(t, dtype=torch.float64)
    eps, w = (x_t - bs(a, x0) * x0) / bs(s, x0), (x_adv - x_t) / bs(s, x0)
    o, o_adv = (Reparam(net64, pred)(x, t) for x in (x_t, x_adv))
    c = {
        None: torch.ones_like(a),
        "eps": eps_hat64(pred, torch.ones_like(a), torch.zeros_like(a), a, s) ** 2,
    }[dm_weight]
    dm = (bs(c, o) * (o - target64(pred, x0, eps, a, s)) ** 2).mean()
    if mode == "ddpm":
        return dm
    r = eps_hat64(pred, o_adv, x_adv, a, s) - eps_hat64(pred, o, x_t, a, s) - (0 if mode == "inv" else w)
    return dm + lam * (r**2).mean()


@pytest.mark.parametrize(
    "pred,mode,wrap,dm_weight",
    [("eps", "adv", "tensor", None), ("v", "adv", "tuple", None), ("x0", "adv", "sample", None),
     ("v", "inv", "tensor", "eps"), ("x0", "rand", "tuple", "eps"), ("v", "ddpm", "sample", None)],
)  # fmt: skip
def test_objective_matches_float64_reference(pred, mode, wrap, dm_weight):
    torch.manual_seed(0)
    net = Net()
    model = Reparam(net, pred, wrap)
    x0 = data()
    obj = ATObjective(schedule=SCHED, mode=mode, lam=0.7, budget=Budget(r_min=0.1, r_scale=0.3),
                      prediction=pred, dm_weight=dm_weight)  # fmt: skip
    out = obj(model, x0, torch.Generator().manual_seed(5))
    out.loss.backward()
    net64 = copy.deepcopy(net).double()
    ref = reference_loss(net64, pred, model.calls, x0, 0.7, mode, dm_weight)
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), atol=1e-6, rtol=1e-4)
    for p, p64 in zip(net.parameters(), net64.parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), p64.grad, atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize("pred", ["v", "x0"])
@pytest.mark.parametrize("mode", ["rand", "adv", "inv"])
def test_regulariser_and_attack_equal_the_eps_models(pred, mode):
    """The same network seen as an eps-, v- or x0-model: same regulariser, same attack (same w and J), and
    with dm_weight="eps" the same denoising term."""
    torch.manual_seed(0)
    net = Net()
    x0 = data(seed=3)
    outs = {}
    for p in ("eps", pred):
        obj = ATObjective(schedule=SCHED, mode=mode, lam=0.5, prediction=p, dm_weight="eps")
        outs[p] = obj(Reparam(net, p), x0, torch.Generator().manual_seed(11)).stats
    for key in outs["eps"]:
        torch.testing.assert_close(outs[pred][key], outs["eps"][key], atol=1e-6, rtol=1e-4, msg=key)


def test_objective_takes_a_scheduler_object_and_refuses_a_contradiction():
    fake = SimpleNamespace(
        alphas_cumprod=SCHED.alphas_cumprod.float(), config={"prediction_type": "v_prediction"}
    )
    obj = ATObjective(schedule=fake, mode="rand")
    assert obj.prediction == "v" and obj.schedule.T == 100
    torch.testing.assert_close(obj.schedule.alphas_cumprod, SCHED.alphas_cumprod, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="contradicts the scheduler"):
        ATObjective(schedule=fake, prediction="eps")
    with pytest.raises(TypeError, match="no alphas_cumprod and no betas"):
        ATObjective(schedule=object())


def test_dm_weight_table_weighs_each_timestep():
    torch.manual_seed(0)
    net = Net()
    table = torch.linspace(0.1, 2.0, 100)
    model = Reparam(net, "v")
    x0 = data()
    out = ATObjective(schedule=SCHED, mode="ddpm", prediction="v", dm_weight=table)(
        model, x0, torch.Generator().manual_seed(2)
    )
    ((x_t, t),) = model.calls
    a, s = SCHED.coeffs(t, dtype=torch.float64)
    eps = (x_t.double() - bs(a, x0) * x0.double()) / bs(s, x0)
    o = Reparam(copy.deepcopy(net).double(), "v")(x_t.double(), t)
    ref = (bs(table[t].double(), o) * (o - target64("v", x0.double(), eps, a, s)) ** 2).mean()
    torch.testing.assert_close(out.loss.double(), ref, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match=r"shape \(100,\)"):
        ATObjective(schedule=SCHED, dm_weight=torch.ones(10))
    with pytest.raises(ValueError, match="unknown dm_weight"):
        ATObjective(schedule=SCHED, dm_weight="snr")
    with pytest.raises(ValueError, match=">= 0"):
        ATObjective(schedule=SCHED, dm_weight=-table)


def test_objective_refuses_float64_with_a_true_message():
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        ATObjective(schedule=SCHED)(Net().double(), data().double(), None)


# ------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("pred,wrap", [("v", "tuple"), ("x0", "sample"), ("eps", "sample")])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_read_any_output_and_prediction(pred, wrap, sampler):
    torch.manual_seed(0)
    net = Net().eval()
    noise = data(16, seed=9)
    kw = dict(clip_x0=1.0, generator=torch.Generator().manual_seed(1))
    run = (lambda m, **k: ddim_sample(m, SCHED, noise, steps=10, **k)) if sampler == "ddim" else (
        lambda m, **k: ddpm_sample(m, SCHED, noise, **k))  # fmt: skip
    ref = run(net, **kw)
    kw["generator"] = torch.Generator().manual_seed(1)
    got = run(Reparam(net, pred, wrap), prediction=pred, **kw)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(ref, noise)


def test_samplers_take_a_scheduler_object_and_its_prediction():
    torch.manual_seed(0)
    net = Net().eval()
    fake = SimpleNamespace(betas=SCHED.betas.tolist(), objective="pred_v")  # lucidrains-like
    noise = data(8, seed=4)
    ref = ddim_sample(net, SCHED, noise, steps=5)
    torch.testing.assert_close(
        ddim_sample(Reparam(net, "v"), fake, noise, steps=5), ref, atol=1e-4, rtol=1e-4
    )
    with pytest.raises(ValueError, match="contradicts"):
        ddim_sample(net, fake, noise, steps=5, prediction="eps")


def test_eps_model_wraps_any_model_as_an_eps_model():
    torch.manual_seed(0)
    net = Net()
    x, t = data(8), torch.randint(0, 100, (8,))
    for pred, wrap in (("v", "sample"), ("x0", "tuple"), ("eps", "tuple")):
        wrapped = P.EpsModel(Reparam(net, pred, wrap), pred, SCHED)
        torch.testing.assert_close(wrapped(x, t), net(x, t), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="needs the noise schedule"):
        P.EpsModel(net, "v")
