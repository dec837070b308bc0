"""fastat.eval: metrics against closed forms, memorisation, the trajectory attack, FID plumbing, and the
``fastat eval`` commands end to end on tiny runs (CPU, about a minute in all)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from fastat import NoiseSchedule, build_model, ddim_sample, ddpm_sample
from fastat.data import GMM2D, Plane3D, Subspace
from fastat.eval import (
    AttackSpec,
    MeasureSpec,
    SamplerSpec,
    denoiser_psnr,
    distance_summary,
    frechet_distance,
    memorization,
    mode_balance,
    nearest_neighbors,
    oracle_x0_subspace,
    psnr,
    sample_with_perturbation,
    sliced_wasserstein,
    support_distance,
    trajectory_attack,
)
from fastat.eval import fid as fidmod
from fastat.eval.metrics import feature_stats, projection_directions


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread is several times faster on a shared 2-core CPU
    (more threads spin against each other and against other processes)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- distance to the support: closed forms --------------------------------------------------------------


def test_plane_distance_is_the_offset():
    known = Plane3D()
    c = torch.rand(200, 2, generator=_g(0), dtype=torch.float64) * 1.6 - 0.8  # inside the square
    on = c @ known.basis.T
    h = torch.linspace(-0.5, 0.5, 200, dtype=torch.float64)
    off = on + h[:, None] * known.normal
    assert support_distance(known, on.float()).abs().max() < 1e-6
    torch.testing.assert_close(support_distance(known, off.float()), h.abs().float(), atol=1e-6, rtol=0)


def test_subspace_distance_is_the_rms_offset():
    known = Subspace(channels=1, height=6, width=6, k=3)
    x = known.sample(64, _g(1)).double().reshape(64, -1)
    # a direction orthogonal to the subspace, scaled to RMS-per-pixel 0.2
    v = torch.randn(known.dim, generator=_g(2), dtype=torch.float64)
    v = v - known.basis @ (known.basis.T @ v)
    v = v / v.norm() * 0.2 * math.sqrt(known.dim)
    on, off = x.float().reshape(64, 1, 6, 6), (x + v).float().reshape(64, 1, 6, 6)
    assert support_distance(known, on).max() < 1e-6
    torch.testing.assert_close(support_distance(known, off), torch.full((64,), 0.2), atol=1e-5, rtol=0)


def test_gmm_distance_and_mode_balance():
    known = GMM2D()
    centers = known.centers.float()
    r = torch.tensor([0.1, 0.3]).repeat(4)
    ang = torch.rand(8, generator=_g(3)) * 2 * math.pi
    x = centers + r[:, None] * torch.stack([ang.cos(), ang.sin()], 1)
    torch.testing.assert_close(support_distance(known, x), r, atol=1e-6, rtol=0)
    bal = mode_balance(known, centers.repeat(5, 1))
    assert bal["modes_covered"] == 8 and bal["mode_tv"] == pytest.approx(0.0, abs=1e-12)
    one = mode_balance(known, centers[:1].repeat(40, 1))
    assert one["modes_covered"] == 1 and one["mode_tv"] == pytest.approx(1 - 1 / 8)


def test_distance_summary_matches_numpy():
    d = torch.rand(101, generator=_g(4)) * 3
    s = distance_summary(d, "x")
    arr = d.double().numpy()
    assert s["x_mean"] == pytest.approx(arr.mean())
    assert s["x_median"] == pytest.approx(np.quantile(arr, 0.5))
    assert s["x_p90"] == pytest.approx(np.quantile(arr, 0.9))


# -- sliced Wasserstein ---------------------------------------------------------------------------------


def test_sliced_wasserstein_zero_shift_and_growth():
    x = torch.randn(2000, 3, generator=_g(5))
    y = torch.randn(2000, 3, generator=_g(6))
    assert sliced_wasserstein(x, x) == 0.0
    c = torch.tensor([0.3, -0.2, 0.5])
    theta = projection_directions(3, 512, seed=0)
    exact = math.sqrt(((theta @ c.double()) ** 2).mean().item())
    assert sliced_wasserstein(x, x + c) == pytest.approx(exact, rel=1e-6)
    assert exact == pytest.approx(c.norm().item() / math.sqrt(3), rel=0.1)  # E<theta,c>^2 = |c|^2 / d
    same = sliced_wasserstein(x, y)
    shifts = [sliced_wasserstein(x, y + k * c) for k in (0.5, 1.0, 2.0)]
    assert same < 0.1  # the finite-sample floor (~0.05 at n = 2000)
    assert same < shifts[0] < shifts[1] < shifts[2]


def test_sliced_wasserstein_unequal_sizes_is_exact():
    x = torch.randn(37, 1, generator=_g(7))
    y = torch.randn(53, 1, generator=_g(8)) + 0.4
    assert sliced_wasserstein(x, torch.cat([x, x, x])) == pytest.approx(0.0, abs=1e-12)  # same measure
    scipy_stats = pytest.importorskip("scipy.stats", reason="scipy not installed")
    # in 1-D every direction is +-1, so SW_1 is the 1-D W_1 exactly
    w1 = scipy_stats.wasserstein_distance(x.squeeze(1).numpy(), y.squeeze(1).numpy())
    assert sliced_wasserstein(x, y, p=1, n_proj=4) == pytest.approx(w1, rel=1e-6)


# -- Fréchet distance -----------------------------------------------------------------------------------


def _frechet_scipy(mu1, s1, mu2, s2):
    linalg = pytest.importorskip("scipy.linalg", reason="scipy not installed")
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n,d", [(200, 8), (64, 32), (20, 24)])  # the last is rank-deficient (n < d)
def test_frechet_distance_matches_scipy_sqrtm(n, d):
    rng = np.random.default_rng(n + d)
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.5
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_frechet_scipy(mu1, s1, mu2, s2), rel=1e-6, abs=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8 * np.trace(s1))


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    want = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)


# -- PSNR of the implied denoiser -----------------------------------------------------------------------


class _OracleEps(nn.Module):
    """eps-model whose implied x0_hat is the exact posterior mean of a Subspace distribution."""

    def __init__(self, known, schedule):
        super().__init__()
        self.known, self.schedule = known, schedule
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        a, s = self.schedule.coeffs(t)
        shape = (-1,) + (1,) * (x.dim() - 1)
        x0 = oracle_x0_subspace(self.known, self.schedule, x, t)
        return (x - a.view(shape) * x0) / s.view(shape)


class _ZeroEps(nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


def test_psnr_closed_form():
    x = torch.rand(4, 3, 5, 5, generator=_g(9)) * 2 - 1
    assert psnr(x + 0.1, x) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-6)
    assert psnr(x, x) == math.inf


def test_denoiser_psnr_oracle_is_the_ceiling():
    known, sched = Subspace(channels=1, height=4, width=4, k=2), NoiseSchedule(T=100)
    clean = known.sample(256, _g(10))
    ts = [5, 40, 90]
    oracle = denoiser_psnr(_OracleEps(known, sched), sched, clean, ts, known=known)
    zero = denoiser_psnr(_ZeroEps(), sched, clean, ts, known=known)
    for t in ts:
        assert oracle[f"psnr_t{t}"] == pytest.approx(oracle[f"psnr_oracle_t{t}"], abs=1e-3)
        assert zero[f"psnr_oracle_t{t}"] == pytest.approx(oracle[f"psnr_oracle_t{t}"])
        assert zero[f"psnr_t{t}"] < oracle[f"psnr_t{t}"] - 1.0  # x_t / a_t keeps all the noise
    assert oracle["psnr_t5"] > oracle["psnr_t40"] > oracle["psnr_t90"]  # harder at higher noise


# -- memorisation ---------------------------------------------------------------------------------------


def test_memorization_exact_copies_and_fresh_samples():
    train = torch.randn(300, 3, 4, 4, generator=_g(11)) * 0.5 + 0.2
    copies = train[torch.randperm(300, generator=_g(12))[:50]]
    rep = memorization(copies, train, batch=37)
    assert rep["nn_cos_mean"] == pytest.approx(1.0, abs=1e-5)
    assert rep["near_copy_share"] == 1.0 and rep["nn_l2_mean"] == pytest.approx(0.0, abs=1e-4)
    fresh = torch.randn(50, 3, 4, 4, generator=_g(13)) * 0.5 + 0.2
    rep2 = memorization(fresh, train, reference=copies)
    assert rep2["near_copy_share"] == 0.0 and rep2["nn_cos_mean"] < 0.8
    assert rep2["ref_near_copy_share"] == 1.0
    half = torch.cat([copies[:25] + 0.01 * torch.randn(25, 3, 4, 4, generator=_g(14)), fresh[:25]])
    assert memorization(half, train)["near_copy_share"] == pytest.approx(0.5)


def test_nearest_neighbors_indices_and_blocks():
    train = torch.randn(101, 6, generator=_g(15))
    idx = torch.tensor([3, 99, 50, 0])
    q = train[idx] + 1e-3
    for metric in ("cosine", "l2"):
        _, i1 = nearest_neighbors(q, train, metric=metric, batch=7)
        _, i2 = nearest_neighbors(q, train, metric=metric, batch=1000)
        assert torch.equal(i1, idx) and torch.equal(i2, idx)
    d, _ = nearest_neighbors(train[:5] + 0.3, train, metric="l2")
    assert torch.all(d <= 0.3 + 1e-6)  # RMS per element of the offset to itself bounds the NN distance


# -- the trajectory attack ------------------------------------------------------------------------------


@pytest.fixture
def tiny_mlp():
    torch.manual_seed(0)
    return build_model("mlp", dim=3, hidden=32, depth=2)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0)])
def test_unperturbed_sampling_matches_the_samplers(tiny_mlp, sampler, eta):
    sched = NoiseSchedule(T=60)
    noise = torch.randn(16, 3, generator=_g(16))
    ours, changes = sample_with_perturbation(
        tiny_mlp, sched, noise, perturbation="none", sampler=sampler, steps=12, eta=eta, generator=_g(17)
    )
    if sampler == "ddim":
        ref = ddim_sample(tiny_mlp, sched, noise, steps=12, eta=eta, generator=_g(17))
    else:
        ref = ddpm_sample(tiny_mlp, sched, noise, generator=_g(17))
    assert changes == {}
    assert torch.equal(ours, ref)


def test_attack_increases_prediction_change_and_leaves_the_model_alone(tiny_mlp):
    sched = NoiseSchedule(T=100)
    tiny_mlp.train()
    before = {k: v.clone() for k, v in tiny_mlp.state_dict().items()}
    noise = torch.randn(64, 3, generator=_g(18))
    res = trajectory_attack(
        tiny_mlp, sched, noise, AttackSpec(at=(10, 50, 90), radius=0.2, steps=8), SamplerSpec(steps=20)
    )
    assert res.timesteps == [89, 49, 9]  # snapped to the DDIM grid, newest first
    for t in res.timesteps:
        assert res.change[t] > 1.2 * res.change_random[t] > 0
    assert not torch.equal(res.attacked, res.clean) and not torch.equal(res.random, res.clean)
    assert res.summary()["shift_pgd"] > 0
    for k, v in tiny_mlp.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in tiny_mlp.parameters())
    assert tiny_mlp.training  # train/eval flag restored


class _WavyEps(nn.Module):
    """A strongly nonlinear eps-model, so that the eps term of the x0_hat change matters."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3, generator=_g(5)) * 3)

    def forward(self, x, t):
        return torch.sin(x @ self.w)


