"""Reliability: bad input of every kind is one line and exit 2 with nothing changed on disk; killed
runs resume bit-exactly; a run that goes non-finite keeps its good model; a full disk is one line.

The table of bad inputs runs ``fastat`` in-process against a copy of a finished run and snapshots every
file under the test's folder before and after: a refused command must leave all of it as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from train_helpers import (
    POINTS,
    assert_one_line_error,
    run_cli,
    snapshot,
    without_notes,
)

from fastat import ATObjective, NoiseSchedule
from fastat.at import ops
from fastat.train.checkpoint import list_checkpoints, load_checkpoint
from fastat.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def poison(ckpt, which: str = "ema") -> None:
    """Put a NaN into one tensor of a checkpoint's weights (keeping the file's metadata)."""
    f = ckpt / f"{which}.safetensors"
    with safe_open(f, "pt") as h:
        meta = h.metadata()
        tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118 - safe_open has no __iter__
    k = sorted(tensors)[0]
    tensors[k] = tensors[k].clone()
    tensors[k].view(-1)[0] = float("nan")
    save_file(tensors, f, metadata=meta)


# -- the table ---------------------------------------------------------------------------------------------
# Each case: (tmp, run) -> argv, run a copy of `finished_run` under tmp; and a phrase the line must hold.


def _write(tmp, name, text):
    f = tmp / name
    f.write_text(text)
    return f


def _folder(tmp, files: dict[str, bytes]):
    d = tmp / "imgs"
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def _png(value: int = 128) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((10, 10, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _ckpt(run):
    return load_checkpoint(run).path


def _corrupt(run, name, data: bytes):
    (_ckpt(run) / name).write_bytes(data)
    return run


def _truncate(run, name):
    f = _ckpt(run) / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return run


def _evil_state(run):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"step": 4, "evil": Evil()}, _ckpt(run) / "state.pt")
    return run


def _nan_weights(run, which="ema"):
    poison(_ckpt(run), which)
    return run


T = ["train", "--no-progress"]
S = ["sample", "--steps", "2", "--n", "4", "--out", "s.npy"]  # (relative: the test's folder)

CASES = {
    # train: flags and values
    "unknown dataset": (lambda t, r: [*T, "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    "unknown mode": (lambda t, r: [*T, "--mode", "fgsm"], "unknown objective.mode"),
    "unknown model": (lambda t, r: [*T, "--model", "resnet"], "unknown model.name"),
    "zero steps": (lambda t, r: [*T, "--steps", "0"], "run.steps"),
    "non-int steps": (lambda t, r: [*T, "--steps", "many"], "invalid int value"),
    "zero batch": (lambda t, r: [*T, "--batch-size", "0"], "run.batch_size"),
    "negative lr": (lambda t, r: [*T, "--lr", "-1"], "optim.lr"),
    "nan lr": (lambda t, r: [*T, "--set", "optim.lr=nan"], "optim.lr"),
    "negative lam": (lambda t, r: [*T, "--lam", "-0.5"], "objective.lam"),
    "bad precision": (lambda t, r: [*T, "--precision", "fp64"], "unknown run.precision"),
    "bad device": (lambda t, r: [*T, "--device", "tpu"], "run.device"),
    "negative seed": (lambda t, r: [*T, "--seed", "-1"], "run.seed"),
    "huge seed": (lambda t, r: [*T, "--seed", str(2**64)], "run.seed"),
    "zero image size": (lambda t, r: [*T, "--image-size", "0"], "data.image_size"),
    "huge image size": (lambda t, r: [*T, "--image-size", "100000"], "--image-size"),
    "image size for points": (lambda t, r: [*T, "--dataset", "gmm2d", "--image-size", "8"], "points"),
    "--set type under a flag": (lambda t, r: [*T, "--set", "run.steps=abc", "--steps", "5"], "run.steps"),
    "--set without =": (lambda t, r: [*T, "--set", "run.steps"], "KEY=VALUE"),
    "--set unknown key": (lambda t, r: [*T, "--set", "objective.radius=1"], "unknown config key"),
    "kwargs not a mapping": (lambda t, r: [*T, "--set", "model.kwargs=3"], "must be a mapping"),
    "corrupt frac > 1": (lambda t, r: [*T, "--corrupt-frac", "1.5"], "data.corrupt_frac"),
    "ema decay 1": (lambda t, r: [*T, "--set", "ema.decay=1"], "ema.decay"),
    "one beta": (lambda t, r: [*T, "--set", "optim.betas=[0.9]"], "optim.betas"),
    "sample steps > T": (lambda t, r: [*T, "--set", "run.sample_steps=5000"], "run.sample_steps"),
    "keep 0": (lambda t, r: [*T, "--keep", "0"], "run.keep"),
    "log every 0": (lambda t, r: [*T, "--log-every", "0"], "run.log_every"),
    "max skipped 0": (lambda t, r: [*T, "--set", "run.max_skipped=0"], "run.max_skipped"),
    "unknown flag": (lambda t, r: [*T, "--stepz", "3"], "unrecognized arguments"),
    "out under a file": (lambda t, r: [*T, *POINTS, "--out", _write(t, "f", "x") / "run"], "not a folder"),
    "dry run, out under a file": (
        lambda t, r: [*T, "--dry-run", "--out", _write(t, "f", "x") / "run"],
        "not a folder",
    ),
    # train: resume and run-folder ownership
    "resume missing": (lambda t, r: [*T, "--resume", t / "nothing"], "does not exist"),
    "resume older checkpoint": (
        lambda t, r: [*T, "--resume", r / "checkpoints" / "ckpt-000002", "--steps", "8"],
        "older than the run's newest",
    ),
    "resume into another run": (
        lambda t, r: [
            *T,
            "--resume",
            shutil.copytree(r, t / "a") / "checkpoints" / "ckpt-000002",
            "--out",
            r,
            "--steps",
            "8",
        ],  # fmt: skip
        "holds another run's checkpoints",
    ),
    "resume steps below": (lambda t, r: [*T, "--resume", r, "--steps", "3"], "--steps 3 is below"),
    "fresh run over a run": (lambda t, r: [*T, *POINTS, "--out", r], "already holds checkpoints"),
    "resume another model": (
        lambda t, r: [*T, "--resume", r, "--steps", "8", "--set", "model.kwargs.hidden=16"],
        "cannot resume",
    ),
    "resume NaN weights": (lambda t, r: [*T, "--resume", _nan_weights(r), "--steps", "8"], "not finite"),
    # YAML
    "bad yaml": (lambda t, r: [*T, "--config", _write(t, "c.yaml", "run:\n  steps: [1, 2\n")], "bad YAML"),
    "yaml list": (lambda t, r: [*T, "--config", _write(t, "c.yaml", "- 1\n- 2\n")], "must hold a mapping"),
    "yaml unknown section": (lambda t, r: [*T, "--config", _write(t, "c.yaml", "trainer: {}\n")], "section"),
    "yaml unknown key": (
        lambda t, r: [*T, "--config", _write(t, "c.yaml", "run:\n  stepz: 3\n")],
        "unknown config key run.stepz",
    ),
    "yaml section not a mapping": (lambda t, r: [*T, "--config", _write(t, "c.yaml", "run: 5\n")], "mapping"),
    "yaml wrong type": (
        lambda t, r: [*T, "--config", _write(t, "c.yaml", "run:\n  steps: ten\n")],
        "run.steps must be an integer",
    ),
    "missing yaml": (lambda t, r: [*T, "--config", t / "nope.yaml"], "cannot read config file"),
    "yaml is a folder": (lambda t, r: [*T, "--config", t], "cannot read config file"),
    # data files
    "missing image folder": (
        lambda t, r: [*T, "--dataset", t / "no", "--image-size", "8"],
        "not an existing",
    ),
    "empty image folder": (
        lambda t, r: [*T, "--dataset", _folder(t, {}), "--image-size", "8"],
        "no readable",
    ),
    "no image files": (
        lambda t, r: [*T, "--dataset", _folder(t, {"a.txt": b"x", "b.npy": b"y"}), "--image-size", "8"],
        "no readable images",
    ),
    "dataset is a file": (
        lambda t, r: [*T, "--dataset", _write(t, "x.png", "x"), "--image-size", "8"],
        "file",
    ),
    "folder without size": (lambda t, r: [*T, "--dataset", _folder(t, {"a.png": _png()})], "image-size"),
    "batch > folder": (
        lambda t, r: [
            *T,
            "--dataset",
            _folder(t, {"a.png": _png(), "b.png": _png(9)}),
            "--image-size",
            "8",
            "--batch-size",
            "4",
            "--out",
            t / "o",
        ],  # fmt: skip
        "larger than the dataset",
    ),
    # checkpoints, through sample / eval / resume
    "sample: no run": (lambda t, r: [*S, "--run", t / "none"], "does not exist"),
    "sample: corrupt state": (lambda t, r: [*S, "--run", _corrupt(r, "state.pt", b"junk")], "cannot read"),
    "sample: truncated ema": (lambda t, r: [*S, "--run", _truncate(r, "ema.safetensors")], "cannot read"),
    "sample: pickled object": (lambda t, r: [*S, "--run", _evil_state(r)], "refused to unpickle"),
    "sample: NaN weights": (lambda t, r: [*S, "--run", _nan_weights(r)], "not finite"),
    "sample: NaN raw weights": (
        lambda t, r: [*S, "--run", _nan_weights(r, "model"), "--no-ema"],
        "not finite",
    ),
    "resume: missing weights": (
        lambda t, r: [*T, "--resume", _corrupt(r, "model.safetensors", b""), "--steps", "8"],
        "cannot read",
    ),
    "sample: negative seed": (lambda t, r: [*S, "--run", r, "--seed", "-1"], "--seed"),
    "sample: huge seed": (lambda t, r: [*S, "--run", r, "--seed", str(2**64)], "--seed"),
    "sample: n 0": (lambda t, r: [*S, "--run", r, "--n", "0"], "--n must be >= 1"),
    "sample: jpg": (lambda t, r: [*S, "--run", r, "--out", t / "x.jpg"], "must end in .png or .npy"),
    "sample: steps > T": (lambda t, r: [*S, "--run", r, "--steps", "5000"], "--steps must be <= T"),
    "eval: NaN weights": (lambda t, r: ["eval", "--run", _nan_weights(r), "--n", "8"], "not finite"),
    "eval: fid on a known set": (lambda t, r: ["eval", "--run", r, "--n", "8", "--fid"], "--fid"),
    "eval: n 0": (lambda t, r: ["eval", "--run", r, "--n", "0"], "--n must be >= 1"),
    "eval: no run": (lambda t, r: ["eval"], "needs --run"),
    "eval: negative seed": (lambda t, r: ["eval", "--run", r, "--seed", "-3"], "--seed"),
    # bench: checked before anything runs
    "bench: image size 0": (lambda t, r: ["bench", "--device", "cpu", "--image-size", "0"], "--image-size"),
    "bench: json folder missing": (
        lambda t, r: ["bench", "--device", "cpu", "--json", t / "no" / "r.json"],
        "--json",
    ),
    "bench: json is a folder": (lambda t, r: ["bench", "--device", "cpu", "--json", t], "--json"),
    "bench: zero steps": (lambda t, r: ["bench", "--device", "cpu", "--steps", "0"], "steps"),
}


# -- issue 21: never touch what is not yours; bounded parsing ---------------------------------------------

_HELD: list = []  # run folders a case holds open (a live trainer), closed after the case


def _user_folder(tmp):
    """A folder of the user's: a config.yaml and a samples/step-000020.npy that no run wrote."""
    u = tmp / "u"
    (u / "samples").mkdir(parents=True)
    (u / "config.yaml").write_text("mine\n")
    (u / "samples" / "step-000020.npy").write_text("x\n")
    return u


