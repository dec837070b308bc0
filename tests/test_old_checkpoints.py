"""Run folders written before the layout moved (``fastat/*.py`` -> ``fastat/{at,step,train,...}/``)
resume with the current code, bit for bit where the arithmetic is the same: ``tests/data/run_0221133``
is a 20-step gmm2d/MLP run made by commit 0221133; resumed there to step 30 its log read the loss in
``run_0221133.expected.json``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fastat.app.cli import main

DATA = Path(__file__).parent / "data"


def test_a_checkpoint_of_the_old_layout_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(DATA / "run_0221133", run)
    assert main(["train", "--resume", str(run), "--steps", "30", "--no-progress",
                 "--set", "run.save_every=10"]) == 0  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (last,) = [r for r in records if r["kind"] == "train" and r["step"] == 30]
    expected = json.loads((DATA / "run_0221133.expected.json").read_text())["step30_loss"]
    assert abs(last["loss"] - expected) <= 1e-6 * abs(expected)
    assert (run / "checkpoints" / "latest").read_text().strip() == "ckpt-000030"