def test_x0_target_attack_maximises_the_x0_change():
    model, sched = _WavyEps(), NoiseSchedule(T=100)
    noise = torch.randn(64, 3, generator=_g(18))
    spec, sampler = AttackSpec(at=(10, 50, 90), radius=0.2, steps=8), SamplerSpec(steps=20)
    on_x0 = trajectory_attack(model, sched, noise, replace(spec, target="x0"), sampler)
    on_eps = trajectory_attack(model, sched, noise, replace(spec, target="eps"), sampler)
    for t in on_x0.timesteps:
        assert on_x0.change_x0[t] > 1.2 * on_x0.change_x0_random[t] > 0
        assert on_x0.change_x0[t] > on_eps.change_x0[t]  # each target is best at its own measure
        assert on_eps.change[t] > on_x0.change[t]
    assert model.w.grad is None


def test_attack_respects_the_budget(tiny_mlp):
    from fastat.eval.trajectory import _perturb

    x = torch.randn(32, 3, generator=_g(19))
    a_t, s_t = 0.8, 0.6
    for kind in ("pgd", "random"):
        for target in ("eps", "x0"):
            x_new, j_eps, j_x0 = _perturb(tiny_mlp, x, 30, a_t, s_t, kind, 0.1, 4, 2.5 / 4, target, _g(20))
            d = x_new - x
            assert d.abs().max() <= 0.1 + 1e-6 and d.abs().max() > 0.09, (kind, target)
            assert j_eps.shape == (32,) and torch.all(j_eps > 0) and torch.all(j_x0 > 0)
            with torch.no_grad():  # the x0_hat change as defined: (d - s delta eps) / a
                tb = torch.full((32,), 30)
                de = tiny_mlp(x_new, tb) - tiny_mlp(x, tb)
                want = ((d - s_t * de) / a_t).square().sum(1)
            torch.testing.assert_close(j_x0, want, rtol=1e-4, atol=1e-7)
    sched = NoiseSchedule(T=50)
    noise = torch.randn(8, 3, generator=_g(21))
    with pytest.raises(ValueError, match="radius"):
        sample_with_perturbation(tiny_mlp, sched, noise, attack_at=(1,), radius=0.0)
    with pytest.raises(ValueError, match="attack timesteps"):
        sample_with_perturbation(tiny_mlp, sched, noise, attack_at=(50,))