def _latest_behind(run):
    """What a kill between a checkpoint's rename and the ``latest`` update leaves."""
    (run / "checkpoints" / "latest").write_text("ckpt-000002\n")
    return run


def _held_without_lock_file(run):
    """A live trainer holds the run; its lock file was deleted."""
    from fastat.train.run_folder import LOCK_FILE, RunFolder

    _HELD.append(RunFolder.open(run, resume=_ckpt(run)))
    (run / LOCK_FILE).unlink()
    return run


def _bomb(depth: int = 12) -> str:
    lines = ["model:", "  kwargs:", "    a0: &a0 [1, 1]"]
    lines += [f"    a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


def _pickled(run, protocol: int):
    """state.pt as a plain pickle of plain values (not what torch.save writes)."""
    import pickle

    with open(_ckpt(run) / "state.pt", "wb") as f:
        pickle.dump({"step": 4, "x": [1, 2]}, f, protocol=protocol)
    return run


def _scaled(run, factor: float):
    """Finite EMA weights scaled by ``factor``: sampling overflows to NaN."""
    f = _ckpt(run) / "ema.safetensors"
    with safe_open(f, "pt") as h:
        meta = h.metadata()
        tensors = {k: h.get_tensor(k) * factor for k in h.keys()}  # noqa: SIM118
    save_file(tensors, f, metadata=meta)
    return run


def _prepared(tmp, damage=None):
    """A prepared set of 6 images in shards of 2 (``damage(folder, manifest)`` applied)."""
    from fastat.data import prepare

    src = _folder(tmp, {f"{i}.png": _png(40 * i) for i in range(6)})
    out = prepare(src, tmp / "set", 8, workers=1, shard_bytes=2 * 3 * 8 * 8, progress=False,
                  log=lambda m: None).root  # fmt: skip
    m = json.loads((out / "manifest.json").read_text())
    if damage is not None:
        damage(out, m)
        (out / "manifest.json").write_text(json.dumps(m))
    return out


def _flip_byte(out, m):
    f = out / "shard-00001.npy"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))


