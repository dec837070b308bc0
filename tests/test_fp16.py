"""fp16 end to end: float16 autocast with a GradScaler in the step engine, and ``--precision fp16``."""

import math

import pytest
import torch
from train_helpers import IMAGES, run_cli, weights

from fastat.at.budget import Budget
from fastat.at.objective import ATObjective
from fastat.at.schedule import NoiseSchedule
from fastat.models import build_model
from fastat.step.engine import StepEngine
from fastat.train.checkpoint import load_checkpoint
from fastat.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def engine(precision, clip=0.0, seed=0):
    torch.manual_seed(seed)
    model = build_model("tiny", image_size=8, ch=8, groups=4)
    obj = ATObjective(schedule=NoiseSchedule(T=100), mode="adv", budget=Budget(r_min=0.1, r_scale=0.2))
    return StepEngine(model, obj, generator=torch.Generator().manual_seed(1), lr=1e-3, clip=clip,
                      precision=precision, log=print)  # fmt: skip


def images(seed=2):
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


def test_fp16_step_computes_in_float16_with_true_gradients():
    e16, e32 = engine("fp16", clip=1e9), engine("fp32", clip=1e9)  # a clip that never bites: norm reported
    seen = []
    e16.model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    s16, s32 = e16.step(images(), 1e-3), e32.step(images(), 1e-3)
    assert seen and set(seen) == {torch.float16}  # the model ran under float16 autocast
    assert float(s16["loss_scale"]) == 2.0**16 and float(s16["skipped"]) == 0
    # the scaled backward is unscaled before the norm: the fp32 step's gradient norm, to fp16 accuracy
    assert math.isclose(float(s16["grad_norm"]), float(s32["grad_norm"]), rel_tol=5e-2)
    assert math.isclose(float(s16["loss"]), float(s32["loss"]), rel_tol=1e-2)
    assert all(p.dtype == torch.float32 for p in e16.model.parameters())  # master weights stay fp32


def test_fp16_overflow_is_skipped_and_backs_off_the_scale():
    e = engine("fp16")
    e.step(images(), 1e-3)
    before = [p.detach().clone() for p in e.model.parameters()]
    bad = images()
    bad[0, 0, 0, 0] = float("inf")
    stats = e.step(bad, 1e-3)
    assert float(stats["skipped"]) == 1.0
    assert all(torch.equal(p, q) for p, q in zip(e.model.parameters(), before, strict=True))
    assert e.scaler.get_scale() == 2.0**15  # halved after the overflow
    assert float(e.step(images(), 1e-3)["loss_scale"]) == 2.0**15


def test_precision_fp16_trains_and_resumes_bit_identically(tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    common = [*IMAGES, "--precision", "fp16", "--set", "run.eval_n=0", "--log-every", "1"]
    code, _, err = run_cli(capsys, "train", *common, "--steps", "3", "--out", full)
    assert code == 0, err
    records = [r for r in read_metrics(full) if r["kind"] == "train"]
    assert all(math.isfinite(r["loss"]) and r["loss_scale"] == 2.0**16 for r in records)
    assert run_cli(capsys, "train", *common, "--steps", "2", "--out", part)[0] == 0
    code, _, err = run_cli(capsys, "train", *common, "--steps", "3", "--out", part, "--resume", "auto")
    assert code == 0, err
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float32 for v in a.values())
    # the scaler's state is checkpointed and restored: 3 good steps counted towards the next growth
    for run in (full, part):
        scaler = load_checkpoint(run).state["scaler"]
        assert scaler["scale"] == 2.0**16 and scaler["_growth_tracker"] == 3, scaler


def test_fp16_compile_failure_after_unscale_retries_eagerly(monkeypatch):
    """A compiled first step that fails after ``scaler.unscale_`` (here: in the gradient norm): the eager
    retry unscales again instead of raising "unscale_() has already been called", and the step is the
    eager engine's."""
    import fastat.step.engine

    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # "compiled": the model itself
    real, calls = fastat.step.engine.grad_norm_, []

    def fails_once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("inductor exploded after unscale_")
        return real(*a, **k)

    monkeypatch.setattr(fastat.step.engine, "grad_norm_", fails_once)
    torch.manual_seed(0)
    model = build_model("tiny", image_size=8, ch=8, groups=4)
    obj = ATObjective(schedule=NoiseSchedule(T=100), mode="adv", budget=Budget(r_min=0.1, r_scale=0.2))
    logs = []
    e = StepEngine(model, obj, generator=torch.Generator().manual_seed(1), lr=1e-3, clip=0.0,
                   precision="fp16", fast=True, log=logs.append)  # fmt: skip
    ref = engine("fp16")
    s, r = e.step(images(), 1e-3), ref.step(images(), 1e-3)
    assert e.mode == "eager" and len(logs) == 1 and "after unscale_" in logs[0], logs
    assert torch.equal(s["loss"], r["loss"]) and torch.equal(s["grad_norm"], r["grad_norm"])
    assert float(s["skipped"]) == 0 and e.scaler.get_scale() == ref.scaler.get_scale() == 2.0**16
    assert all(torch.equal(p, q) for p, q in zip(e.model.parameters(), ref.model.parameters(), strict=True))