# -- FID / IS: math, cache, and the Inception plumbing --------------------------------------------------


def test_inception_score_closed_forms():
    assert fidmod.inception_score(torch.zeros(40, 10), splits=4)[0] == pytest.approx(1.0)
    onehot = torch.eye(10).repeat(4, 1) * 50.0  # confident, evenly spread over 10 classes
    mean, std = fidmod.inception_score(onehot, splits=4)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_reference_stats_are_cached(tmp_path):
    imgs = torch.rand(30, 3, 8, 8, generator=_g(20)) * 2 - 1
    calls = []

    def extractor(x):
        calls.append(x.shape[0])
        return x.reshape(x.shape[0], -1)[:, :16].double()

    a = fidmod.reference_stats("toy-8-n30", lambda: imgs, extractor, cache_dir=tmp_path, n=30)
    b = fidmod.reference_stats("toy-8-n30", lambda: imgs, extractor, cache_dir=tmp_path, n=30)
    assert calls == [30] and (tmp_path / "toy-8-n30.npz").is_file()
    np.testing.assert_array_equal(a.mu, b.mu)
    np.testing.assert_array_equal(a.sigma, b.sigma)
    assert b.n == 30 and b.key == "toy-8-n30"
    fidmod.reference_stats("toy-8-n30", imgs[:20], extractor, cache_dir=tmp_path, n=20)  # other n: recompute
    assert calls == [30, 20]
    assert fidmod.fid_from_stats(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="key"):
        fidmod.reference_stats("bad/key", imgs, extractor, cache_dir=tmp_path)