def _lower_counts(out, m):
    """The last shard's images dropped consistently: its header, file, digest, the counts and checksum."""
    import hashlib

    from fastat.data.prepared import npy_header, set_checksum

    last, f = m["shards"][-1], out / m["shards"][-1]["file"]
    f.write_bytes(npy_header((1, 3, 8, 8)) + f.read_bytes()[128 : 128 + 192])
    last["count"], last["blake2b"] = 1, hashlib.blake2b(f.read_bytes()[128:], digest_size=16).hexdigest()
    m["count"] = 5
    m["checksum"] = set_checksum((3, 8, 8), [s["blake2b"] for s in m["shards"]])


def _train_on(t, damage):
    return [*T, "--dataset", _prepared(t, damage), "--batch-size", "2", "--out", t / "o", "--steps", "1"]


def _yaml(tmp, text: str | bytes):
    f = tmp / "c.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    return f


CASES.update({
    # a run folder is only ever a run folder
    "fresh run over user files": (lambda t, r: [*T, *POINTS, "--out", _user_folder(t)], "not a fastat run"),
    "dry run over user files": (
        lambda t, r: [*T, *POINTS, "--dry-run", "--out", _user_folder(t)],
        "not a fastat run",
    ),
    "resume auto over user files": (
        lambda t, r: [*T, *POINTS, "--resume", "auto", "--out", _user_folder(t)],
        "not a fastat run",
    ),
    "branch into user files": (
        lambda t, r: [*T, "--resume", r / "checkpoints" / "ckpt-000002", "--out", _user_folder(t),
                      "--steps", "4"],
        "not a fastat run",
    ),
    "fresh run into a file": (lambda t, r: [*T, *POINTS, "--out", _write(t, "f", "mine")], "not a folder"),
    # the newest complete checkpoint wins
    "resume older, latest behind": (
        lambda t, r: [*T, "--resume", _latest_behind(r) / "checkpoints" / "ckpt-000002", "--steps", "8"],
        "older than the run's newest checkpoint ckpt-000004",
    ),
    # locks that hold
    "live trainer, lock file deleted": (
        lambda t, r: [*T, "--out", _held_without_lock_file(r), "--resume", "auto", "--steps", "8"],
        "in use by another trainer",
    ),
    "dry run: live trainer, lock deleted": (
        lambda t, r: [*T, "--out", _held_without_lock_file(r), "--resume", "auto", "--steps", "8",
                      "--dry-run"],
        "in use by another trainer",
    ),
    # bounded parsing
    "yaml alias bomb": (lambda t, r: [*T, "--config", _yaml(t, _bomb())], "aliases (*name) are not allowed"),
    "yaml one alias": (
        lambda t, r: [*T, "--config", _yaml(t, "run:\n  steps: &s 5\n  log_every: *s\n")],
        "aliases",
    ),
    "yaml merge key": (
        lambda t, r: [*T, "--config", _yaml(t, "run: {<<: {steps: 5}}\n")],
        "merge keys",
    ),
    "yaml /dev/zero": (lambda t, r: [*T, "--config", "/dev/zero"], "larger than 1024 KiB"),
    "yaml over 1 MiB": (
        lambda t, r: [*T, "--config", _yaml(t, "# pad\n" * 200_000 + "run: {steps: 5}\n")],
        "larger than 1024 KiB",
    ),
    "yaml not UTF-8": (lambda t, r: [*T, "--config", _yaml(t, b"run: {out: \xff\xfe}\n")], "not UTF-8"),
    "yaml duplicate key": (
        lambda t, r: [*T, "--config", _yaml(t, "run:\n  steps: 5\n  steps: 6\n")],
        "duplicate key 'steps'",
    ),
    "yaml duplicated section": (
        lambda t, r: [*T, "--config", _yaml(t, "run:\n  steps: 5\nrun:\n  lr: 1\n")],
        "duplicate key 'run'",
    ),
    "yaml scalar root": (lambda t, r: [*T, "--config", _yaml(t, "hello\n")], "must hold a mapping"),
    "yaml python tag": (
        lambda t, r: [*T, "--config", _yaml(t, "run: !!python/object/apply:os.system [ls]\n")],
        "bad YAML",
    ),
    "--set alias bomb": (
        lambda t, r: [*T, "--set", "model.kwargs={a: &a [1, 1], b: [*a, *a]}"],
        "aliases",
    ),
    "--set duplicate key": (lambda t, r: [*T, "--set", "model.kwargs={a: 1, a: 2}"], "duplicate key 'a'"),
    "--set into a list": (
        lambda t, r: [*T, "--set", "model.kwargs.ch_mult.1=3"],
        "set model.kwargs.ch_mult whole",
    ),
    "threads 100000": (lambda t, r: [*T, *POINTS, "--threads", "100000"], "--threads"),
    "threads 0": (lambda t, r: [*T, *POINTS, "--threads", "0"], "--threads"),
    "lam 1e308": (lambda t, r: [*T, "--lam", "1e308"], "objective.lam"),
    "lam inf": (lambda t, r: [*T, "--lam", "inf"], "objective.lam"),
    "ddpm with AT flags": (
        lambda t, r: [*T, "--mode", "ddpm", "--lam", "0.7", "--replays", "5", "--reg-frac", "0.5"],
        "--lam, --replays, --reg-frac would be ignored",
    ),
    # damaged prepared sets: found when opened for training
    "train: flipped shard byte": (lambda t, r: _train_on(t, _flip_byte), "shard-00001.npy does not match"),
    "train: edited manifest checksum": (
        lambda t, r: _train_on(t, lambda out, m: m.update(checksum="0" * 32)),
        "checksum does not match",
    ),
    "train: lowered counts": (lambda t, r: _train_on(t, _lower_counts), "counts 5 images, but 6 files"),
    "train: padded shard": (
        lambda t, r: _train_on(t, lambda out, m: open(out / "shard-00000.npy", "ab").write(b"\0")),
        "longer than its images",
    ),
    "train: missing shard": (
        lambda t, r: _train_on(t, lambda out, m: (out / "shard-00002.npy").unlink()),
        "shard-00002.npy is missing",
    ),
    # one line, not a traceback
    "sample: protocol-4 pickle": (lambda t, r: [*S, "--run", _pickled(r, 4)], "refused to unpickle"),
    "resume: protocol-5 pickle": (
        lambda t, r: [*T, "--resume", _pickled(r, 5), "--steps", "8"],
        "refused to unpickle",
    ),
    "read-only image cache": (
        lambda t, r: [*T, "--dataset", _folder(t, {"a.png": _png(), "b.png": _png(9)}), "--image-size", "8",
                      "--batch-size", "2", "--set", "data.cache_dir=/proc/fastat-cache", "--out", t / "o"],
        "cannot write the prepared-image cache /proc/fastat-cache",
    ),
    # silent acceptance
    "sample: weights x 1e30": (lambda t, r: [*S, "--run", _scaled(r, 1e30)], "samples from"),
    "resume: another prediction": (
        lambda t, r: [*T, "--resume", r, "--steps", "8", "--set", "objective.prediction=x0"],
        "objective.prediction = x0: its model was trained with eps",
    ),
    "resume: another T": (
        lambda t, r: [*T, "--resume", r, "--steps", "8", "--set", "objective.T=50"],
        "objective.T = 50",
    ),
    "resume: another schedule": (
        lambda t, r: [*T, "--resume", r, "--steps", "8", "--set", "objective.schedule=cosine"],
        "objective.schedule = cosine",
    ),
    "dry run: resume, another T": (
        lambda t, r: [*T, "--resume", r, "--steps", "8", "--set", "objective.T=50", "--dry-run"],
        "objective.T = 50",
    ),
    "dry run: bad model kwarg": (
        lambda t, r: [*T, *POINTS, "--dry-run", "--set", "model.kwargs.widht=3"],
        "unexpected keyword argument 'widht'",
    ),
    "sample: n 2e9": (
        lambda t, r: [*S, "--run", r, "--n", "2000000000"],
        "--n 2000000000 samples needs about",
    ),
    "ddpm with --set lam": (
        lambda t, r: [*T, "--mode", "ddpm", "--set", "objective.lam=0.7"],
        "objective.lam would be ignored",
    ),
})  # fmt: skip


