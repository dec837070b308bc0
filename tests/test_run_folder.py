"""fastat.train.run_folder: one trainer per folder (lock, stale locks), ownership checks before any write,
atomic pruning that leaves other writers' temporary folders alone."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import (
    POINTS,
    assert_one_line_error,
    run_cli,
    snapshot,
)

import fastat.train.checkpoint as ck
import fastat.train.run_folder as rf
from fastat.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from fastat.train.config import ConfigError, TrainConfig
from fastat.train.metrics import read_metrics
from fastat.train.run_folder import LOCK_FILE, RunFolder, RunFolderBusy

pytestmark = pytest.mark.usefixtures("one_thread")


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# -- the lock --------------------------------------------------------------------------------------------


def test_second_open_is_refused_until_the_first_closes(tmp_path):
    run = RunFolder.open(tmp_path / "r")
    assert (tmp_path / "r" / LOCK_FILE).read_text().strip() == f"{os.getpid()}@{socket.gethostname()}"
    with pytest.raises(RunFolderBusy, match=f"in use by another trainer \\({os.getpid()}@"):
        RunFolder.open(tmp_path / "r")
    with pytest.raises(RunFolderBusy):
        RunFolder.check(tmp_path / "r")  # what --dry-run sees
    run.close()
    assert not (tmp_path / "r" / LOCK_FILE).exists()
    RunFolder.open(tmp_path / "r").close()


def test_lock_of_a_killed_trainer_is_stale(tmp_path):
    """A trainer killed with SIGKILL leaves its lock file; the kernel dropped its flock, so it is taken."""
    code = (
        "import sys, time; from fastat.train.run_folder import RunFolder; "
        f"r = RunFolder.open({str(tmp_path / 'r')!r}); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy, match=f"\\({proc.pid}@"):
            RunFolder.open(tmp_path / "r")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / "r" / LOCK_FILE).exists()  # left behind ...
    RunFolder.open(tmp_path / "r").close()  # ... and stale


def test_without_flock_the_pid_in_the_lock_file_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(rf, "fcntl", None)
    (tmp_path / "r").mkdir()
    lock = tmp_path / "r" / LOCK_FILE
    lock.write_text(f"{os.getppid()}@{socket.gethostname()}\n")  # a live process
    with pytest.raises(RunFolderBusy, match=str(os.getppid())):
        RunFolder.open(tmp_path / "r")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    lock.write_text(f"{proc.pid}@{socket.gethostname()}\n")  # a dead one
    RunFolder.open(tmp_path / "r").close()


def test_a_second_trainer_on_the_folder_exits_2_and_changes_nothing(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "r")
    before = snapshot(run)
    with RunFolder.open(run, resume=load_checkpoint(run).path):  # the first trainer
        t0 = time.perf_counter()
        code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "auto", "--steps", "6")
        assert time.perf_counter() - t0 < 10
        assert_one_line_error(code, err, "is in use by another trainer", str(os.getpid()))
        code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "auto", "--steps", "6", "--dry-run")
        assert_one_line_error(code, err, "is in use by another trainer")
    assert snapshot(run) == before


# -- ownership: nothing changes before every check has passed -----------------------------------------------


def test_resuming_into_another_runs_folder_is_refused(finished_run, tmp_path, capsys):
    a, b = copy_run(finished_run, tmp_path / "a"), copy_run(finished_run, tmp_path / "b")
    before = snapshot(b)
    code, _, err = run_cli(
        capsys, "train", "--resume", a / "checkpoints" / "ckpt-000002", "--out", b, "--steps", "6"
    )
    assert_one_line_error(code, err, "holds another run's checkpoints", "new --out")
    assert snapshot(b) == before


def test_resuming_an_older_checkpoint_of_the_run_is_refused(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "r")
    before = snapshot(run)
    code, _, err = run_cli(capsys, "train", "--resume", run / "checkpoints" / "ckpt-000002", "--steps", "6")
    assert_one_line_error(code, err, "older than the run's newest checkpoint ckpt-000004")
    assert snapshot(run) == before


def test_steps_below_the_checkpoint_is_an_error(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "r")
    before = snapshot(run)
    for extra in ([], ["--dry-run"]):
        code, _, err = run_cli(capsys, "train", "--resume", run, "--steps", "3", *extra)
        assert_one_line_error(code, err, "--steps 3 is below the step of the checkpoint", "step 4")
    assert snapshot(run) == before


def test_a_resume_that_fails_late_changes_nothing(finished_run, tmp_path, capsys):
    """The checkpoint's optimizer state does not fit: found after data and model are built, before any
    write (the config used to be rewritten first)."""
    run = copy_run(finished_run, tmp_path / "r")
    ckpt = load_checkpoint(run)
    state = dict(ckpt.state, optimizer={"state": {}, "param_groups": []})
    torch.save(state, ckpt.path / "state.pt")
    (run / "config.yaml").write_text(ckpt.path.joinpath("config.yaml").read_text())
    before = snapshot(run)
    code, _, err = run_cli(capsys, "train", "--resume", run, "--steps", "6", "--lr", "0.5")
    assert_one_line_error(code, err, "does not fit this run")
    assert snapshot(run) == before


def test_a_refused_fresh_start_leaves_no_folder_behind(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *POINTS, "--batch-size", "128", "--out", tmp_path / "new" / "r")
    assert_one_line_error(code, err, "larger than the dataset")
    assert not (tmp_path / "new").exists()


def test_branching_a_checkpoint_into_a_new_folder(finished_run, tmp_path, capsys):
    src = finished_run / "checkpoints" / "ckpt-000002"
    before = snapshot(finished_run)
    code, out, err = run_cli(capsys, "train", "--resume", src, "--out", tmp_path / "b", "--steps", "4")
    assert code == 0, err
    assert snapshot(finished_run) == before  # the source run is only read
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["ckpt-000004"]
    assert [r["step"] for r in read_metrics(tmp_path / "b") if r["kind"] == "train"] == [4]
    # branching at the checkpoint's own step still writes a checkpoint into the new folder
    code, _, err = run_cli(capsys, "train", "--resume", src, "--out", tmp_path / "c", "--steps", "2")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "c").step == 2


def test_a_run_that_died_before_its_first_checkpoint_restarts_cleanly(tmp_path, capsys):
    """Its metrics records are dropped, not duplicated (what an early kill used to leave)."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text(TrainConfig().to_yaml())  # the first write of a run
    (run / "metrics.jsonl").write_text('{"step": 2, "kind": "train", "loss": 1.0}\n')
    assert run_cli(capsys, "train", *POINTS, "--steps", "4", "--out", run, "--resume", "auto")[0] == 0
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [2, 4]


