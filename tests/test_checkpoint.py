"""fastat.train.checkpoint: atomic writes, keep-last-K, the latest pointer, loading that never unpickles."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastat.train.checkpoint as ck
from fastat.train.checkpoint import (
    CheckpointError,
    atomic_write_text,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)


def net(seed: int = 0, hidden: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, 3))


def save(root, step, model, keep=3, **state):
    return save_checkpoint(root, step, model=model, ema=model, state={"step": step, **state}, keep=keep)


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-"))


def test_roundtrip_weights_and_state(tmp_path):
    model, ema = net(0), net(1)
    state = {"step": 7, "rng": torch.get_rng_state(), "nested": {"a": [1, 2.5, None, "x"], "b": (3, 4)}}
    path = save_checkpoint(
        tmp_path / "checkpoints", 7, model=model, ema=ema, state=state, files={"config.yaml": "a: 1\n"}
    )
    assert path.name == "ckpt-000007" and (path / "config.yaml").read_text() == "a: 1\n"
    ckpt = load_checkpoint(tmp_path)  # the run folder finds checkpoints/latest
    assert ckpt.path == path and ckpt.step == 7 and ckpt.run_dir == tmp_path
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model[k], v)
    for k, v in ema.state_dict().items():
        assert torch.equal(ckpt.ema[k], v)
    assert not torch.equal(ckpt.model["0.weight"], ckpt.ema["0.weight"])
    assert torch.equal(ckpt.state["rng"], state["rng"])
    assert ckpt.state["nested"] == {"a": [1, 2.5, None, "x"], "b": (3, 4)}
    fresh = net(5)
    load_weights(fresh, ckpt.ema)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), ema.parameters(), strict=True))


def test_keep_last_k_and_latest_pointer(tmp_path):
    root, model = tmp_path / "checkpoints", net()
    for step in (10, 20, 30, 40, 50):
        save(root, step, model, keep=2)
    assert [p.name for p in list_checkpoints(root)] == ["ckpt-000040", "ckpt-000050"]
    assert (root / "latest").read_text().strip() == "ckpt-000050"
    assert latest_checkpoint(tmp_path).name == "ckpt-000050"
    assert leftovers(root) == []
    # keep=1 still keeps the newest
    save(root, 60, model, keep=1)
    assert [p.name for p in list_checkpoints(root)] == ["ckpt-000060"]


def test_failed_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    root, model = tmp_path / "checkpoints", net()
    save(root, 10, model)
    before = sorted(p.name for p in root.iterdir())

    real = ck.write_bytes

    def broken_write(path, data):  # state.pt: half a file, then the disk "fails"
        if path.name == "state.pt":
            real(path, bytes(data)[: len(data) // 2])
            raise OSError(28, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(ck, "write_bytes", broken_write)
    with pytest.raises(OSError, match="No space") as err:
        save(root, 20, model)
    assert err.value.filename.endswith("state.pt")
    assert sorted(p.name for p in root.iterdir()) == before  # no ckpt-000020, no temp folder
    assert latest_checkpoint(tmp_path).name == "ckpt-000010"
    assert load_checkpoint(tmp_path).step == 10


def test_failed_atomic_text_write_keeps_old_content(tmp_path):
    target = tmp_path / "latest"
    atomic_write_text(target, "old\n")

    def writer(p):
        p.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        ck.atomic_write(target, writer)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_stale_temp_folder_of_a_crashed_writer_is_ignored_and_cleaned(tmp_path):
    root, model = tmp_path / "checkpoints", net()
    save(root, 10, model)
    crashed = root / f".tmp-ckpt-000020-{dead_pid()}@{socket.gethostname()}"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"garbage")
    assert latest_checkpoint(tmp_path).name == "ckpt-000010"
    save(root, 30, model)
    assert not crashed.exists()


def test_resave_same_step_replaces_it(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 10, net(0))
    save(root, 10, net(1))
    assert [p.name for p in list_checkpoints(root)] == ["ckpt-000010"]
    assert torch.equal(load_checkpoint(root).model["0.weight"], net(1).state_dict()["0.weight"])
    assert leftovers(root) == []


def test_latest_pointer_missing_or_stale_falls_back_to_highest_step(tmp_path):
    root, model = tmp_path / "checkpoints", net()
    save(root, 10, model, keep=5)
    save(root, 20, model, keep=5)
    (root / "latest").write_text("ckpt-000099\n")  # points nowhere
    assert latest_checkpoint(tmp_path).name == "ckpt-000020"
    (root / "latest").unlink()
    assert find_checkpoint(tmp_path).name == "ckpt-000020"
    assert find_checkpoint(root).name == "ckpt-000020"  # the checkpoints folder itself
    assert find_checkpoint(root / "ckpt-000010").name == "ckpt-000010"  # a checkpoint folder


def test_find_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        find_checkpoint(tmp_path)


class Evil:
    def __reduce__(self):  # would run code when unpickled
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_loading_never_unpickles_objects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "checkpoints"
    path = save(root, 10, net())
    torch.save({"step": 10, "evil": Evil()}, path / "state.pt")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_checkpoint(root)
    assert not (tmp_path / "PWNED").exists()


def test_corrupt_weights_file_is_a_clear_error(tmp_path):
    path = save(tmp_path / "checkpoints", 10, net())
    (path / "ema.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path)


def test_load_weights_mismatch_names_the_problem(tmp_path):
    small, big = net(0, hidden=5), net(0, hidden=7)
    with pytest.raises(CheckpointError, match="another shape"):
        load_weights(big, small.state_dict())
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(small, {k: v for k, v in small.state_dict().items() if k != "2.bias"})


def test_non_finite_weights_are_refused_before_anything_is_written(tmp_path):
    root, model = tmp_path / "checkpoints", net()
    save(root, 10, model)
    bad = net(1)
    with torch.no_grad():
        bad[2].bias[1] = float("inf")
    with pytest.raises(ck.NonFiniteWeights, match="not finite .*e.g. 2.bias"):
        save_checkpoint(root, 20, model=model, ema=bad, state={"step": 20})
    assert sorted(p.name for p in root.iterdir()) == ["ckpt-000010", "latest"]
    with pytest.raises(ck.NonFiniteWeights, match="the EMA weights"):
        ck.require_finite(bad.state_dict(), "the EMA weights")
    ck.require_finite(model.state_dict(), "fine")


def test_a_failed_write_names_the_checkpoint_not_its_temporary_folder(tmp_path, monkeypatch):
    def full(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(ck, "write_bytes", full)
    with pytest.raises(OSError) as err:
        save(tmp_path / "checkpoints", 3, net())
    assert err.value.filename == str(tmp_path / "checkpoints" / "ckpt-000003" / "model.safetensors")
    assert leftovers(tmp_path / "checkpoints") == []


# -- the newest complete checkpoint wins ---------------------------------------------------------------------


def test_a_kill_between_the_rename_and_the_latest_update_keeps_the_new_checkpoint(tmp_path, monkeypatch):
    """The save order: checkpoint renamed into place, then ``latest``. Killed in between, ``latest``
    names the one before; readers take the highest complete checkpoint all the same."""
    root = tmp_path / "checkpoints"
    save(root, 10, net(0))
    real = ck.atomic_write_text

    def killed(path, text):
        if path.name == "latest":
            raise KeyboardInterrupt  # the process dies here
        return real(path, text)

    monkeypatch.setattr(ck, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        save(root, 20, net(1))
    monkeypatch.setattr(ck, "atomic_write_text", real)
    assert (root / "latest").read_text().strip() == "ckpt-000010"
    assert latest_checkpoint(tmp_path).name == "ckpt-000020"
    assert torch.equal(load_checkpoint(tmp_path).model["0.weight"], net(1).state_dict()["0.weight"])


def test_no_save_replaces_a_newer_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 10, net(0), keep=5)
    save(root, 20, net(1), keep=5)
    (root / "latest").write_text("ckpt-000010\n")
    before = {p.name: p.stat().st_mtime_ns for p in (root / "ckpt-000020").iterdir()}
    for step in (15, 10):
        with pytest.raises(CheckpointError, match="holds ckpt-000020, newer than step"):
            save(root, step, net(2), keep=5)
    assert {p.name: p.stat().st_mtime_ns for p in (root / "ckpt-000020").iterdir()} == before
    assert [p.name for p in list_checkpoints(root)] == ["ckpt-000010", "ckpt-000020"]
    save(root, 30, net(2), keep=5)  # forward is fine


def test_an_incomplete_checkpoint_folder_is_passed_over(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 10, net(0), keep=5)
    save(root, 20, net(1), keep=5)
    (root / "ckpt-000020" / "model.safetensors").unlink()  # tampered with: not a complete checkpoint
    assert latest_checkpoint(tmp_path).name == "ckpt-000010"