def test_missing_weights_say_so(tmp_path, monkeypatch):
    monkeypatch.delenv(fidmod.WEIGHTS_ENV, raising=False)
    with pytest.raises(fidmod.FIDUnavailable, match="not found"):
        fidmod.find_inception_weights(tmp_path / "nope.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(fidmod.FIDUnavailable, match="not installed"):
        fidmod.find_inception_weights()


def test_inception_pipeline_with_random_weights(tmp_path, monkeypatch):
    """torch-fidelity's Inception with random weights written to a file: the offline path end to end
    (uint8 conversion, one-channel images, batching, feature and logit shapes, FID/IS numbers)."""
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as tfi
    except ImportError:
        pytest.skip("torch-fidelity not installed (pip install 'fastat[eval]')")
    with monkeypatch.context() as mp:  # build it once without any weights to get a random state dict
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    wpath = tmp_path / "random-inception.pth"
    torch.save(net.state_dict(), wpath)
    ext = fidmod.InceptionFeatures(wpath, batch=2)
    imgs = torch.rand(3, 1, 16, 16, generator=_g(21)) * 2 - 1
    feats, logits = ext.features_and_logits(imgs)
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008) and torch.isfinite(feats).all()
    ref = fidmod.reference_stats("rand-16-n3", imgs, ext, cache_dir=tmp_path)
    scores = fidmod.fid_is(imgs, ref, ext, splits=1)
    assert scores["fid"] == pytest.approx(0.0, abs=1e-6 * max(1.0, float(np.trace(ref.sigma))))


