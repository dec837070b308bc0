"""Capture safety, proven on the CPU: the step body makes no host read (``host_read_cases.py``, kernels
under the Triton interpreter), and the engine's capture path — warm-up, capture, replay, and a failed
capture — runs through a CPU stand-in for ``fastat.step.capture.CudaGraphs`` with the same methods."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastat.step.engine
from fastat.at.budget import Budget
from fastat.at.objective import ATObjective
from fastat.at.schedule import NoiseSchedule
from fastat.data import Labelled
from fastat.models import MLP
from fastat.step.capture import CaptureError, GeneratorSnapshot
from fastat.step.engine import StepEngine

HERE = Path(__file__).parent


def test_step_body_makes_no_host_read():
    pytest.importorskip("triton", reason="triton not installed")
    env = {**os.environ, "FASTAT_FORCE_TRITON": "1", "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore",
        str(HERE / "host_read_cases.py"),
    ]
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, f"host-read cases failed:\n{tail}"
    assert " passed" in tail and "skipped" not in tail and "deselected" not in tail, tail


# -- the capture path through a CPU stand-in ------------------------------------------------------------


class StandInGraphs:
    """CPU stand-in for ``CudaGraphs``. ``capture`` runs ``fn`` once for real: that run does the work of
    the replay that follows a real capture (which records kernels without running them), so the first
    ``replay`` does nothing; later replays rerun ``fn`` and copy its outputs into the captured ones, as a
    graph rewrites its static outputs. With ``fail`` set, the capture fails the way a CUDA one does: at
    the first model call (an op not permitted while capturing), leaving every generator it touched
    changed (torch 2.11 leaves them in capture mode; a CPU generator cannot be, so they are reseeded)."""

    fail = False
    capturing = False
    made: list = []
    host_objects: list = []  # objects whose attributes a replay must leave alone (it runs no Python)

    def __init__(self, device):
        self.default_generator = torch.Generator().manual_seed(123)
        self.captures = self.replays = 0
        StandInGraphs.made.append(self)

    def side_stream(self):
        return contextlib.nullcontext()

    def sync_check(self):
        return contextlib.nullcontext([])

    def synchronize(self):
        pass

    def generators(self, registered):
        return [*registered, self.default_generator]

    def capture(self, fn, registered):
        self.captures += 1
        StandInGraphs.capturing = True
        try:
            out = fn()
        except Exception:
            for g in self.generators(registered):
                g.manual_seed(999)
            raise
        finally:
            StandInGraphs.capturing = False
        return _StandInGraph(self, fn, out), out


class _StandInGraph:
    def __init__(self, owner, fn, out):
        self.owner, self.fn, self.out, self.first = owner, fn, out, True

    def replay(self):
        self.owner.replays += 1
        if self.first:
            self.first = False
            return
        kept = [(o, dict(vars(o))) for o in _held(StandInGraphs.host_objects)]
        for k, v in self.fn().items():
            self.out[k].copy_(v)
        for o, attrs in kept:  # a real replay runs kernels only: host state stays as it was
            vars(o).clear()
            vars(o).update(attrs)


def _held(objects):
    """``objects`` and the fastat objects they hold (an objective's replay state, say), depth first."""
    for o in objects:
        yield o
        yield from _held(v for v in vars(o).values() if type(v).__module__.startswith("fastat.")
                         and hasattr(v, "__dict__") and not isinstance(v, (torch.Tensor, torch.nn.Module)))


class _CaptureSensitive(torch.nn.Module):
    """A model whose forward fails while the stand-in captures with ``fail`` set."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, y=None):
        if StandInGraphs.capturing and StandInGraphs.fail:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return self.net(x, t) if y is None else self.net(x, t, y)


def _capture_health_check(optimizer):
    """torch's check at the start of ``optimizer.step()``, which sees no capture on the CPU."""
    if StandInGraphs.capturing and not all(g["capturable"] for g in optimizer.param_groups):
        raise RuntimeError("Attempting CUDA graph capture of step() but param_groups' capturable is False.")


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(fastat.step.engine, "CudaGraphs", StandInGraphs)
    for name in ("_accelerator_graph_capture_health_check", "_cuda_graph_capture_health_check"):
        if hasattr(torch.optim.Optimizer, name):
            monkeypatch.setattr(torch.optim.Optimizer, name, _capture_health_check)
    StandInGraphs.made, StandInGraphs.fail, StandInGraphs.host_objects = [], False, []
    yield StandInGraphs
    StandInGraphs.fail, StandInGraphs.host_objects = False, []


def make(graph, seed=0, mode="adv", classes=0, **kw):
    torch.manual_seed(seed)
    model = _CaptureSensitive(MLP(3, hidden=32, depth=2, time_dim=16, num_classes=classes))
    budget = Budget(r_min=0.1, r_scale=0.2)
    extra = {"replays": 3, "reg_frac": 0.5} if mode == "free" else {}
    if classes:
        extra["p_uncond"] = 0.3
    obj = ATObjective(schedule=NoiseSchedule(T=100), mode=mode, budget=budget, **extra)
    gen = torch.Generator().manual_seed(seed + 1)
    logs = []
    eng = StepEngine(model, obj, generator=gen, lr=1e-3, ema_decay=0.9, graph=graph, warmup_steps=2,
                     log=logs.append, **kw)  # fmt: skip
    return eng, logs


def batches(n, seed=5, nan_at=()):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(16, 3, generator=g) for _ in range(n)]
    for i in nan_at:
        xs[i][3, 1] = float("nan")
    return xs


