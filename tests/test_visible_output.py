"""What a run shows: sample grids of small images enlarged to be seen, a resume that says where it
starts, and a closing line that counts the steps of this call (torchrun's line: test_distributed.py)."""

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import IMAGES, run_cli

from fastat.train.samples import GRID_MIN_PX, save_grid

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_grid_of_small_images_is_enlarged_by_nearest_neighbour(tmp_path):
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = Image.open(save_grid(x, tmp_path / "g.png"))
    assert min(grid.size) >= GRID_MIN_PX  # was 73 x 73
    # factor 4: sample 0 is the 32x32 square at (1, 1), each of its pixels a constant 4x4 block
    a = torch.from_numpy(np.array(grid)).permute(2, 0, 1)[:, 1:33, 1:33]
    expected = (
        (x[0] * 255 + 0.5).clamp(0, 255).to(torch.uint8).repeat_interleave(4, 1).repeat_interleave(4, 2)
    )
    assert torch.equal(a, expected)


def test_a_grid_of_large_images_keeps_its_size(tmp_path):
    x = torch.rand(4, 3, 160, 160)
    assert Image.open(save_grid(x, tmp_path / "g.png")).size == (2 * 161 + 1, 2 * 161 + 1)


def test_a_resume_says_where_it_starts_and_counts_the_steps_of_this_call(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", *IMAGES, "--set", "run.eval_n=0", "--out", out]
    code, stdout, err = run_cli(capsys, *common, "--steps", "2")
    assert code == 0, err
    assert "trained 2 steps (steps 1..2)" in stdout and "resuming" not in err
    code, stdout, err = run_cli(capsys, *common, "--steps", "5", "--resume", "auto")
    assert code == 0, err
    assert f"fastat: resuming {out} from step 2 (ckpt-000002)" in err.splitlines()
    assert "trained 3 steps (steps 3..5) on cpu" in stdout