def test_real_inception_weights_if_present():
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        pytest.skip("torch-fidelity not installed (pip install 'fastat[eval]')")
    try:
        fidmod.find_inception_weights()
    except fidmod.FIDUnavailable as e:
        pytest.skip(f"Inception weights not installed: {e}")
    ext = fidmod.InceptionFeatures()
    x = torch.rand(2, 3, 32, 32, generator=_g(22)) * 2 - 1
    assert ext(x).shape == (2, 2048)


# -- end to end: a tiny trained run, `fastat eval --run`, `fastat eval compare --quick` -----------------


def _tiny_run(tmp_path, dataset="plane3d", **extra):
    from fastat.train.config import TrainConfig
    from fastat.train.run import train

    over = {
        "data.dataset": dataset,
        "data.n": 256,
        "run.steps": 30,
        "run.batch_size": 64,
        "run.out": str(tmp_path / "run"),
        "run.save_every": 0,
        "run.sample_every": 0,
        "run.eval_n": 0,
        "run.tensorboard": False,
        "run.sample_n": 8,
        "run.sample_steps": 5,
        "objective.mode": "adv",
        "objective.T": 100,
        "run.device": "cpu",
        **extra,
    }
    if dataset != "subspace":
        over.update({"model.name": "mlp", "model.kwargs": {"hidden": 32, "depth": 2}})
    return train(TrainConfig().with_overrides(over), progress=False).run_dir


def test_report_after_training(tmp_path, capsys):
    """What `fastat train` prints at the end of a run on a built-in set."""
    from fastat.app.eval_cli import report_after_training
    from fastat.train.config import TrainConfig

    run = _tiny_run(tmp_path)
    cfg = TrainConfig().with_overrides({"data.dataset": "plane3d", "run.eval_n": 16, "run.sample_steps": 4})
    result = type("R", (), {"run_dir": run, "device": "cpu"})()
    rep = report_after_training(result, cfg)
    out = capsys.readouterr().out
    assert rep["settings"]["n"] == 16 and "distance to the clean support" in out and "eval.json" in out
    assert report_after_training(result, cfg.with_overrides({"run.eval_n": 0})) is None


def test_evaluate_run_writes_eval_json(tmp_path):
    from fastat.eval import evaluate_run, format_report

    run = _tiny_run(tmp_path)
    rep = evaluate_run(run, n=64, steps=5, attack=AttackSpec(n=16, at=(20, 60), steps=2))
    saved = json.loads((run / "eval.json").read_text())
    m = saved["metrics"]
    assert saved["step"] == 30 and saved["dataset"] == "plane3d"
    for key in (
        "dist_mean",
        "dist_median",
        "dist_p90",
        "sw",
        "sw_floor",
        "data_dist_mean",
        "attack_dist_pgd_mean",
    ):
        assert key in m and math.isfinite(m[key]), key
    assert 0 < m["sw_floor"] < m["sw_data"]  # corrupted data are further from the clean law than fresh data
    assert m["data_dist_mean"] > 0.05  # 90% of the copies carry noise of sigma 0.2
    assert "distance to the clean support" in format_report(rep)


def test_known_metrics_on_subspace_with_the_oracle():
    from fastat.eval import known_metrics

    known, sched = Subspace(channels=1, height=4, width=4, k=2), NoiseSchedule(T=100)
    train = known.sample(200, _g(23))
    spec = MeasureSpec(n=128, sampler=SamplerSpec(steps=20), psnr_ts=(10, 50))
    m = known_metrics(_OracleEps(known, sched), sched, known, spec, train_data=train)
    assert m["dist_mean"] < 0.02  # the oracle's DDIM samples stay on the subspace
    assert m["psnr_t10"] == pytest.approx(m["psnr_oracle_t10"], abs=1e-3)
    assert m["sw"] < 3 * m["sw_floor"] + 0.02
    assert 0.0 <= m["near_copy_share"] <= 1.0 and "ref_nn_cos_mean" in m