def run(eng, xs):
    return [
        {k: v.clone() for k, v in eng.step(x, lr=1e-3 * (i + 1) / len(xs)).items()} for i, x in enumerate(xs)
    ]


def assert_same_state(a, b):
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    for pa, pb in zip(a.ema.module.parameters(), b.ema.module.parameters(), strict=True):
        assert torch.equal(pa, pb)
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for k in sa:
        for name in sa[k]:
            assert torch.equal(sa[k][name], sb[k][name]), name
    assert torch.equal(a.skip_streak, b.skip_streak) and a.ema.num_updates == b.ema.num_updates
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


@pytest.mark.parametrize("accum", [1, 2])
def test_captured_step_replays_the_eager_step(stand_in, accum):
    """grad_accum = 2: the two micro-steps and the optimizer step captured once (one graph)."""
    xs = batches(7, nan_at=(4,))
    ref, _ = make(graph=False, grad_accum=accum)
    eng, logs = make(graph=True, grad_accum=accum)
    assert eng.mode == "eager+graph" and ref.mode == "eager"
    s_ref, s_eng = run(ref, xs[:6]), []
    for i, x in enumerate(xs[:6]):
        out = eng.step(x, lr=1e-3 * (i + 1) / 6)
        if i >= 2:  # warm-up steps 0 and 1; captured at step 2, replayed since
            assert out is eng._static_stats
        s_eng.append({k: v.clone() for k, v in out.items()})
    (backend,) = stand_in.made
    assert backend.captures == 1 and backend.replays == 4 and not logs
    for a, b in zip(s_ref, s_eng, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert [float(s["skipped"]) for s in s_eng] == [0, 0, 0, 0, 1, 0]
    assert_same_state(ref, eng)
    # a batch of another shape runs uncaptured (said once), and the run stays the reference's
    odd = xs[6][:9]
    torch.testing.assert_close(eng.step(odd, 1e-3)["loss"], ref.step(odd, 1e-3)["loss"], rtol=0, atol=0)
    assert backend.replays == 4 and len(logs) == 1 and "does not fit the captured step" in logs[0]
    assert_same_state(ref, eng)


@pytest.mark.parametrize("accum,classes", [(1, 0), (2, 0), (2, 4)])
def test_captured_free_step_replays_kept_batches(stand_in, accum, classes):
    """free (3 replays, the regulariser on half the batch): the graph is captured at a step that brings a
    batch (step 3), its replays copy nothing (None), and a batch of another shape runs uncaptured with its
    own replays, after which the captured batches go on: all as the eager reference (grad_accum = 2: in
    micro-batches of 8, the odd batch of 9 as 4 and 5; ``classes``: labelled batches, whose replays keep
    the fresh step's labels after dropout)."""
    xs = batches(13)
    xs[9] = xs[9][:9]
    if classes:
        g = torch.Generator().manual_seed(7)
        xs = [Labelled(x, torch.randint(0, classes, (len(x),), generator=g)) for x in xs]
    ref, _ = make(graph=False, mode="free", grad_accum=accum, classes=classes)
    eng, logs = make(graph=True, mode="free", grad_accum=accum, classes=classes)
    (backend,) = stand_in.made
    stand_in.host_objects.append(eng.objective)  # replays run no Python (the objective's included)
    for i, x in enumerate(xs):
        fed = x if eng.wants_batch else None
        assert (fed is None) == (i % 3 != 0)
        a, b = ref.step(fed, 1e-3), eng.step(fed, 1e-3)
        assert (b is eng._static_stats) == (3 <= i < 9 or i >= 12), i
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"{k} at step {i}")
        # a checkpoint now saves what the reference's does: after the odd batch (steps 9-11) too, the
        # captured batch's replay set, selected on the host before each replay
        saved, want = eng.objective_state_dict()["replay"], ref.objective_state_dict()["replay"]
        assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want if k != "m")
    assert backend.captures == 1 and backend.replays == 7 and len(logs) == 1, logs
    assert_same_state(ref, eng)
    assert tuple(eng.objective_state_dict()["replay"]["x0"].shape) == (16, 3)
    assert ("y" in eng.objective_state_dict()["replay"]) == bool(classes)


