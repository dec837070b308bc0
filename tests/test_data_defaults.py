"""The user's data is used as given: synthetic corruption is on by default only on the built-in known
sets; flips are opt-in; the data line says what is applied; ``config.yaml`` holds every resolved value."""

import numpy as np
import pytest
import yaml
from PIL import Image
from train_helpers import run_cli

from fastat.train.config import TrainConfig
from fastat.train.run_config import finalize, resolve_config, upgrade_saved
from fastat.train.state import build_training_data

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--set", "model.kwargs={ch: 8, groups: 4}", "--batch-size", "8", "--no-progress", "--set",
         "run.sample_n=4", "--set", "run.sample_steps=3", "--sample-every", "0", "--steps", "2"]  # fmt: skip
RESOLVED = {("data", "corrupt_frac"), ("data", "flip"), ("data", "placement"), ("model", "name"),
            ("run", "device"), ("run", "precision"), ("run", "fast"), ("run", "sample_eta")}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """24 random 10x12 PNGs: a user's own image folder."""
    src = tmp_path_factory.mktemp("mine") / "photos"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(src / f"{i:03d}.png")
    return src


BUILT_IN = [("gmm2d", 0.9), ("plane3d", 0.9), ("subspace", 0.9), ("cifar10", 0.0)]


@pytest.mark.parametrize("dataset,frac", BUILT_IN)
def test_corruption_is_on_by_default_only_for_the_built_in_sets(dataset, frac, tmp_path):
    cfg = finalize(TrainConfig().with_overrides({"data.dataset": dataset, "run.out": str(tmp_path / "r")}))
    assert (cfg.data.corrupt_frac, cfg.data.corrupt_sigma, cfg.data.flip) == (frac, 0.2, False)


def test_a_folder_is_trained_on_as_given_and_config_yaml_says_what_was_used(folder, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset", folder, "--image-size", "8", *SMALL, "--out", run)
    assert code == 0, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("fastat: data:")]
    assert "24 images 3x8x8" in line and "short side resized to 8 px, centre crop" in line
    assert "no noise added, no flips" in line and "placement device" in line
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for section, key in RESOLVED:
        assert saved[section][key] not in (None, "auto"), (section, key)
    assert saved["data"]["corrupt_frac"] == 0.0 and saved["data"]["flip"] is False
    assert (saved["run"]["device"], saved["run"]["precision"], saved["run"]["fast"]) == ("cpu", "fp32", False)
    assert saved["data"]["placement"] == "device" and saved["model"]["name"] == "tiny"
    cfg, _ = resolve_config({"run.out": str(run)}, resume="auto")  # its resume: nothing left to resolve
    assert cfg.to_dict() == saved
    td = build_training_data(cfg, progress=False)
    assert not td.corruption.active and not td.noisy_mask.any()  # the training batches are the images


def test_corruption_and_flips_on_a_folder_when_asked_are_said(folder, tmp_path, capsys):
    run = tmp_path / "run"
    asked = ["--corrupt-frac", "0.5", "--corrupt-sigma", "0.1", "--set", "data.flip=true"]
    code, _, err = run_cli(
        capsys, "train", "--dataset", folder, "--image-size", "8", *SMALL, "--out", run, *asked
    )
    assert code == 0, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("fastat: data:")]
    assert "fixed Gaussian noise (sigma 0.1) added to 12 of the 24 images (50%" in line
    assert "random horizontal flips" in line
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["data"]["corrupt_frac"], saved["data"]["flip"]) == (0.5, True)


def test_the_quickstart_says_its_corruption(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--dataset", "gmm2d", "--model", "mlp", "--set", "data.n=64",
                           "--batch-size", "8", "--steps", "1", "--no-progress", "--set", "run.eval_n=0",
                           "--out", tmp_path / "r")  # fmt: skip
    assert code == 0, err
    said = "fastat: data: gmm2d, 64 samples 2 on cpu; applied: fixed Gaussian noise (sigma 0.2) added to 58"
    assert f"{said} of the 64 samples" in err


def test_a_saved_config_from_before_opt_in_flips_keeps_its_flips():
    """``flip: null`` in a run written before flips became opt-in meant "on for real images"."""
    for dataset, flip in (("cifar10", True), ("/data/photos", True), ("subspace", False)):
        saved = {"data": {"dataset": dataset, "flip": None}, "run": {"steps": 5}}
        assert upgrade_saved(saved)["data"]["flip"] is flip
        assert saved["data"]["flip"] is None  # the input is not changed
    assert upgrade_saved({"data": {"dataset": "cifar10", "flip": False}})["data"]["flip"] is False
