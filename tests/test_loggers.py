"""Where scalars and sample grids go (``run.logger``): TensorBoard, Weights & Biases, or only
``metrics.jsonl``. Stand-in modules check what each logger receives; the real packages (the ``test``
extra) are checked to write their files (W&B offline)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from train_helpers import IMAGES, assert_one_line_error, run_cli

from fastat.train.metrics import read_metrics

COMMON = [*IMAGES, "--steps", "4", "--sample-every", "2", "--save-every", "2"]


def grid_size(run) -> tuple[int, int]:
    """(height, width) of the run's sample grid PNG at step 2 (what the loggers must get)."""
    from PIL import Image

    with Image.open(run / "samples" / "step-000002.png") as im:
        return im.height, im.width


def fake_tensorboard(monkeypatch) -> list:
    calls: list = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("init", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, step, value))

        def add_image(self, tag, img, step, dataformats="CHW"):
            calls.append(("image", tag, step, img.shape, img.dtype, dataformats))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter)
    )
    return calls


def fake_wandb(monkeypatch) -> list:
    """A stand-in ``wandb`` module with the API fastat uses (init, define_metric, log, finish, Image)."""
    calls: list = []

    class Run:
        def define_metric(self, name, step_metric=None):
            calls.append(("define_metric", name, step_metric))

        def log(self, data):
            calls.append(("log", dict(data)))

        def finish(self):
            calls.append(("finish",))

    class Image:
        def __init__(self, array):
            self.array = array

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    module = types.SimpleNamespace(init=init, Image=Image)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_tensorboard_gets_the_sample_grids_as_images(tmp_path, capsys, monkeypatch):
    calls = fake_tensorboard(monkeypatch)
    run = tmp_path / "run"
    assert run_cli(capsys, "train", *COMMON, "--out", run)[0] == 0
    images = [c for c in calls if c[0] == "image"]
    # the 4 samples of 8x8 in a 2x2 grid (enlarged to be seen), as RGB: the PNG's pixels
    h, w = grid_size(run)
    assert h == w > 19
    assert images == [("image", "samples", s, (h, w, 3), np.uint8, "HWC") for s in (2, 4)]
    assert ("scalar", "train/loss", 4) in [c[:3] for c in calls]
    assert calls[-1] == ("close",)


def test_wandb_gets_the_same_scalars_and_images_and_resumes_the_same_run(tmp_path, capsys, monkeypatch):
    calls = fake_wandb(monkeypatch)
    run = tmp_path / "run"
    args = [*COMMON, "--set", "run.logger=wandb", "--set", "run.wandb_project=proj"]
    assert run_cli(capsys, "train", *args, "--steps", "2", "--out", run)[0] == 0
    assert not (run / "tb").exists()  # W&B instead of TensorBoard
    (init,) = [c[1] for c in calls if c[0] == "init"]
    assert init["project"] == "proj" and init["name"] == "run" and init["resume"] == "allow"
    assert init["config"]["run"]["logger"] == "wandb" and init["dir"] == str(run)
    run_id = (run / "wandb" / "fastat-run-id").read_text().strip()
    assert init["id"] == run_id and len(run_id) == 12
    logged = [c[1] for c in calls if c[0] == "log"]
    records = read_metrics(run)
    for rec in records:  # every record of metrics.jsonl, its numbers under kind/name at its step
        want = {f"{rec['kind']}/{k}": v for k, v in rec.items()
                if k not in ("step", "kind", "time") and isinstance(v, (int, float))}  # fmt: skip
        assert {**want, "step": rec["step"]} in logged, rec
    (image,) = [d for d in logged if "samples" in d]
    assert image["step"] == 2 and image["samples"].array.shape == (*grid_size(run), 3)
    assert calls[-1] == ("finish",)

    calls.clear()  # resumed: the same W&B run id, read from the run folder
    assert run_cli(capsys, "train", "--out", run, "--resume", "auto", "--steps", "4", "--no-progress")[0] == 0
    assert [c[1]["id"] for c in calls if c[0] == "init"] == [run_id]
    assert [d["step"] for d in (c[1] for c in calls if c[0] == "log") if "samples" in d] == [4]


def test_logger_none_trains_with_metrics_jsonl_only(tmp_path, capsys, monkeypatch):
    tb, wb = fake_tensorboard(monkeypatch), fake_wandb(monkeypatch)
    run = tmp_path / "run"
    assert run_cli(capsys, "train", *COMMON, "--set", "run.logger=none", "--out", run)[0] == 0
    assert tb == [] and wb == [] and not (run / "tb").exists() and not (run / "wandb").exists()
    assert read_metrics(run)[-1]["step"] == 4 and (run / "samples" / "step-000004.png").exists()


def test_missing_wandb_and_unknown_logger_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *COMMON, "--set", "run.logger=wandb", "--out", run)
    assert_one_line_error(code, err, "run.logger wandb needs wandb: pip install 'fastat[wandb]'")
    assert not run.exists()  # checked before anything was written
    code, _, err = run_cli(capsys, "train", *COMMON, "--set", "run.logger=mlflow", "--dry-run")
    assert_one_line_error(code, err, "run.logger")


def test_real_tensorboard_event_files_hold_the_images(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="the test extra installs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert run_cli(capsys, "train", *COMMON, "--out", run)[0] == 0
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    acc.Reload()
    h, w = grid_size(run)
    assert [(e.step, e.width, e.height) for e in acc.Images("samples")] == [(2, w, h), (4, w, h)]
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]


def test_real_wandb_offline_writes_its_run(tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb", reason="the test extra installs wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert run_cli(capsys, "train", *COMMON, "--set", "run.logger=wandb", "--out", run)[0] == 0
    (offline,) = (run / "wandb").glob("offline-run-*")
    run_id = (run / "wandb" / "fastat-run-id").read_text().strip()
    assert offline.name.endswith(run_id) and list(offline.glob("*.wandb"))
    assert list(offline.glob("files/media/images/samples_*.png"))