def test_a_resumed_engine_captures_its_step(stand_in):
    """A checkpoint written by an uncaptured run (CPU, --no-fast) holds ``capturable=False``: loading it
    keeps the engine's flags, so the step is still captured (it was not: capture raised and the engine
    fell back to the uncaptured step)."""
    xs = batches(5)
    ref, _ = make(graph=False)
    run(ref, xs[:2])
    saved = ref.optimizer.state_dict()
    assert not any(g["capturable"] for g in saved["param_groups"])
    eng, logs = make(graph=True)
    eng.load_optimizer_state(saved)
    assert all(g["capturable"] and g["fused"] for g in eng.optimizer.param_groups)
    run(eng, xs[2:])  # two warm-up steps, then captured
    assert eng.captured and eng.mode == "eager+graph" and not logs, logs
    assert stand_in.made[0].captures == 1
    ref.load_optimizer_state(eng.optimizer.state_dict())  # and back: the uncaptured engine's flags
    assert not any(g["capturable"] for g in ref.optimizer.param_groups)


def test_failed_capture_restores_every_generator_and_runs_uncaptured(stand_in):
    stand_in.fail = True
    xs = batches(5, nan_at=(3,))
    ref, _ = make(graph=False)
    eng, logs = make(graph=True)
    s_ref, s_eng = run(ref, xs), run(eng, xs)
    (backend,) = stand_in.made
    assert backend.captures == 1 and backend.replays == 0
    assert eng.mode == "eager" and len(logs) == 1, logs
    assert "CUDA-graph capture failed" in logs[0] and "operation not permitted" in logs[0]
    for a, b in zip(s_ref, s_eng, strict=True):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert_same_state(ref, eng)  # the objective's generator continued from where it was
    assert torch.equal(backend.default_generator.get_state(), torch.Generator().manual_seed(123).get_state())


