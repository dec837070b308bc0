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


def test_no_kernel_loops_over_range_of_a_runtime_value():
    """triton 3.6's interpreter gives a runtime scalar argument as a 1-element array, and ``range(0, n, S)``
    calls ``int()`` on it, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"):
    every interpreter run failed on the GPU machine (triton 3.6.0, numpy 2.5.2). Kernels loop over a
    runtime bound with ``while``; ``range`` only over constexprs and literals."""
    import ast

    ranges = ("range", "static_range")
    bad, kernels = [], 0
    for path in sorted((HERE.parent / "kernels").glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            jit = isinstance(fn, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in fn.decorator_list)
            if not jit:
                continue
            kernels += 1
            const = {a.arg for a in fn.args.args if "constexpr" in ast.unparse(a.annotation or ast.Pass())}
            for loop in ast.walk(fn):
                it = loop.iter if isinstance(loop, ast.For) else None
                ranged = isinstance(it, ast.Call) and ast.unparse(it.func).split(".")[-1] in ranges
                if ranged:
                    names = {n.id for a in it.args for n in ast.walk(a) if isinstance(n, ast.Name)}
                    if names - const:
                        bad.append(f"{path.name}:{loop.lineno} {fn.name}: {ast.unparse(it)}")
    assert kernels >= 7 and not bad, bad
