"""The ``fastat`` command line: help, --dry-run, config layering, ``fastat sample``, and every bad input
reported as one line on stderr with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from train_helpers import IMAGES, POINTS, assert_one_line_error, run_cli

from fastat.train.config import TrainConfig


@pytest.fixture(autouse=True)
def one_thread():
    """See test_train.py: one intra-op thread keeps tiny-model tests fast on a loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "img"
    from fastat.app.cli import main

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # T = 100 keeps DDPM sampling (all T steps) cheap
        assert main(["train", *IMAGES, "--steps", "3", "--set", "objective.T=100", "--out", str(run)]) == 0
    finally:
        torch.set_num_threads(n)
    return run


@pytest.fixture(scope="module")
def points_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "pts"
    from fastat.app.cli import main

    assert main(["train", *POINTS, "--steps", "3", "--out", str(run)]) == 0
    return run


# -- help and dry run ------------------------------------------------------------------------------------


def test_help_lists_train_and_sample(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "train" in out and "sample" in out
    code, out, _ = run_cli(capsys, "train", "--help")
    for flag in (
        "--dataset",
        "--data-root",
        "--mode",
        "--model",
        "--steps",
        "--batch-size",
        "--lr",
        "--lam",
        "--out",
        "--resume",
        "--seed",
        "--device",
        "--precision",
        "--corrupt-frac",
        "--corrupt-sigma",
        "--save-every",
        "--sample-every",
        "--dry-run",
        "--config",
    ):
        assert flag in out, flag


def test_dry_run_prints_the_resolved_default_config_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "train", "--dry-run")
    assert code == 0 and "nothing was written" in err
    cfg = TrainConfig.from_dict(yaml.safe_load(out))
    assert (cfg.data.dataset, cfg.model.name, cfg.objective.mode) == ("subspace", "tiny", "adv")
    assert (cfg.data.corrupt_frac, cfg.data.corrupt_sigma) == (0.9, 0.2)
    assert cfg.model.kwargs == {"in_channels": 3, "image_size": 8}  # the quickstart: 3x8x8 subspace images
    assert (cfg.run.steps, cfg.optim.schedule, cfg.run.sample_eta) == (1000, "constant", 1.0)
    assert cfg.run.out.startswith("runs/") and cfg.run.out.endswith("-subspace-adv")
    assert list(tmp_path.iterdir()) == []


