"""`fastat eval` on image runs (issue 19): the noise level, memorisation beside the training set's own
value, FID/KID against held-out images (--ref) or a one-line note, the progress bar, and `fastat eval runs`
(several runs as one table). Two tiny runs on an image folder written by fastat's own save_image_folder."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_helpers import run_cli, train_run

from fastat.eval import noise as noisemod
from fastat.eval.format import format_report
from fastat.eval.images import held_out_split
from fastat.eval.memorization import memorization
from fastat.eval.runs import runs_table, vs_first
from fastat.train.samples import save_image_folder

pytest.importorskip("skimage", reason="scikit-image is in the test extra (pip install 'fastat[test]')")


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _smooth_images(n: int, size: int = 16) -> torch.Tensor:
    """Smooth RGB images in [-0.6, 0.6]: random planes (no texture the wavelet estimate would call noise)."""
    a = torch.rand(n, 3, 1, 1, generator=_g(0)) * 0.6 - 0.3
    gx = torch.rand(n, 3, 1, 1, generator=_g(1)) * 0.3 - 0.15
    gy = torch.rand(n, 3, 1, 1, generator=_g(2)) * 0.3 - 0.15
    r = torch.linspace(-1, 1, size)
    return a + gx * r.view(1, 1, 1, -1) + gy * r.view(1, 1, -1, 1)


# -- the noise level --------------------------------------------------------------------------------------


def test_noisier_images_get_a_higher_sigma():
    clean = _smooth_images(24)
    levels = []
    for sigma in (0.0, 0.05, 0.1, 0.2):
        noisy = clean + sigma * torch.randn(clean.shape, generator=_g(3))
        levels.append(noisemod.noise_summary(noisy)["sigma_mean"])
    assert levels[0] < 1.0  # smooth images: next to no noise
    assert levels[0] < levels[1] < levels[2] < levels[3]
    # in pixel units (0-255): sigma 0.1 of [-1, 1] is 12.75
    assert levels[2] == pytest.approx(0.1 * 127.5, rel=0.2)
    gray = noisemod.noise_sigma(clean[:, :1] + 0.1 * torch.randn(24, 1, 16, 16, generator=_g(4)))
    assert gray.shape == (24,) and gray.mean().item() == pytest.approx(12.75, rel=0.2)


def test_without_scikit_image_the_report_says_so(monkeypatch):
    monkeypatch.setattr(noisemod, "sigma_available", lambda: False)
    assert noisemod.noise_sigma(_smooth_images(2)) is None and noisemod.noise_summary(_smooth_images(2)) == {}
    report = {"run": "r", "step": 1, "dataset": "folder", "kind": "image", "objective": {"mode": "adv"},
              "settings": {"n": 2, "sampler": "ddim", "steps": 3, "eta": 0.0, "weights": "ema"},
              "metrics": {"n": 2}}  # fmt: skip
    assert noisemod.SIGMA_MISSING in format_report(report)
    assert "scikit-image is not installed" in noisemod.SIGMA_MISSING


# -- memorisation's reference: the training set against a held-out part of itself ---------------------------


def test_held_out_split_and_its_reference_sees_duplicates():
    x = torch.randn(50, 3, 4, 4, generator=_g(5))
    rest, held = held_out_split(x, 8)
    assert rest.shape[0] == 42 and held.shape[0] == 8 and torch.equal(held, x[42:])
    assert torch.equal(rest[0:42], x[:42]) and torch.equal(rest[40:100], x[40:42])
    assert held_out_split(x[:9], 8)[1] is None  # too few images for a reference
    fresh = memorization(held, rest)
    dup = torch.cat([x[:42], x[:8]])  # the last 8 are copies of images in the rest
    r2, h2 = held_out_split(dup, 8)
    copied = memorization(h2, r2)
    assert fresh["near_copy_share"] == 0.0 and copied["near_copy_share"] == 1.0
    assert copied["nn_cos_mean"] > fresh["nn_cos_mean"] + 0.3


def test_vs_first_and_the_table():
    a = {"sigma_mean": 20.0, "sigma_median": 19.0, "nn_cos_mean": 0.5, "near_copy_share": 0.1, "fid": 40.0}
    b = {"sigma_mean": 10.0, "sigma_median": 9.0, "nn_cos_mean": 0.45, "near_copy_share": 0.0, "fid": 50.0}
    change = vs_first(a, b)
    assert change["sigma_mean"] == pytest.approx(-0.5) and change["fid"] == pytest.approx(0.25)
    assert change["nn_cos_mean"] == pytest.approx(-0.05) and change["near_copy_share"] == pytest.approx(-0.1)
    settings = {"n": 8, "sampler": "ddim", "steps": 3, "eta": 0.0, "seed": 0}
    reps = [{"run": name, "step": 5, "dataset": "folder", "objective": {"mode": mode}, "settings": settings,
             "metrics": {**m, "data_sigma_mean": 30.0, "ref_sigma_mean": 1.5, "ref_sigma_median": 1.4}}
            for name, mode, m in (("A", "ddpm", a), ("B", "adv", b))]  # fmt: skip
    table = runs_table(reps)
    assert "| vs the first run |" in table and "| *training images* (folder) | | | 30.00 |" in table
    assert "| *--ref images* | | | 1.50 | 1.40 |" in table
    assert "| B | adv | 5 | 10.00 |" in table and "sigma -50%" in table and "FID +25%" in table


# -- end to end: two tiny runs on an image folder ---------------------------------------------------------


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory):
    """A folder of smooth 8x8 images (90% noisy at sigma 0.2 when trained on), a held-out folder of other
    clean images, and two 6-step runs on the first: ddpm and adv."""
    root = tmp_path_factory.mktemp("folder")
    images = _smooth_images(72, 8)
    save_image_folder(images[:60], root / "images")
    save_image_folder(images[60:], root / "ref")
    tiny = ["--image-size", 8, "--set", "model.kwargs={ch: 8, groups: 4}", "--batch-size", 8, "--steps", 6,
            "--no-progress", "--set", "run.sample_n=4", "--set", "run.sample_steps=3",
            "--set", "data.corrupt_frac=0.9", "--set", "data.corrupt_sigma=0.2"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTAT_CACHE", str(tmp_path_factory.getbasetemp() / "fastat-cache"))
        runs = [
            train_run(root / mode, "--dataset", root / "images", *tiny, "--mode", mode)
            for mode in ("ddpm", "adv")
        ]
    return root, runs


@pytest.fixture
def no_inception(tmp_path, monkeypatch):
    """No Inception weights anywhere (an offline machine)."""
    monkeypatch.delenv("FASTAT_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


@pytest.mark.usefixtures("one_thread", "no_inception")
def test_eval_of_a_folder_run_reports_each_measure_with_its_reference(folder_runs, capsys):
    root, (ddpm, _) = folder_runs
    code, out, err = run_cli(capsys, "eval", "--run", ddpm, "--n", 12, "--steps", 3, "--ref", root / "ref")
    assert code == 0, err
    assert "sampling" in err  # the progress bar
    assert "noise level sigma (0-255)" in out and "| training images" in out and "| --ref images" in out
    assert "| held-out training images:" in out
    (note,) = [line for line in out.splitlines() if "FID/KID skipped" in line]
    assert "Inception weights" in note
    m = json.loads((ddpm / "eval.json").read_text())["metrics"]
    for key in ("sigma_mean", "sigma_median", "data_sigma_mean", "nn_cos_mean", "ref_nn_cos_mean",
                "near_copy_share", "ref_near_copy_share"):  # fmt: skip
        assert math.isfinite(m[key]), key
    # 90% of the training images carry noise of sigma 0.2 (25.5 in pixel units; less after clamping);
    # the held-out clean images (smooth, then rounded to 8 bits) next to none
    assert m["ref_sigma_mean"] < 2 < 15 < m["data_sigma_mean"] < 30
    code, _, err = run_cli(capsys, "eval", "--run", ddpm, "--n", 12, "--ref", root / "missing")
    assert code == 2 and "--ref" in err and "does not exist" in err


@pytest.mark.usefixtures("one_thread", "no_inception")
def test_eval_runs_prints_one_table_and_writes_json(folder_runs, capsys, tmp_path):
    _, (ddpm, adv) = folder_runs
    out_file = tmp_path / "cmp.json"
    code, out, err = run_cli(capsys, "eval", "runs", ddpm, adv, "--n", 8, "--steps", 3, "--out", out_file)
    assert code == 0, err
    assert (
        "| vs the first run |" in out and "*training images* (folder)" in out and "*--ref images*" not in out
    )
    assert f"| {ddpm} | ddpm | 6 |" in out and f"| {adv} | adv | 6 |" in out
    data = json.loads(out_file.read_text())
    assert [r["run"] for r in data["runs"]] == [str(ddpm), str(adv)] and data["vs_first"][0] == {}
    assert "sigma_mean" in data["vs_first"][1] and data["table"] in out
    assert run_cli(capsys, "eval", "runs", ddpm, "--n", 4, "--steps", 2, "--out", out_file)[0] == 0  # ours
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    code, _, err = run_cli(capsys, "eval", "runs", ddpm, "--n", 4, "--steps", 2, "--out", foreign)
    assert code == 2 and "not a 'fastat eval runs' file" in err and foreign.read_text() == '{"mine": 1}'
    assert run_cli(capsys, "eval", "runs", tmp_path / "nope", "--n", 4)[0] == 2


@pytest.mark.usefixtures("one_thread")
def test_fid_and_kid_against_ref_with_random_inception_weights(folder_runs, tmp_path, monkeypatch):
    """The --ref path end to end with torch-fidelity's Inception and random weights written to a file."""
    tfi = pytest.importorskip(
        "torch_fidelity.feature_extractor_inceptionv3", reason="torch-fidelity not installed"
    )
    from fastat.eval import EvalOptions, FIDSpec, evaluate_run

    with monkeypatch.context() as mp:  # a random state dict, built without any download
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "random-inception.pth"
    torch.save(net.state_dict(), weights)
    root, (ddpm, _) = folder_runs
    opts = EvalOptions(n=8, steps=2, fid=FIDSpec(ref=root / "ref", weights=weights))
    rep = evaluate_run(ddpm, opts, device="cpu", write=False)
    m = rep["metrics"]
    assert m["ref_images"] == 12 and "fid_note" not in m
    for key in ("fid", "kid", "data_fid", "data_kid"):
        assert math.isfinite(m[key]), key
    assert "FID / KID vs --ref (12 images)" in format_report(rep)