def test_the_table_is_large_enough():
    assert len(CASES) >= 80


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, finished_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default run folders (runs/...) would land here
    run = shutil.copytree(finished_run, tmp_path / "run")
    make, needle = CASES[case]
    argv = make(tmp_path, run)
    before = snapshot(tmp_path)
    try:
        code, _, err = run_cli(capsys, *argv)
    finally:
        while _HELD:
            _HELD.pop().close()
    assert_one_line_error(code, err, needle)
    assert snapshot(tmp_path) == before


# -- ops: bad arguments are a one-line ValueError / TypeError ---------------------------------------------

X = torch.randn(4, 3)
ONE = torch.ones(4)
NAN = torch.tensor([1.0, float("nan"), 1.0, 1.0])

OPS = {
    "q_sample NaN a": (lambda: ops.q_sample(X, NAN, ONE, X), ValueError, "a must be finite"),
    "q_sample inf s": (lambda: ops.q_sample(X, ONE, float("inf"), X), ValueError, "s must be finite"),
    "q_sample int data": (lambda: ops.q_sample(X.long(), ONE, ONE, X.long()), TypeError, "floating"),
    "q_sample shapes": (lambda: ops.q_sample(X, ONE, ONE, X[:2]), ValueError, "shape"),
    "q_sample a shape": (lambda: ops.q_sample(X, torch.ones(3), ONE, X), ValueError, "shape"),
    "noise_inject NaN s": (lambda: ops.noise_inject(X, ONE, NAN, 0.1, 0), ValueError, "s must be finite"),
    "noise_inject NaN a": (lambda: ops.noise_inject(X, float("nan"), ONE, 0.1, 0), ValueError, "finite"),
    "noise_inject seed 2**64": (lambda: ops.noise_inject(X, ONE, ONE, 0.1, 2**64), ValueError, "seed"),
    "noise_inject seed 2**63": (lambda: ops.noise_inject(X, ONE, ONE, 0.1, 2**63), ValueError, "seed"),
    "noise_inject seed -1": (lambda: ops.noise_inject(X, ONE, ONE, 0.1, -1), ValueError, "seed"),
    "noise_inject bool seed": (lambda: ops.noise_inject(X, ONE, ONE, 0.1, True), TypeError, "seed"),
    "noise_inject offset 2**64": (lambda: ops.noise_inject(X, ONE, ONE, 0.1, 0, 2**64), ValueError, "offset"),
    "noise_inject float seed": (lambda: ops.noise_inject(X, ONE, ONE, 0.1, 1.5), TypeError, "seed"),
    "noise_inject NaN radius": (lambda: ops.noise_inject(X, ONE, ONE, float("nan"), 0), ValueError, "radius"),
    "pgd_step NaN s": (lambda: ops.pgd_step(X, X, 0.1, 0.1, x_t=X, s=NAN), ValueError, "s must be finite"),
    "pgd_step negative alpha": (lambda: ops.pgd_step(X, X, 0.1, -1.0), ValueError, "alpha"),
    "pgd_step bad norm": (lambda: ops.pgd_step(X, X, 0.1, 0.1, norm="l3"), ValueError, "norm"),
    "at_loss NaN lam": (lambda: ops.at_loss(X, X, X, X, float("nan")), ValueError, "lam"),
    "ATObjective empty batch": (
        lambda: ATObjective(schedule=NoiseSchedule(T=10))(lambda x, t: x, torch.zeros(0, 3)),
        ValueError,
        "empty batch",
    ),
}