def test_capture_failure_that_cannot_be_repaired_stops_with_one_line(stand_in, monkeypatch):
    stand_in.fail = True

    def broken_randint(*a, **k):
        raise RuntimeError("Attempt to increment an offset while capturing\nmore detail")

    eng, logs = make(graph=True)
    xs = batches(3)
    run(eng, xs[:2])
    monkeypatch.setattr(torch, "randint", broken_randint)  # the generator stays unusable after restore
    with pytest.raises(CaptureError) as info:
        eng.step(xs[2], 1e-3)
    msg = str(info.value)
    assert (
        "\n" not in msg
        and "generator unusable" in msg
        and "--no-fast" in msg
        and "increment an offset" in msg
    )


def test_generator_snapshot_restores_state():
    g = torch.Generator().manual_seed(7)
    snap = GeneratorSnapshot([g, g])
    first = torch.rand(4, generator=g)
    g.manual_seed(0)
    snap.restore()
    assert torch.equal(torch.rand(4, generator=g), first)


def test_cuda_graphs_refuses_a_cpu_device():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        StepEngine(MLP(3, hidden=8, depth=1, time_dim=8), ATObjective(), generator=torch.Generator(), lr=1e-3,
                   graph=True)  # fmt: skip


@pytest.mark.parametrize("graph", [True, False])
def test_compile_modes_with_inductor_cuda_graphs_are_mapped_under_capture(stand_in, monkeypatch, graph):
    """"reduce-overhead" and "max-autotune" turn on Inductor's CUDA graphs, which fail inside the engine's
    capture: with the graph on they compile without them (said once); without it they are kept."""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kw: modes.append(mode) or model)
    no_graphs = "max-autotune-no-cudagraphs"
    for asked, mapped in (("max-autotune", no_graphs), ("reduce-overhead", None), (no_graphs, no_graphs),
                          (None, None)):  # fmt: skip
        modes.clear()
        eng, logs = make(graph=graph, fast=True, compile_mode=asked)
        assert modes == [mapped if graph else asked] * 2  # the model and the attack's detached copy
        assert len(logs) == (graph and asked != mapped), logs
        assert all("turns on Inductor's CUDA graphs" in line for line in logs)


def test_host_read_blame_skips_a_venv_inside_the_checkout(monkeypatch):
    """A read is blamed on the innermost frame of fastat/ or kernels/, never on a virtualenv's (or any
    site-packages') file that happens to live inside the checkout or the package."""
    import traceback

    import fastat.kernels

    import fastat.step.capture as capture

    package = Path(capture.__file__).resolve().parent.parent  # fastat/ (in a checkout or site-packages)
    root, kernels = package.parent, Path(fastat.kernels.__file__).resolve().parent
    venv_torch = root / ".venv-gpu" / "lib" / "python3.12" / "site-packages" / "torch"
    frame = lambda path, line, text: traceback.FrameSummary(str(path), line, "f", line=text)  # noqa: E731
    stack = [
        frame(root / "tests" / "test_x.py", 1, "engine.step(x)"),
        frame(package / "step" / "engine.py", 2, "self._body(x0)"),
        frame(kernels / "loss.py", 3, "_sum_partials_kernel[(1,)](part, out)"),
        frame(venv_torch / "_dynamo" / "eval_frame.py", 4, "return fn(*args)"),
        frame(package / ".venv" / "lib" / "site-packages" / "numpy" / "core.py", 5, "int(a)"),
        frame(package / "step" / "capture.py", 6, "_caller()"),  # dropped: the check itself
        frame(package / "step" / "capture.py", 7, "traceback.extract_stack()"),
    ]
    monkeypatch.setattr(capture.traceback, "extract_stack", lambda: list(stack))
    assert capture._caller() == "loss.py:3 (_sum_partials_kernel[(1,)](part, out))"
    del stack[2]
    assert capture._caller() == "engine.py:2 (self._body(x0))"
