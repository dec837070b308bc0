"""Runs the Triton kernel cases (``kernel_cases.py``) in a subprocess: on the GPU where CUDA is
present, else on CPU under the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before triton is first imported, which this process has already
done; a child process gets a clean start.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def test_kernels_match_references():
    pytest.importorskip("triton", reason="triton not installed")
    env = {**os.environ, "FASTAT_FORCE_TRITON": "1", "PYTHONUNBUFFERED": "1"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", str(HERE / "kernel_cases.py")]
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, f"kernel cases failed ({'cuda' if torch.cuda.is_available() else 'interpreter'}):\n{tail}"
    assert " passed" in tail and "skipped" not in tail and "deselected" not in tail, tail