@pytest.mark.parametrize("case", list(OPS))
def test_ops_reject_bad_arguments_in_one_line(case):
    call, exc, needle = OPS[case]
    with pytest.raises(exc) as e:
        call()
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


def test_ops_accept_the_largest_seed():
    x_t, _, eps, _ = ops.noise_inject(X, ONE, ONE, 0.1, 2**63 - 1, 2**63 - 1)
    assert torch.isfinite(x_t).all() and eps.std() > 0
    assert math.isfinite(float(x_t.sum()))


# -- killed runs resume bit-exactly --------------------------------------------------------------------------

# A small fork server: one process imports torch and fastat once, then forks a fresh training process per
# request (a real process, killed with a real SIGKILL), so that seven runs do not pay seven start-ups.
# A request is a JSON line [plan, stderr_file, argv]; the server answers "pid N", then "exit CODE".
# The child kills itself (SIGKILL) at the moment its plan names:
#   state:N   half-way through writing state.pt of its N-th checkpoint
#   latest:N  between renaming its N-th checkpoint into place and updating ``latest``
#   prune:N   half-way through deleting the N-th checkpoint it prunes (renamed to trash, partly deleted)
#   -         not at all (the test kills it from outside at a random moment)
SERVER = r"""
import json, os, signal, sys
import torch
import fastat.train.checkpoint as ck
import torch._dynamo  # noqa: F401 - what the optimizer's first use imports (seconds)
import fastat.app.cli, fastat.train.run  # noqa: F401 - imported once, before forking

def child(plan, argv):
    torch.set_num_threads(1)
    kind, _, n = plan.partition(":")
    count = [0]

    def due():
        count[0] += 1
        return count[0] == int(n)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kind == "state":
        real_write = ck.write_bytes
        def write_bytes(path, data):
            if path.name == "state.pt" and due():
                real_write(path, bytes(data)[: len(data) // 2])
                die()
            real_write(path, data)
        ck.write_bytes = write_bytes
    elif kind == "latest":  # the checkpoint renamed into place, `latest` not yet updated
        real_atomic = ck.atomic_write_text
        def atomic_write_text(path, text):
            if path.name == "latest" and due():
                die()
            return real_atomic(path, text)
        ck.atomic_write_text = atomic_write_text
    elif kind == "prune":
        real_rmtree = ck.shutil.rmtree
        def rmtree(path, ignore_errors=False):
            if ".trash-ckpt" in str(path) and os.path.isdir(path) and due():
                os.unlink(os.path.join(path, sorted(os.listdir(path))[0]))
                die()
            real_rmtree(path, ignore_errors=ignore_errors)
        ck.shutil.rmtree = rmtree
    return fastat.app.cli.main(argv)

for line in sys.stdin:
    plan, err, argv = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stdout is the server's answer channel
        code = 1
        try:
            code = child(plan, argv)
        finally:
            sys.stderr.flush()
            os._exit(code)
    print("pid", pid, flush=True)
    print("exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""

CRASH_ARGS = [*POINTS, "--steps", "60", "--save-every", "1", "--keep", "2", "--log-every", "3",
              "--sample-every", "0", "--set", "run.eval_n=0"]  # fmt: skip


class ForkServer:
    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip

    def start(self, plan: str, err, argv: list) -> int:
        """Fork a training process; returns its pid."""
        self.proc.stdin.write(json.dumps([plan, str(err), [str(a) for a in argv]]) + "\n")
        self.proc.stdin.flush()
        word, pid = self.proc.stdout.readline().split()
        assert word == "pid"
        return int(pid)

    def wait(self) -> int:
        """The exit code of the process started last (-9: killed by SIGKILL)."""
        word, code = self.proc.stdout.readline().split()
        assert word == "exit"
        return int(code)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _latest(run) -> str | None:
    try:
        return (run / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return None


def _step(latest: str | None) -> int:
    return int(latest.split("-")[1]) if latest else 0


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, capsys):
    """SIGKILL during a save (state.pt half written), between a checkpoint's rename and the ``latest``
    update, during pruning (a checkpoint half deleted) and at four random moments; each time `--resume
    auto` continues from the newest complete checkpoint. The end: the same weights, EMA and optimizer
    state as an uninterrupted run (which saved only at the end), and one metrics record per log step."""
    ref = tmp_path / "ref"
    assert run_cli(capsys, "train", *CRASH_ARGS, "--save-every", "0", "--out", ref)[0] == 0

    run, rng, kills, err = tmp_path / "run", random.Random(0), 0, tmp_path / "stderr"
    server = ForkServer()
    try:
        for plan in ["state:3", "latest:2", "prune:2", "-", "-", "-", "-"]:
            before = _latest(run)
            pid = server.start(plan, err, ["train", *CRASH_ARGS, "--out", run, "--resume", "auto"])
            if plan == "-":  # let this process save 1-5 more steps, then kill it at a random moment
                # (progress-based, not wall-clock: on a fast machine a wall-clock delay can outlive the run)
                target = _step(before) + rng.randint(1, 5)
                deadline = time.monotonic() + 120
                while _step(_latest(run)) < target and _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.001)
                time.sleep(rng.uniform(0.0, 0.01))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            code = server.wait()
            text = err.read_text()
            assert code in (0, -signal.SIGKILL) and "Traceback" not in text, (plan, code, text)
            kills += code == -signal.SIGKILL
            names = sorted(p.name for p in (run / "checkpoints").iterdir())
            assert all(n.startswith((".", "ckpt-")) or n == "latest" for n in names), names
            newest = load_checkpoint(run).path  # whatever the moment, the newest complete checkpoint loads
            assert newest == list_checkpoints(run / "checkpoints")[-1]
            if plan.startswith("latest"):  # `latest` one behind: the resume takes the newer checkpoint
                assert code == -signal.SIGKILL and _step(_latest(run)) < _step(newest.name), names
        assert kills >= 6, kills
        server.start("-", err, ["train", *CRASH_ARGS, "--out", run, "--resume", "auto"])
        assert server.wait() == 0, err.read_text()
    finally:
        server.close()

    a, b = load_checkpoint(ref), load_checkpoint(run)
    assert a.step == b.step == 60
    for which in ("model", "ema"):
        for k, v in getattr(a, which).items():
            assert torch.equal(v, getattr(b, which)[k]), (which, k)
    for i, st in a.state["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k], b.state["optimizer"]["state"][i][k])
    steps = [r["step"] for r in read_metrics(run) if r["kind"] == "train"]
    assert steps == [r["step"] for r in read_metrics(ref) if r["kind"] == "train"] == list(range(3, 61, 3))
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


# -- a run that goes non-finite keeps its good model --------------------------------------------------------


def _all_finite(run) -> bool:
    ok = True
    for ckpt in sorted((run / "checkpoints").glob("ckpt-*")):
        c = load_checkpoint(ckpt)
        ok &= all(bool(torch.isfinite(v).all()) for v in [*c.model.values(), *c.ema.values()])
    return ok


def test_resuming_with_an_absurd_lr_keeps_the_good_model(tmp_path, capsys):
    """The scenario of the issue: a healthy run resumed with --lr 1e6, saving every 5 steps, looking at
    the loss every 25, keeping 3. The first step makes the weights garbage (finite), every later step is
    non-finite and skipped; saves are postponed during the streak, so nothing pushes the good checkpoints
    out, and `run.max_skipped` stops the run naming the newest good one, intact and finite."""
    run = tmp_path / "r"
    common = ["--sample-every", "0", "--set", "run.eval_n=0"]
    first = ["--steps", "40", "--save-every", "10", "--out", run]
    assert run_cli(capsys, "train", *POINTS, *common, *first)[0] == 0
    good = run / "checkpoints" / "ckpt-000040"
    before = snapshot(good)
    code, _, err = run_cli(capsys, "train", "--resume", run, "--lr", "1e6", "--save-every", "5",
                           "--log-every", "25", "--keep", "3", "--steps", "100", "--no-progress")  # fmt: skip
    assert code == 1 and len(without_notes(err).strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "steps were skipped" in err and f"last good checkpoint is {good}:" in err, err
    assert load_checkpoint(run).path == good and snapshot(good) == before
    assert _all_finite(run)
    out = tmp_path / "s.npy"
    assert run_cli(capsys, "sample", "--run", run, "--n", "4", "--steps", "2", "--out", out)[0] == 0


def test_non_finite_weights_are_never_saved(tmp_path, capsys, monkeypatch):
    import fastat.train.loop as loop_mod  # where the loop looks the step up

    real = loop_mod.train_step

    def step(engine, x0, *, lr):
        out = real(engine, x0, lr=lr)
        if engine.steps_done == 5:  # the weights go bad after step 5
            with torch.no_grad():
                next(engine.model.parameters()).view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(loop_mod, "train_step", step)
    run = tmp_path / "r"
    args = ["--steps", "10", "--save-every", "2", "--log-every", "100", "--keep", "1", "--sample-every", "0"]
    code, _, err = run_cli(capsys, "train", *POINTS, *args, "--set", "run.eval_n=0", "--out", run)
    assert code == 1 and len(without_notes(err).strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "not finite" in err and "no checkpoint written at step 10" in err  # the end (6, 8 waited)
    assert f"last good checkpoint is {run / 'checkpoints' / 'ckpt-000004'}" in err
    assert [p.name for p in (run / "checkpoints").glob("ckpt-*")] == ["ckpt-000004"]
    assert _all_finite(run)


def test_k_skipped_steps_in_a_row_stop_the_run(tmp_path, capsys, monkeypatch):
    """The loop side of the engine's non-finite skip: skipped steps are counted in the metrics and left
    out of the means; the streak is read at log steps and saves, and `run.max_skipped` in a row stop the
    run (exit 1) naming the last good checkpoint. (After step 8 the engine is stood in for: each step is
    reported as the engine reports a skipped one, ``stats["skipped"]`` = 1 and ``skip_streak`` + 1.)"""
    import fastat.train.loop as loop_mod  # where the loop looks the step up

    real = loop_mod.train_step

    def step(engine, x0, *, lr):
        if engine.steps_done < 8:
            return real(engine, x0, lr=lr)
        engine.steps_done += 1
        engine.skip_streak += 1
        return {"loss": torch.tensor(float("nan")), "skipped": torch.ones(())}

    monkeypatch.setattr(loop_mod, "train_step", step)
    run = tmp_path / "r"
    code, _, err = run_cli(capsys, "train", *POINTS, "--steps", "40", "--save-every", "8", "--log-every", "5",
                           "--set", "run.max_skipped=6", "--sample-every", "0", "--set", "run.eval_n=0",
                           "--out", run)  # fmt: skip
    assert code == 1 and len(without_notes(err).strip().splitlines()) == 1, err
    assert "stopped at step 15: the last 7 steps were skipped" in err
    assert f"last good checkpoint is {run / 'checkpoints' / 'ckpt-000008'}" in err
    recs = {r["step"]: r for r in read_metrics(run) if r["kind"] == "train"}
    assert [recs[s]["skipped"] for s in (5, 10, 15)] == [0, 2, 5]
    assert [recs[s]["skip_streak"] for s in (5, 10, 15)] == [0, 2, 7]
    assert math.isfinite(recs[10]["loss"])  # the mean of the interval's 3 good steps
    assert recs[15]["loss"] == "nan"  # no good step in the interval
    assert _all_finite(run)


# -- a full disk, a read-only folder -------------------------------------------------------------------------

BIG = [*POINTS, "--set", "model.kwargs={hidden: 128, depth: 1, time_dim: 16}", "--sample-every", "0",
       "--set", "run.eval_n=0"]  # fmt: skip


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root (CI runs as root)")


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs. Mounting needs root: the tests that use it say so in their skip mark, and as root a
    failed mount fails them (no silent skip)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0, f"cannot mount a small tmpfs as root: {r.stderr.strip()}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _fill(disk, leave: int):
    """Fill the file system of ``disk`` until ``leave`` bytes are free."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