def _cli(argv):
    from fastat.app.cli import main

    return main(argv)


def test_cli_eval_run(tmp_path, capsys):
    run = _tiny_run(tmp_path)
    assert _cli(["eval", "--run", str(run), "--n", "32", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "distance to the clean support" in out and "sliced W2" in out
    assert (run / "eval.json").is_file()
    assert _cli(["eval", "--run", str(tmp_path / "missing")]) == 2
    assert _cli(["eval"]) == 2


def test_cli_compare_quick(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _cli(["eval", "compare", "--quick", "--out", str(out)]) == 0
    table = (out / "compare.md").read_text()
    data = json.loads((out / "compare.json").read_text())
    assert "| plane3d-s0.2 | ddpm |" in table and "| plane3d-s0.2 | adv |" in table
    assert len(data["records"]) == 4 and "plane3d-s0.2" in data["summary"]
    block = data["summary"]["plane3d-s0.2"]
    assert set(block) == {"reference", "variants"} and set(block["variants"]) == {"ddpm", "adv"}
    assert "vs_ddpm" in block["variants"]["adv"] and "data_dist_mean" in block["reference"]
    assert {"setting", "variant", "seed", "flop_units", "metrics"} <= set(data["records"][0])
    # benchmarks/cost_summary.py reads the records as before
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cost_summary

    lines, _ = cost_summary.summarise(data, goal_cost=1.5, goal_share=0.8)
    assert any("| plane3d-s0.2 | adv | 8 | 2.67 | 60 |" in line for line in lines)
    # a second call reuses the finished runs (same records, training times included)
    assert _cli(["eval", "compare", "--quick", "--out", str(out), "--no-plots"]) == 0
    again = json.loads((out / "compare.json").read_text())
    assert [r["train_seconds"] for r in again["records"]] == [r["train_seconds"] for r in data["records"]]
    assert _cli(["eval", "compare", "--quick", "--preset", "images", "--out", str(out)]) == 2


def test_compare_images_preset_smoke(tmp_path, capsys):
    """The image preset's runs (a tiny UNet on subspace images) at smoke size: the table gets the image
    columns (x0_hat PSNR with its exact ceiling, memorisation beside fresh data) and the UNet in its notes."""
    from fastat.eval.compare import PRESETS, run_compare, spec_with

    spec = spec_with(PRESETS["images"], settings=["subspace-s0.2"], modes=["ddpm", "adv"], seeds=[0], steps=4,
                     n_train=64, image_size=4, unet={"ch": 8, "groups": 4}, eval_n=8, sample_steps=3,
                     attack=False)  # fmt: skip
    assert PRESETS["images"].image_size == 8 and spec.image_size == 4 and spec.eta == 1.0
    res = run_compare(spec, tmp_path / "cmp", plots=False, log=lambda s: None)
    cfg = (tmp_path / "cmp" / "runs" / "subspace-s0.2" / "adv-seed0" / "config.yaml").read_text()
    assert "schedule: cosine" in cfg and "ch: 8" in cfg and "image_size: 4" in cfg
    table = res.table
    assert "| subspace-s0.2 | adv |" in table and "x0_hat PSNR t=100" in table and "NN cosine" in table
    assert "(exact posterior mean" in table and "(fresh clean data" in table
    assert "UNet tiny 4x4 (ch=8, groups=4)" in table and "no trajectory attack" in table
    adv = res.summary["subspace-s0.2"].variants["adv"]
    assert {"dist_mean", "psnr_t100", "nn_cos_mean"} <= set(adv.stats) and "psnr_t100" in adv.vs_ddpm


def test_compare_equal_flop_budget_gives_each_variant_its_steps(tmp_path):
    """budget_units U: each variant trains round(U / units per image and step) steps (batch 8)."""
    from fastat.eval.compare import SETTINGS, CompareSpec, SettingSummary, markdown_table
    from fastat.eval.compare.report import VariantSummary

    spec = CompareSpec(batch_size=8, budget_units=2400)
    steps = {
        v: spec.run_overrides(SETTINGS["plane3d-s0.2"], v, 0, tmp_path)["run.steps"]
        for v in ("ddpm", "adv", "pgd[pgd_steps=2]", "free[replays=4]", "adv[reg_frac=0.25]")
    }
    # 3, 8, 3 + 2*2 + 3, 6 (a replay), 3 + 5 * ceil(2) / 8 units
    assert steps == {"ddpm": 800, "adv": 300, "pgd[pgd_steps=2]": 240, "free[replays=4]": 400,
                     "adv[reg_frac=0.25]": 565}  # fmt: skip
    equal = CompareSpec(batch_size=8)
    assert equal.run_overrides(SETTINGS["plane3d-s0.2"], "free", 0, tmp_path)["run.steps"] == 400
    row = VariantSummary(1, {"dist_mean": (0.1, 0.0), "flop_units": (8.0, 0.0), "steps": (300.0, 0.0)})
    summary = {"plane3d-s0.2": SettingSummary({}, {"adv": row})}
    table = markdown_table(summary, spec)
    assert "| units/img | steps | s/step |" in table and "| 8 | 300 |" in table
    assert "equal FLOP budget of 2400" in table


def test_sampler_spec_checks_and_generate_takes_it_or_its_fields(tiny_mlp):
    from fastat.train.samples import generate

    sched = NoiseSchedule(T=50)
    with pytest.raises(ValueError, match="sampler steps"):
        SamplerSpec(steps=0).check(50)
    with pytest.raises(ValueError, match="eta"):
        SamplerSpec(eta=1.5).check(50)
    with pytest.raises(ValueError, match="unknown sampler"):
        SamplerSpec("euler").check(50)
    assert SamplerSpec("ddpm", steps=0).check(50).visited(50) == 50  # ddpm visits every step
    noise = torch.randn(6, 3, generator=_g(30))
    spec = SamplerSpec("ddim", steps=5, eta=0.5, clip_x0=1.0)
    a = generate(tiny_mlp, sched, noise, spec, generator=_g(31))
    b = generate(tiny_mlp, sched, noise, steps=5, eta=0.5, clip_x0=1.0, generator=_g(31))
    c = ddim_sample(tiny_mlp, sched, noise, steps=5, eta=0.5, clip_x0=1.0, generator=_g(31))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_compare_records_are_typed_and_round_trip():
    from fastat.eval.compare import RunRecord, aggregate
    from fastat.eval.compare.spec import CompareSpec

    recs = [RunRecord("plane3d-s0.2", v, seed, f"r/{v}{seed}", 1.0, 0.01, 100,
                      {"dist_mean": d, "data_dist_mean": 0.2}, flop_units=u, flop_units_total=100 * u)
            for v, u, seed, d in (("ddpm", 3.0, 0, 0.3), ("ddpm", 3.0, 1, 0.32), ("adv", 8.0, 0, 0.1),
                                  ("adv", 8.0, 1, 0.12))]  # fmt: skip
    assert RunRecord.from_dict(json.loads(json.dumps(recs[2].to_dict()))) == recs[2]
    old = {k: v for k, v in recs[0].to_dict().items() if k not in ("flop_units", "flop_units_total")}
    assert RunRecord.from_dict(old).flop_units is None  # a record written before the costs were kept
    summary = aggregate(recs, CompareSpec(settings=("plane3d-s0.2",), modes=("ddpm", "adv")))
    block = summary["plane3d-s0.2"]
    assert block.reference == {"data_dist_mean": 0.2} and list(block.variants) == ["ddpm", "adv"]
    adv = block.variants["adv"]
    assert adv.stats["dist_mean"] == pytest.approx((0.11, math.sqrt(2e-4)))
    assert adv.vs_ddpm["dist_mean"].verdict == "better" and block.variants["ddpm"].vs_ddpm is None
    js = block.to_json()
    assert js["variants"]["adv"]["vs_ddpm"]["dist_mean"][2] == "better" and "_reference" not in js
