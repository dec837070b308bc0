"""Runs share a dataset: a second preparer of the same folder waits for the first and uses its result
(with a timeout), and a prepare killed with ``kill -9`` leaves no decode worker behind, so rerunning it
simply works. Two real processes each; the waits are bounded (a hang fails, it does not block the suite)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastat.data import DatasetError, PreparedImages, prepare
from fastat.data.sources import prepared_cache_path

GUARD_S = 120  # hang guard of every subprocess wait


def make_folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def python(script: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env, text=True, **kw)


def holder(src: Path, out: Path) -> subprocess.Popen:
    """A process that takes the prepare lock of ``out`` and holds it until a line arrives on its stdin,
    then finishes the prepare."""
    p = python(f"""
        import sys
        import fastat.data.preparation as prep
        real = prep._run
        def held(*a, **k):
            print("holding", flush=True)
            sys.stdin.readline()
            return real(*a, **k)
        prep._run = held
        prep.prepare({str(src)!r}, {str(out)!r}, 8, replace=True, progress=False, workers=1)
        print("done", flush=True)
    """, stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    assert p.stdout.readline().strip() == "holding"
    return p


def test_a_second_run_on_a_folder_being_prepared_waits_and_uses_it(tmp_path):
    src = make_folder(tmp_path / "photos", 16)
    first = holder(src, prepared_cache_path(src, 8))
    try:
        run = python(f"""
            import sys
            from fastat.app.cli import main
            sys.exit(main(["train", "--dataset", {str(src)!r}, "--image-size", "8", "--steps", "1",
                           "--batch-size", "8", "--set", "model.kwargs={{ch: 8, groups: 4}}", "--no-progress",
                           "--set", "run.sample_n=4", "--set", "run.sample_steps=2",
                           "--out", {str(tmp_path / "run")!r}]))
        """, stderr=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        said = []
        for line in run.stderr:  # until it says that it waits (then let the first one finish)
            said.append(line)
            if "waiting for it to finish" in line:
                break
        first.stdin.write("go\n")
        first.stdin.flush()
        out, err = run.communicate(timeout=GUARD_S)
        err = "".join(said) + err
        assert run.returncode == 0, err
        assert first.wait(timeout=GUARD_S) == 0 and first.stdout.read().strip() == "done"
    finally:
        for p in (first, run):
            if p.poll() is None:
                p.kill()
    lines = [ln for ln in err.splitlines() if ln.startswith("fastat")]
    assert sum("another process is preparing" in ln for ln in lines) == 1
    assert not any(ln.startswith("fastat: preparing") for ln in lines)  # the first one's result, used
    assert "trained 1 steps" in out
    assert len(PreparedImages.open(prepared_cache_path(src, 8))) == 16


def test_waiting_ends_with_one_line_after_the_timeout_or_at_once_without_wait(tmp_path):
    src = make_folder(tmp_path / "photos", 4)
    out = tmp_path / "set"
    first = holder(src, out)
    try:
        with pytest.raises(
            DatasetError, match=r"waited 0.3 s for another process preparing .*data.prepare_wait"
        ):
            prepare(src, out, 8, progress=False, wait=0.3, log=lambda msg: None)
        with pytest.raises(DatasetError, match="another fastat prepare is writing"):
            prepare(src, out, 8, progress=False)
    finally:
        first.stdin.write("go\n")
        first.stdin.flush()
        assert first.wait(timeout=GUARD_S) == 0
    assert len(prepare(src, out, 8, progress=False)) == 4  # finished by the first one: a no-op


def gone(pid: int) -> bool:
    """The process ended (no longer exists, or a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_a_prepare_leaves_no_worker_and_a_rerun_succeeds(tmp_path):
    src = make_folder(tmp_path / "photos", 12)
    out = tmp_path / "set"
    p = python(f"""
        import os, time
        import fastat.data.preparation as prep
        def stuck(paths, root, size):  # a worker that never finishes its task
            os.write(1, b"worker %d\\n" % os.getpid())  # one write: two workers share the pipe
            time.sleep(3600)
        prep._decode_files, prep.CHUNK_FILES = stuck, 2
        prep.prepare({str(src)!r}, {str(out)!r}, 8, progress=False, workers=2)
    """, stdout=subprocess.PIPE)  # fmt: skip
    workers = []
    try:
        workers = [int(p.stdout.readline().split()[1]) for _ in range(2)]
        assert all(not gone(w) for w in workers) and len(set(workers)) == 2
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=GUARD_S)
        deadline = time.monotonic() + GUARD_S
        while not all(gone(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(gone(w) for w in workers), "decode workers outlived their killed parent"
        with pytest.warns(UserWarning, match="continuing an interrupted prepare"):
            ds = prepare(src, out, 8, progress=False, workers=2)  # the same command again: it just works
        assert len(ds) == 12 and ds.verify() is None
    finally:
        for pid in workers:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        if p.poll() is None:
            p.kill()
