"""Shared by test_train.py and test_cli.py: the CLI run in-process, and tiny, fast run settings."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastat.app.cli import main

# Points: gmm2d with a small MLP; a few steps take well under a second.
POINTS = [
    "--dataset",
    "gmm2d",
    "--model",
    "mlp",
    "--set",
    "model.kwargs={hidden: 32, depth: 1, time_dim: 16}",
    "--set",
    "data.n=64",
    "--batch-size",
    "8",
    "--log-every",
    "2",
    "--no-progress",
    "--set",
    "run.sample_n=8",
    "--set",
    "run.sample_steps=4",
    "--set",
    "run.eval_n=16",
]

# Images: the known 8x8 subspace with a very small UNet (the tiny preset narrowed).
IMAGES = [
    "--dataset",
    "subspace",
    "--image-size",
    "8",
    "--set",
    "model.kwargs={ch: 8, groups: 4}",
    "--set",
    "data.n=48",
    "--batch-size",
    "8",
    "--log-every",
    "2",
    "--no-progress",
    "--set",
    "run.sample_n=4",
    "--set",
    "run.sample_steps=3",
    "--set",
    "run.eval_n=8",
]


# The lines a run says once at its start (where it runs, its data, what it resumes): left out where a test
# counts the lines of an error or a stop.
NOTES = ("fastat: torchrun: ", "fastat: data: ", "fastat: resuming ")


def without_notes(err: str) -> str:
    """``err`` without the start-up :data:`NOTES`."""
    return "\n".join(ln for ln in err.splitlines() if not ln.startswith(NOTES))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``fastat ARGS`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def weights(run_dir: Path, which: str = "model") -> dict[str, torch.Tensor]:
    """The weights of the newest checkpoint of a run."""
    root = Path(run_dir) / "checkpoints"
    name = (root / "latest").read_text().strip()
    return load_file(root / name / f"{which}.safetensors")


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit 2 and one error line (the start-up notes, e.g. the data line, are not errors)."""
    lines = [ln for ln in without_notes(err).splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("fastat"), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> content): compare before and after to show that a
    refused command changed nothing."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def one_torch_thread():
    """One intra-op thread (see test_train.py: tiny models on a loaded CPU), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def train_run(run: Path, *args) -> Path:
    """``fastat train ARGS --out RUN`` in-process on one thread (for module-scoped fixtures); returns RUN."""
    with one_torch_thread():
        assert main(["train", *map(str, args), "--out", str(run)]) == 0
    return run


def finished_points_run(run: Path) -> Path:
    """A finished 4-step points run with checkpoints at steps 2 and 4, no samples or evaluation."""
    return train_run(
        run, *POINTS, "--steps", 4, "--save-every", 2, "--sample-every", 0, "--set", "run.eval_n=0"
    )