def test_a_leading_separator_is_dropped(tmp_path, capsys, monkeypatch):
    """`torchrun ... -m fastat -- train ...`: a launcher that keeps the `--` still reaches the command."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "--", "train", "--dry-run", "--mode", "ddpm")
    assert code == 0 and TrainConfig.from_dict(yaml.safe_load(out)).objective.mode == "ddpm"


def test_config_file_then_set_then_flags(tmp_path, capsys):
    f = tmp_path / "exp.yaml"
    f.write_text("run:\n  steps: 5\n  batch_size: 16\noptim:\n  lr: 1e-3\nobjective:\n  mode: pgd\n")
    code, out, _ = run_cli(
        capsys,
        "train",
        "--config",
        f,
        "--set",
        "run.batch_size=32",
        "--steps",
        "7",
        "--dataset",
        "gmm2d",
        "--set",
        "objective.rho=2",
        "--dry-run",
    )
    cfg = TrainConfig.from_dict(yaml.safe_load(out))
    assert code == 0
    assert cfg.run.steps == 7 and cfg.run.batch_size == 32 and cfg.optim.lr == 1e-3
    assert cfg.objective.mode == "pgd" and cfg.objective.rho == 2.0 and cfg.model.name == "mlp"


def test_run_folder_holds_the_resolved_config(image_run):
    cfg = TrainConfig.from_yaml(image_run / "config.yaml")
    assert cfg.run.out == str(image_run) and cfg.run.steps == 3 and cfg.model.kwargs["ch"] == 8
    assert cfg.data.image_size == 8


# -- fastat sample -----------------------------------------------------------------------------------------


def test_gain_line_says_what_was_gained_and_its_baseline_command_runs(image_run, capsys):
    from types import SimpleNamespace

    from fastat.app.eval_cli import gain_line

    cfg = TrainConfig.from_yaml(image_run / "config.yaml")
    res = SimpleNamespace(run_dir=image_run, eval={"dist_samples": 0.15, "dist_data": 0.2})
    line = gain_line(res, cfg)
    assert line.startswith("adv: samples 0.1500 (RMS/pixel), 25% closer to the clean support than the training")
    assert "(0.2000); the DDPM baseline on the same data: fastat train --config " in line
    worse = gain_line(SimpleNamespace(run_dir=image_run, eval={"dist_samples": 0.3, "dist_data": 0.2}), cfg)
    assert "50% farther from the clean support" in worse
    assert gain_line(SimpleNamespace(run_dir=image_run, eval={}), cfg) is None
    cmd = line.split(": fastat ", 1)[1].split()
    code, out, _ = run_cli(capsys, *cmd, "--dry-run")
    base = TrainConfig.from_dict(yaml.safe_load(out))
    assert code == 0 and base.objective.mode == "ddpm" and base.run.out == f"{image_run}-ddpm"
    assert (base.data, base.model, base.optim, base.run.seed) == (cfg.data, cfg.model, cfg.optim, cfg.run.seed)


def test_sample_npy_of_images_is_float32_nchw_in_unit_range(image_run, tmp_path, capsys):
    out = tmp_path / "s.npy"
    code, stdout, err = run_cli(
        capsys, "sample", "--run", image_run, "--n", "5", "--steps", "4", "--out", out
    )
    assert code == 0, err
    assert stdout.strip() == str(out)
    x = np.load(out)
    assert x.shape == (5, 3, 8, 8) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 1 and x.std() > 0
    # same seed, same samples; another seed, others
    assert (
        run_cli(
            capsys, "sample", "--run", image_run, "--n", "5", "--steps", "4", "--out", tmp_path / "t.npy"
        )[0]
        == 0
    )
    assert np.array_equal(x, np.load(tmp_path / "t.npy"))
    run_cli(
        capsys,
        "sample",
        "--run",
        image_run,
        "--n",
        "5",
        "--steps",
        "4",
        "--seed",
        "1",
        "--out",
        tmp_path / "u.npy",
    )
    assert not np.array_equal(x, np.load(tmp_path / "u.npy"))


def test_sample_png_grid_and_default_path(image_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert run_cli(capsys, "sample", "--run", image_run, "--n", "9", "--steps", "2", "--out", out)[0] == 0
    with Image.open(out) as im:
        assert im.size == (3 * 88 + 4, 3 * 88 + 4)  # 3 x 3 grid of 8 px enlarged 11x (>= 256 px), padding 1
    code, stdout, _ = run_cli(
        capsys, "sample", "--run", image_run, "--n", "4", "--sampler", "ddpm", "--out", tmp_path / "ddpm.npy"
    )
    assert code == 0 and np.isfinite(np.load(tmp_path / "ddpm.npy")).all()
    code, stdout, _ = run_cli(capsys, "sample", "--run", image_run, "--n", "4", "--steps", "2")
    assert code == 0 and stdout.strip() == str(image_run / "samples" / "sample-000003.png")


def test_sample_npy_of_points_is_in_data_units(points_run, tmp_path, capsys):
    out = tmp_path / "p.npy"
    assert run_cli(capsys, "sample", "--run", points_run, "--n", "64", "--steps", "3", "--out", out)[0] == 0
    x = np.load(out)
    assert x.shape == (64, 2) and x.dtype == np.float32
    assert x.min() < 0  # not mapped to [0, 1]


def test_sample_with_raw_weights_differs_from_ema(image_run, tmp_path, capsys):
    a, b = tmp_path / "ema.npy", tmp_path / "raw.npy"
    run_cli(capsys, "sample", "--run", image_run, "--n", "2", "--steps", "2", "--out", a)
    run_cli(capsys, "sample", "--run", image_run, "--n", "2", "--steps", "2", "--no-ema", "--out", b)
    assert not np.array_equal(np.load(a), np.load(b))


def test_sample_never_replaces_a_file_unless_told(image_run, tmp_path, capsys):
    out = tmp_path / "mine.npy"
    out.write_bytes(b"the user's bytes")
    code, _, err = run_cli(capsys, "sample", "--run", image_run, "--n", "2", "--steps", "2", "--out", out)
    assert_one_line_error(code, err, "exists", "--overwrite")
    assert out.read_bytes() == b"the user's bytes"
    code, _, err = run_cli(capsys, "sample", "--run", image_run, "--n", "2", "--steps", "2", "--out", out,
                           "--overwrite")  # fmt: skip
    assert code == 0, err
    assert np.load(out).shape == (2, 3, 8, 8)


# -- bad input: one line, exit 2 --------------------------------------------------------------------------


def _bad_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("run:\n  steps: [1, 2\n")
    return ["--config", f]


def _unknown_key(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("run:\n  stepz: 3\n")
    return ["--config", f]


def _empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return ["--dataset", tmp_path / "empty", "--image-size", "8"]


def _small_folder(tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    for i in range(2):
        Image.fromarray(np.full((10, 10, 3), 40 * i + 20, np.uint8)).save(d / f"{i}.png")
    return ["--dataset", d, "--image-size", "8", "--batch-size", "4", "--out", tmp_path / "o"]


def _out_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    return [*POINTS, "--out", tmp_path / "afile" / "run"]


BAD = {
    "unknown dataset": (lambda p: ["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    "unknown mode": (lambda p: ["--mode", "fgsm"], "unknown objective.mode"),
    "unknown model": (lambda p: ["--model", "resnet"], "unknown model.name"),
    "missing folder": (
        lambda p: ["--dataset", p / "no" / "such", "--image-size", "8"],
        "not an existing folder",
    ),
    "folder without size": (lambda p: ["--dataset", p], "image-size"),
    "empty folder": (_empty_folder, "no readable images"),
    "bad yaml": (_bad_yaml, "bad YAML"),
    "missing yaml": (lambda p: ["--config", p / "nope.yaml"], "cannot read config file"),
    "unknown key": (_unknown_key, "unknown config key run.stepz; valid keys in run: out, steps"),
    "unknown --set key": (lambda p: ["--set", "objective.radius=1"], "unknown config key objective.radius"),
    "negative radius": (lambda p: ["--set", "objective.r_min=-0.1"], "objective.r_min"),
    "negative lam": (lambda p: ["--lam", "-0.5"], "objective.lam"),
    "zero reg_frac": (lambda p: ["--reg-frac", "0"], "objective.reg_frac (--reg-frac) must be a fraction"),
    "zero replays": (lambda p: ["--mode", "free", "--replays", "0"], "objective.replays (--replays) must be an"),
    "lam_s_min 1": (lambda p: ["--set", "objective.lam_s_min=1"], "objective.lam_s_min must be a noise"),
    "bad number": (lambda p: ["--set", "optim.lr=fast"], "optim.lr must be a number"),
    "batch > known data": (lambda p: ["--batch-size", "5000"], "larger than the dataset"),
    "batch > folder": (_small_folder, "larger than the dataset (2 samples)"),
    "unwritable out": (_out_under_a_file, "cannot write to the run folder"),
    "unknown flag": (lambda p: ["--stepz", "3"], "unrecognized arguments"),
    "non-int flag": (lambda p: ["--steps", "many"], "invalid int value"),
    "precision typo": (lambda p: ["--precision", "fp8"], "unknown run.precision"),
    "bad device": (lambda p: ["--device", "tpu"], "run.device"),
    "resume missing": (lambda p: ["--resume", p / "nothing"], "does not exist"),
    "points with unet": (lambda p: ["--dataset", "plane3d", "--model", "tiny"], "use --model mlp"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    make_args, needle = BAD[case]
    code, _, err = run_cli(capsys, "train", *make_args(tmp_path))
    assert_one_line_error(code, err, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys):
    code, _, err = run_cli(capsys, "train", "--device", "cuda", "--dry-run")
    assert_one_line_error(code, err, "CUDA is not available")


def test_resume_with_a_different_model_is_refused(points_run, capsys):
    code, _, err = run_cli(
        capsys,
        "train",
        "--resume",
        points_run,
        "--steps",
        "6",
        "--set",
        "model.kwargs={hidden: 16, depth: 1, time_dim: 16}",
    )
    assert_one_line_error(code, err, "cannot resume", "mlp(depth=1, dim=2, hidden=32")


def test_training_into_an_existing_run_needs_resume(points_run, capsys):
    code, _, err = run_cli(capsys, "train", *POINTS, "--steps", "6", "--out", points_run)
    assert_one_line_error(code, err, "already holds checkpoints", "--resume auto")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--out", "x.jpg"], "must end in .png or .npy"),
        (["--n", "0"], "--n must be >= 1"),
        (["--steps", "500"], "--steps must be <= T = 100"),
    ],
)
def test_sample_bad_input(image_run, capsys, args, needle):
    code, _, err = run_cli(capsys, "sample", "--run", image_run, *args)
    assert_one_line_error(code, err, needle)


def test_sample_without_a_run(tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", "--run", tmp_path)
    assert_one_line_error(code, err, "holds no checkpoint")


def test_a_real_process_reports_bad_input_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastat",
            "train",
            "--dataset",
            str(tmp_path / "missing"),
            "--image-size",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(proc.returncode, proc.stderr, "not an existing folder")


def test_points_get_a_scatter_png_when_matplotlib_is_installed(points_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert (points_run / "samples" / "step-000003.png").is_file()  # written by training beside the .npy
    out = tmp_path / "scatter.png"
    assert run_cli(capsys, "sample", "--run", points_run, "--n", "32", "--steps", "2", "--out", out)[0] == 0
    with Image.open(out) as im:
        assert im.size == (500, 500) and np.asarray(im).std() > 0


def test_points_png_without_matplotlib_is_a_clear_error(points_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = run_cli(capsys, "sample", "--run", points_run, "--out", tmp_path / "p.png")
    assert_one_line_error(code, err, "needs matplotlib", ".npy")
    assert not (tmp_path / "p.png").exists()


def test_bench_subcommand_has_its_own_options(capsys):
    code, out, _ = run_cli(capsys, "bench", "--help")
    assert code == 0 and "--batch-size" in out and "naive" in out
    code, _, err = run_cli(capsys, "bench", "--model", "huge", "--device", "cpu")
    assert_one_line_error(code, err, "unknown model preset 'huge'")


def test_train_threads_one_on_the_built_in_sets_unless_chosen(monkeypatch):
    """`fastat train` on a built-in set on the CPU runs one torch thread (faster for its small models);
    --threads and OMP_NUM_THREADS win; real image sets keep torch's default."""
    from fastat.app import commands

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = TrainConfig().with_overrides({"run.device": "cpu"})
    commands._cpu_threads(None, cpu)
    commands._cpu_threads(3, cpu)
    commands._cpu_threads(None, cpu.with_overrides({"data.dataset": "cifar10"}))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    commands._cpu_threads(None, cpu)
    assert calls == [1, 3]