@needs_root
@pytest.mark.parametrize("fails_at", ["model.safetensors", "state.pt"])
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(small_disk, fails_at, capsys):
    run = small_disk / "run"
    assert (
        run_cli(capsys, "train", *BIG, "--steps", "4", "--save-every", "2", "--keep", "1", "--out", run)[0]
        == 0
    )
    ckpt = load_checkpoint(run).path
    weights = (ckpt / "model.safetensors").stat().st_size
    before = snapshot(ckpt)
    _fill(small_disk, 64 * 1024 if fails_at == "model.safetensors" else 2 * weights + 64 * 1024)
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "auto", "--steps", "8", "--no-progress")
    lines = without_notes(err).strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "No space left on device" in lines[0] and f"ckpt-000006/{fails_at}" in lines[0], lines[0]
    assert f"the last checkpoint ({ckpt}) is intact" in lines[0]
    assert snapshot(ckpt) == before and load_checkpoint(run).path == ckpt
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-000004", "latest"]
    (small_disk / "filler").unlink()  # space again: the run continues from the intact checkpoint
    assert run_cli(capsys, "train", "--out", run, "--resume", "auto", "--steps", "8", "--no-progress")[0] == 0
    assert load_checkpoint(run).step == 8


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_dry_run_refuses_a_folder_it_could_not_create(capsys):
    """os.access() says yes to root on /proc; --dry-run probes by creating (and removing) a folder."""
    code, _, err = run_cli(capsys, "train", *POINTS, "--out", "/proc/fastat-run", "--dry-run")
    assert_one_line_error(code, err, "cannot write to the run folder", "not writable")


