"""``fastat train --dry-run`` builds the model on the ``meta`` device: bad model arguments fail there with
the message of the real run, and nothing is written."""

import pytest
from train_helpers import assert_one_line_error, run_cli

from fastat.train.state import build_checked_model

BAD = [
    ["--set", 'model.kwargs.ch_mult=[1, "two"]'],
    ["--set", "model.kwargs.groups=5"],  # does not divide the channels
    ["--model", "diffusers", "--set", "model.kwargs.block_out_channels=[8, 16, 32]"],  # 4 block types
]


@pytest.mark.parametrize("flags", BAD, ids=["ch_mult", "groups", "diffusers-blocks"])
def test_dry_run_refuses_bad_model_kwargs_as_the_real_run_does(tmp_path, capsys, flags):
    if "diffusers" in flags:
        pytest.importorskip("diffusers", reason="diffusers not installed (pip install -e '.[test]')")
    out = tmp_path / "run"
    common = ["train", *flags, "--steps", "1", "--no-progress", "--out", out]
    code, _, dry = run_cli(capsys, *common, "--dry-run")
    assert_one_line_error(code, dry, "cannot build model")
    code, _, real = run_cli(capsys, *common)
    assert_one_line_error(code, real, "cannot build model")
    assert dry == real
    assert not out.exists()


def test_a_good_model_passes_the_dry_run_and_its_meta_build_holds_no_weights(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--model", "cifar10", "--image-size", "32", "--dry-run",
                           "--out", tmp_path / "run")  # fmt: skip
    assert code == 0, err
    model = build_checked_model({"name": "lsun256", "kwargs": {}}, "meta")  # 114M parameters, no memory
    assert {p.device.type for p in model.parameters()} == {"meta"}