def test_check_reports_a_path_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"):
        RunFolder.check(tmp_path / "f" / "run")


# -- pruning ------------------------------------------------------------------------------------------------


def net():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def test_pruning_keeps_a_live_writers_temp_folder_and_removes_dead_ones(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, model=net(), ema=net(), state={"step": 1})
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = socket.gethostname()
    live = root / f".tmp-ckpt-000009-{os.getppid()}@{host}"  # another trainer, writing right now
    dead = root / f".tmp-ckpt-000008-{proc.pid}@{host}"
    remote = root / f".tmp-ckpt-000007-{proc.pid}@another-host"  # cannot be checked: left alone
    trash = root / f".trash-ckpt-000000-{proc.pid}@{host}"  # a pruning that was killed half-way
    for d in (live, dead, remote, trash):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    save_checkpoint(root, 2, model=net(), ema=net(), state={"step": 2}, keep=1)
    names = sorted(p.name for p in root.iterdir())
    assert names == sorted(["ckpt-000002", "latest", live.name, remote.name])


def test_a_crash_during_pruning_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        save_checkpoint(root, step, model=net(), ema=net(), state={"step": step}, keep=5)
    real = shutil.rmtree

    def killed_half_way(path, ignore_errors=False):
        if not os.path.exists(path):
            return
        first = sorted(os.listdir(path))[0]
        os.unlink(os.path.join(path, first))
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(ck.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        ck.prune_checkpoints(root, keep=1)
    monkeypatch.setattr(ck.shutil, "rmtree", real)
    assert [p.name for p in list_checkpoints(root)] == ["ckpt-000002"]  # ckpt-000001 is gone whole
    assert load_checkpoint(root).step == 2
    assert any(p.name.startswith(".trash-ckpt-000001") for p in root.iterdir())
    save_checkpoint(root, 3, model=net(), ema=net(), state={"step": 3}, keep=5)  # cleans it
    assert not any(p.name.startswith(".trash-") for p in root.iterdir())


# -- a run folder is only ever a run folder ----------------------------------------------------------------


@pytest.mark.parametrize("args", [[], ["--dry-run"], ["--resume", "auto"]])
def test_a_fresh_run_refuses_a_folder_that_is_not_a_run(tmp_path, capsys, args):
    """The user's files in --out (a config.yaml, a samples/step-000020.npy) are never replaced."""
    u = tmp_path / "u"
    (u / "samples").mkdir(parents=True)
    (u / "config.yaml").write_text("mine\n")
    (u / "samples" / "step-000020.npy").write_text("x\n")
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "train", *POINTS, "--steps", "20", "--out", u, *args)
    assert_one_line_error(code, err, "is not empty and is not a fastat run", "config.yaml, samples")
    assert snapshot(tmp_path) == before