@needs_root
def test_a_read_only_run_folder_is_refused_before_anything_runs(small_disk, capsys):
    run = small_disk / "run"
    assert run_cli(capsys, "train", *BIG, "--steps", "2", "--out", run)[0] == 0
    before = snapshot(run)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True, timeout=30)
    try:
        code, _, err = run_cli(
            capsys, "train", "--out", run, "--resume", "auto", "--steps", "4", "--no-progress"
        )
        assert_one_line_error(code, err, "cannot write to the run folder", "not writable")
        code, _, err = run_cli(capsys, "train", *BIG, "--out", small_disk / "new", "--steps", "2")
        assert_one_line_error(code, err, "cannot write to the run folder")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True, timeout=30)
    assert snapshot(run) == before


# -- Ctrl-C during start-up -------------------------------------------------------------------------------


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    """SIGINT while the command line and torch are still loading (the console script's entry imports the
    CLI inside its guard; the CLI imports torch lazily, inside main): exit 130, one line, no traceback (it
    used to print 31 lines). The process says when the entry is loaded, so the signal cannot arrive
    before it is guarded, however slowly the loaded machine imports the rest."""
    argv = ["train", *POINTS, "--steps", "2000", "--out", str(tmp_path / "r")]
    code = (  # a terminal's Ctrl-C: SIGINT not ignored, even if this suite was started in the background
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        f"from fastat.app.entry import main; print('up', flush=True); sys.exit(main({argv!r}))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "up"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "fastat: interrupted" in err, err
    assert not (tmp_path / "r").exists()  # interrupted before the run folder was opened


# -- issue 21: failures said in one line, naming the file --------------------------------------------------


def test_a_foreign_pickle_protocol_is_one_line_without_a_torch_warning(finished_run, tmp_path, capsys):
    import warnings

    run = _pickled(shutil.copytree(finished_run, tmp_path / "run"), 4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, _, err = run_cli(capsys, "sample", "--run", run, "--n", "2", "--out", tmp_path / "s.npy")
    assert_one_line_error(code, err, "refused to unpickle")
    assert [str(w.message) for w in seen] == []


def test_export_disk_full_is_one_line_and_a_killed_exports_folder_is_removed(tmp_path):
    from safetensors import SafetensorError

    from fastat.app import export

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f".tmp-out-{dead.pid}"  # what a killed export leaves
    (left / "unet").mkdir(parents=True)
    live = tmp_path / f".tmp-out-{os.getppid()}"  # an export still running
    live.mkdir()

    def full(tmp):
        (tmp / "unet").mkdir(parents=True)
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
            'on device" })'
        )

    with pytest.raises(export.ExportError) as e:
        export._write_folder(tmp_path / "out", full)
    assert str(e.value) == f"cannot write {tmp_path / 'out'}: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]  # the killed one's folder is gone
    assert export._write_folder(tmp_path / "out", lambda tmp: tmp.mkdir()) == tmp_path / "out"


def test_sample_disk_full_names_the_file(finished_run, tmp_path, capsys, monkeypatch):
    import errno

    def full(f, arr, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    out = tmp_path / "x.npy"
    code, _, err = run_cli(capsys, "sample", "--run", finished_run, "--n", "2", "--steps", "2", "--out", out)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "No space left on device" in lines[0] and str(out) in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_prepare_disk_full_names_the_folder(tmp_path, capsys, monkeypatch):
    import errno

    from fastat.data import preparation

    def full(self, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(preparation._ShardWriter, "write", full)
    src = _folder(tmp_path, {"a.png": _png(), "b.png": _png(9)})
    code, _, err = run_cli(capsys, "prepare", src, "--image-size", "8", "--out", tmp_path / "p",
                           "--no-progress", "--workers", "1")  # fmt: skip
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("fastat: error")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err  # (and the line that it started)
    assert "No space left on device" in lines[0] and str(tmp_path / ".p.partial") in lines[0], lines[0]


def test_forcing_triton_without_a_gpu_or_the_interpreter_is_one_line(tmp_path, capsys, monkeypatch):
    from fastat.kernels import HAS_TRITON

    if not HAS_TRITON or torch.cuda.is_available():
        monkeypatch.setattr(ops.K, "HAS_TRITON", True)
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: False))
    monkeypatch.setenv("FASTAT_FORCE_TRITON", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, _, err = run_cli(capsys, "train", *POINTS, "--steps", "2", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "FASTAT_FORCE_TRITON=1", "TRITON_INTERPRET=1")
    assert not (tmp_path / "r").exists()  # it failed in the first step: nothing written


# -- issue 21: memory checked before the first write (a machine with 1 GiB free) -----------------------

SMALL = ["--dataset", "gmm2d", "--model", "mlp", "--no-progress", "--steps", "2"]
MEMORY = {
    "batch 60000 of 60000 points": (
        ["--batch-size", "60000", "--set", "data.n=60000"],
        "activations 2.4 GiB",
    ),
    "image size 256": (["--dataset", "subspace", "--image-size", "256", "--model", "auto"], "activations"),
    "a dataset larger than memory": (["--set", "data.n=200000000"], "data 3.0 GiB"),
}


@pytest.mark.parametrize("dry", [False, True])
@pytest.mark.parametrize("case", list(MEMORY))
def test_a_step_far_over_free_memory_is_refused_before_any_write(case, dry, tmp_path, capsys, monkeypatch):
    import fastat.train.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 30)
    extra, part = MEMORY[case]
    argv = ["train", *SMALL, *extra, "--out", tmp_path / "r", *(["--dry-run"] if dry else [])]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(
        code, err, "the training step (batch", part, "more than the 1.0 GiB of available RAM"
    )
    assert list(tmp_path.iterdir()) == []


def test_the_memory_estimate_admits_the_usual_runs(tmp_path, capsys, monkeypatch):
    import fastat.train.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 30)
    assert run_cli(capsys, "train", *POINTS, "--steps", "2", "--out", tmp_path / "r")[0] == 0


def test_activation_elements_count_every_leaf_output_on_meta():
    from fastat.train.memory import activation_elements

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.SiLU(), torch.nn.Linear(5, 3))

        def forward(self, x, t):
            return self.body(x)

    with torch.device("meta"):
        net = Net()
    assert activation_elements(net, (3,)) == 5 + 5 + 3
    assert all(p.device.type == "meta" for p in net.parameters())  # no memory was used