def test_branching_into_a_folder_of_user_files_is_refused(finished_run, tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    ckpt = finished_run / "checkpoints" / "ckpt-000002"
    code, _, err = run_cli(capsys, "train", "--resume", ckpt, "--out", tmp_path / "b", "--steps", "4")
    assert_one_line_error(code, err, "is not a fastat run", "notes.txt")
    assert snapshot(tmp_path) == before


def test_an_empty_folder_or_a_stale_lock_is_taken(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / LOCK_FILE).write_text("1@nowhere\n")
    assert RunFolder.check(tmp_path / "r") == tmp_path / "r"
    assert not rf.is_run_folder(tmp_path / "r")
    (tmp_path / "r" / "config.yaml").write_text(TrainConfig().to_yaml())
    assert rf.is_run_folder(tmp_path / "r")


def test_a_run_that_fails_in_its_first_step_writes_nothing(tmp_path, capsys, monkeypatch):
    """config.yaml is written with the first record or checkpoint, after a step has run."""
    import fastat.train.loop as loop

    def fail(engine, x0, *, lr):
        raise loop.TrainingError("the first step failed")

    monkeypatch.setattr(loop, "train_step", fail)
    u = tmp_path / "u"
    u.mkdir()
    code, _, err = run_cli(capsys, "train", *POINTS, "--steps", "4", "--out", u)
    assert code != 0 and "the first step failed" in err
    assert list(u.iterdir()) == []
    code, _, err = run_cli(capsys, "train", *POINTS, "--steps", "4", "--out", tmp_path / "new")
    assert code != 0 and not (tmp_path / "new").exists()


def test_a_resume_that_fails_in_its_first_step_leaves_the_run_as_it_was(finished_run, tmp_path, capsys,
                                                                        monkeypatch):  # fmt: skip
    """config.yaml (and metrics.jsonl) keep what the run wrote: the new settings never reach the folder."""
    import fastat.train.loop as loop

    def fail(engine, x0, *, lr):
        raise loop.TrainingError("the first step failed")

    monkeypatch.setattr(loop, "train_step", fail)
    run = copy_run(finished_run, tmp_path / "r")
    before = snapshot(run)
    code, _, err = run_cli(capsys, "train", "--resume", run, "--steps", "8", "--lr", "0.5")
    assert code != 0 and "the first step failed" in err
    assert snapshot(run) == before


def test_a_sample_path_taken_by_a_folder_is_refused(tmp_path):
    with RunFolder.open(tmp_path / "r") as run:
        run.start("run: {}\n", step=0)
        (tmp_path / "r" / "samples" / "step-000002.png").mkdir(parents=True)
        with pytest.raises(ConfigError, match="in the way"):
            run.samples_file(2, ".png")
        assert run.samples_file(4, ".png").name == "step-000004.png"


# -- locks that hold ---------------------------------------------------------------------------------------


def test_a_deleted_lock_file_admits_no_second_trainer(tmp_path, capsys):
    """Two processes: the first holds the folder; deleting RUN/.lock does not let the second in."""
    code = (
        "import sys, time; from fastat.train.run_folder import RunFolder; "
        f"r = RunFolder.open({str(tmp_path / 'r')!r}); print('locked', flush=True); sys.stdin.readline()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "locked"
        (tmp_path / "r" / LOCK_FILE).unlink()
        with pytest.raises(RunFolderBusy, match="in use by another trainer"):
            RunFolder.open(tmp_path / "r")
        with pytest.raises(RunFolderBusy):
            RunFolder.check(tmp_path / "r")
        code_, _, err = run_cli(capsys, "train", *POINTS, "--steps", "2", "--out", tmp_path / "r")
        assert_one_line_error(code_, err, "is in use by another trainer")
        assert not (tmp_path / "r" / LOCK_FILE).exists()  # the refused trainer wrote nothing
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    RunFolder.open(tmp_path / "r").close()  # released with its process


# -- the newest complete checkpoint wins -------------------------------------------------------------------


def test_resume_auto_takes_the_highest_checkpoint_when_latest_is_behind(finished_run, tmp_path, capsys):
    """What a kill between the checkpoint's rename and the ``latest`` update leaves: ckpt-000004 in
    place, ``latest`` naming ckpt-000002. The resume continues 4 and never rewrites it with other
    weights; the explicit older checkpoint is refused."""
    run = copy_run(finished_run, tmp_path / "r")
    (run / "checkpoints" / "latest").write_text("ckpt-000002\n")
    newest = snapshot(run / "checkpoints" / "ckpt-000004")
    code, _, err = run_cli(capsys, "train", "--resume", run / "checkpoints" / "ckpt-000002", "--steps", "6")
    assert_one_line_error(code, err, "older than the run's newest checkpoint ckpt-000004")
    code, out, err = run_cli(capsys, "train", "--out", run, "--resume", "auto", "--steps", "6")
    assert code == 0, err
    assert load_checkpoint(run).step == 6 and (run / "checkpoints" / "latest").read_text() == "ckpt-000006\n"
    assert snapshot(run / "checkpoints" / "ckpt-000004") == newest
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [2, 4, 6]
