"""The training loop: exact resume, EMA, metrics, samples, Ctrl-C, every mode, bf16 autocast path."""

from __future__ import annotations

import math
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from train_helpers import IMAGES, POINTS, run_cli, weights, without_notes

import fastat.train.loop as loop_mod
import fastat.train.run as train_mod
from fastat.step.ema import EMA
from fastat.train.checkpoint import load_checkpoint
from fastat.train.config import TrainConfig
from fastat.train.metrics import StatsAccumulator, read_metrics
from fastat.train.run import lr_at, resolve_config


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one intra-op thread, and a shared CPU makes OpenMP spin-waiting of a
    second thread cost 100x: keep the tests' time independent of the machine's load."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- exact resume ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,accum", [("adv", 1), ("free", 1), ("free", 2)])
def test_resume_is_bit_identical(tmp_path, capsys, mode, accum):
    """N steps, then resume to 2N == 2N straight: every tensor of the model, the EMA and the optimizer.

    Exercises every random stream: dropout (global RNG), the objective's generator (t, eps, attack
    start), batch order across an epoch boundary (48 samples / batch 8 = 6 batches) and flips. free
    (3 replays): the checkpoint at step 4 is taken between two replays of a batch; with accum = 2, each
    replay in 2 micro-batches of 4 (--grad-accum)."""
    common = [
        *IMAGES,
        "--mode",
        mode,
        "--replays",
        "3",
        "--set",
        "model.kwargs={ch: 8, groups: 4, dropout: 0.2}",
        "--set",
        "data.flip=true",
        "--save-every",
        "3",
        "--sample-every",
        "0",
        "--set",
        "run.eval_n=0",
        "--grad-accum",
        str(accum),
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(capsys, "train", *common, "--steps", "8", "--out", straight)[0] == 0
    assert run_cli(capsys, "train", *common, "--steps", "4", "--out", split)[0] == 0
    code, out, _ = run_cli(
        capsys, "train", "--out", split, "--resume", "auto", "--steps", "8", "--no-progress"
    )
    assert code == 0 and "ckpt-000008" in out
    assert f"grad_accum: {accum}" in (split / "config.yaml").read_text()

    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a.step == b.step == 8
    for which in ("model", "ema"):
        wa, wb = getattr(a, which), getattr(b, which)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (which, k)
    sa, sb = a.state["optimizer"]["state"], b.state["optimizer"]["state"]
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][k], sb[i][k])
    assert torch.equal(a.state["rng"]["objective"], b.state["rng"]["objective"])
    assert a.state["loader"]["epoch"] == b.state["loader"]["epoch"] == (1 if mode == "adv" else 0)
    if mode == "free":
        mid = load_checkpoint(split / "checkpoints" / "ckpt-000004").state["rng"]["objective_state"]["replay"]
        assert int(mid["k"]) == 1 and mid["x0"].shape == (8, 3, 8, 8)  # resumed between two replays
        ra, rb = (c.state["rng"]["objective_state"]["replay"] for c in (a, b))
        assert ra.keys() == rb.keys() and ra.pop("m") == rb.pop("m") == 3
        for k, v in ra.items():
            assert torch.equal(v, rb[k]), k

    # the comparison can fail: a different seed gives different weights
    other = tmp_path / "other"
    assert run_cli(capsys, "train", *common, "--steps", "8", "--seed", "1", "--out", other)[0] == 0
    assert not torch.equal(weights(other)["conv_out.weight"], a.model["conv_out.weight"])


def test_resume_continues_metrics_without_duplicates(tmp_path, capsys):
    run = tmp_path / "r"
    assert run_cli(capsys, "train", *POINTS, "--steps", "4", "--out", run)[0] == 0
    assert run_cli(capsys, "train", "--out", run, "--resume", run, "--steps", "8", "--no-progress")[0] == 0
    steps = [r["step"] for r in read_metrics(run) if r["kind"] == "train"]
    assert steps == [2, 4, 6, 8]
    # resuming a finished run trains nothing, keeps its checkpoint, and samples again
    code, out, _ = run_cli(capsys, "train", "--out", run, "--resume", "auto", "--no-progress")
    assert code == 0 and "ckpt-000008" in out and "trained 0 steps (the run was at step 8)" in out
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [2, 4, 6, 8]


# -- EMA -----------------------------------------------------------------------------------------------


def test_ema_update_matches_the_formula():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    ema = EMA(model, decay=0.99, warmup=True)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.99, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        for k, v in model.state_dict().items():
            ref[k] = d * ref[k] + (1 - d) * v
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-6, atol=1e-6)
    assert ema.num_updates == 5
    assert not any(p.requires_grad for p in ema.module.parameters())
    no_warm = EMA(model, decay=0.9, warmup=False)
    assert no_warm.current_decay() == 0.9


def test_ema_accepts_a_tensor_weight():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.lerp_(model, torch.tensor(0.25))
    torch.testing.assert_close(ema.module.weight, model.weight - 0.75)


# -- loop pieces -----------------------------------------------------------------------------------------


def test_lr_warmup():
    assert lr_at(0, 1e-3, 4) == pytest.approx(2.5e-4)
    assert lr_at(3, 1e-3, 4) == pytest.approx(1e-3)
    assert lr_at(100, 1e-3, 4) == 1e-3
    assert lr_at(0, 1e-3, 0) == 1e-3


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_lr_decay(schedule):
    # warmup 10 steps, decay over steps 10..109 (the last step, total - 1, reaches final * lr)
    lrs = [lr_at(s, 1.0, 10, schedule, 110, 0.1) for s in range(110)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # non-increasing
    quarter = lr_at(10 + 99 // 4, 1.0, 10, schedule, 110, 0.0)  # step 34: 24 of 99 decay steps done
    frac = 24 / 99
    want = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac
    assert quarter == pytest.approx(want)
    assert lr_at(500, 1.0, 10, schedule, 110, 0.1) == pytest.approx(0.1)  # past the end: stays at the floor
    assert lr_at(5, 1.0, 10, "constant", 110, 0.1) == pytest.approx(0.6)
    assert lr_at(50, 1.0, 10, "constant", 110, 0.1) == 1.0


def test_stats_accumulator_means_and_reset():
    acc = StatsAccumulator()
    acc.add({"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
    acc.add({"a": torch.tensor(3.0)})
    assert acc.pop_means() == {"a": 2.0, "b": 2.0}
    assert acc.pop_means() == {}


def test_stats_accumulator_weights_drop_skipped_steps_and_reads_extras_at_once():
    acc = StatsAccumulator()
    for v, ok in ((1.0, 1.0), (float("nan"), 0.0), (5.0, 1.0)):
        acc.add({"loss": torch.tensor(v)}, weight=torch.tensor(ok))
        acc.add({"skipped": torch.tensor(1.0 - ok)})
    means = acc.pop_means({"streak": torch.tensor(7, dtype=torch.int64)})
    assert means == {"loss": 3.0, "skipped": pytest.approx(1 / 3), "streak": 7.0}
    acc.add({"loss": torch.tensor(float("nan"))}, weight=torch.tensor(0.0))
    assert math.isnan(acc.pop_means()["loss"])  # no good step in the interval


# -- what a run writes ---------------------------------------------------------------------------------


def test_metrics_samples_and_eval_of_a_points_run(tmp_path, capsys):
    run = tmp_path / "pts"
    code, out, _ = run_cli(capsys, "train", *POINTS, "--steps", "6", "--sample-every", "4", "--out", run)
    assert code == 0
    records = read_metrics(run)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:
        for key in ("loss", "loss_dm", "reg", "gain", "j", "radius", "grad_norm", "lr", "img_per_s", "epoch"):
            assert key in r and math.isfinite(r[key]), key
        assert r["loss"] == pytest.approx(r["loss_dm"] + r["reg"], rel=1e-4)
        assert r["gain"] > 0
    assert train[0]["lr"] < train[-1]["lr"]  # warmup
    (ev,) = [r for r in records if r["kind"] == "eval"]
    assert ev["n"] == 16 and ev["dist_data"] > 0 and ev["dist_samples"] > 0
    # points: raw samples in data units; the sample grid at step 4 and the final one at step 6
    for step in (4, 6):
        arr = np.load(run / "samples" / f"step-{step:06d}.npy")
        assert arr.shape == (8, 2) and arr.dtype == np.float32 and np.isfinite(arr).all()
    assert "distance to the clean support" in out
    assert (run / "config.yaml").is_file()
    saved = TrainConfig.from_yaml(run / "config.yaml")
    assert saved.run.steps == 6 and saved.model.name == "mlp" and saved.model.kwargs["dim"] == 2


@pytest.mark.parametrize("mode", ["ddpm", "rand", "pgd", "inv", "free"])
def test_every_mode_trains(tmp_path, capsys, mode):
    run = tmp_path / mode
    code, _, err = run_cli(
        capsys,
        "train",
        *POINTS,
        "--steps",
        "2",
        "--mode",
        mode,
        "--set",
        "run.eval_n=0",
        "--set",
        "objective.pgd_steps=2",
        "--out",
        run,
    )
    assert code == 0, err
    (r,) = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert math.isfinite(r["loss"])
    assert ("gain" in r) == (mode in ("pgd", "inv", "free"))
    # the cost: forward-pass equivalents per image seen; free sees each batch twice (2 replays)
    units = {"ddpm": 3, "rand": 6, "pgd": 3 + 2 * 2 + 3, "inv": 8, "free": 6}[mode]
    assert (r["flop_units"], r["images_seen"], r["flop_units_total"]) == (units, 16, 16 * units)
    assert r["fresh_images"] == (8 if mode == "free" else 16)
    if mode == "ddpm":
        assert r["reg"] == 0.0
    else:
        assert r["reg"] > 0


def test_bf16_autocast_path_on_cpu(tmp_path, capsys):
    run = tmp_path / "bf16"
    code, _, err = run_cli(capsys, "train", *IMAGES, "--steps", "2", "--precision", "bf16", "--out", run)
    assert code == 0, err
    (r,) = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert math.isfinite(r["loss"]) and r["loss"] > 0
    assert all(v.dtype == torch.float32 for v in weights(run).values())  # master weights stay fp32


def test_image_run_writes_a_grid(tmp_path, capsys):
    from PIL import Image

    run = tmp_path / "img"
    code, out, _ = run_cli(capsys, "train", *IMAGES, "--steps", "2", "--out", run)
    assert code == 0
    grid = run / "samples" / "step-000002.png"
    assert f"samples:    {grid}" in out
    with Image.open(grid) as im:
        assert im.size == (2 * 128 + 3, 2 * 128 + 3)  # 4 samples, 2 per row, 8 px enlarged 16x, padding 1
    assert np.asarray(Image.open(grid)).std() > 0


# -- Ctrl-C ----------------------------------------------------------------------------------------------


def _interrupt_at(monkeypatch, call: int, how: str):
    real = loop_mod.train_step
    calls = {"n": 0}

    def step(*a, **k):
        calls["n"] += 1
        if how == "before" and calls["n"] == call:
            raise KeyboardInterrupt  # cut inside the step: nothing applied, state not consistent
        out = real(*a, **k)
        if how == "signal" and calls["n"] == call:
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C during the step
        return out

    monkeypatch.setattr(loop_mod, "train_step", step)


def test_ctrl_c_saves_a_checkpoint_and_resumes(tmp_path, capsys, monkeypatch):
    run = tmp_path / "int"
    _interrupt_at(monkeypatch, 3, "signal")
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when started in the background
    code, _, err = run_cli(capsys, "train", *POINTS, "--steps", "10", "--out", run)
    assert code == 130
    assert "interrupted at step 3" in err and "checkpoint saved" in err and "Traceback" not in err
    assert load_checkpoint(run).step == 3
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    monkeypatch.undo()
    code, out, _ = run_cli(capsys, "train", "--out", run, "--resume", "auto", "--no-progress")
    assert code == 0 and load_checkpoint(run).step == 10


def test_interrupt_inside_a_step_keeps_the_last_complete_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "int2"
    _interrupt_at(monkeypatch, 4, "before")
    code, _, err = run_cli(capsys, "train", *POINTS, "--steps", "10", "--save-every", "2", "--out", run)
    assert code == 130 and "last complete checkpoint" in err
    assert load_checkpoint(run).step == 2


def test_skipped_steps_stop_with_one_line(tmp_path, capsys, monkeypatch):
    def skipped(engine, x0, *, lr):  # what the engine reports for a non-finite step
        engine.skip_streak += 1
        return {"loss": torch.tensor(float("nan")), "skipped": torch.tensor(1.0)}

    monkeypatch.setattr(loop_mod, "train_step", skipped)
    code, _, err = run_cli(capsys, "train", *POINTS, "--steps", "4", "--set", "run.max_skipped=2",
                           "--out", tmp_path / "nan")  # fmt: skip
    assert code == 1 and "stopped at step 2: the last 2 steps were skipped" in err and "Traceback" not in err
    assert "last good checkpoint is none" in err


# -- config layering on resume ----------------------------------------------------------------------------


def test_resume_uses_the_saved_config_under_new_flags(tmp_path, capsys):
    run = tmp_path / "r"
    assert run_cli(capsys, "train", *POINTS, "--steps", "2", "--lr", "0.003", "--out", run)[0] == 0
    cfg, ckpt = resolve_config({"run.out": str(run), "run.steps": 5}, resume="auto")
    assert ckpt is not None and ckpt.name == "ckpt-000002"
    assert cfg.optim.lr == 0.003 and cfg.run.steps == 5 and cfg.data.dataset == "gmm2d"
    # resume auto in a fresh folder starts a new run
    cfg, ckpt = resolve_config({"run.out": str(tmp_path / "fresh")}, resume="auto")
    assert ckpt is None and cfg.model.name == "tiny"
    # the run folder keeps the weights the EMA produced, distinct from the raw ones
    ema, raw = load_file(run / "checkpoints" / "ckpt-000002" / "ema.safetensors"), weights(run)
    assert not torch.equal(ema["out.weight"], raw["out.weight"])


def test_tensorboard_gets_the_same_scalars_when_installed(tmp_path, capsys, monkeypatch):
    import sys
    import types

    calls = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("init", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close", None))

    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter)
    )
    run = tmp_path / "tb"
    assert run_cli(capsys, "train", *POINTS, "--steps", "2", "--out", run)[0] == 0
    assert calls[0] == ("init", str(run / "tb")) and calls[-1] == ("close", None)
    assert ("train/loss", 2) in calls and ("train/lr", 2) in calls and ("eval/dist_samples", 2) in calls


@pytest.mark.slow
def test_fast_flag_trains_the_same_function_as_the_eager_step(tmp_path, capsys):
    """``--fast`` on the CPU: the compiled engine; its weights after a few steps match the eager run."""
    eager, fast = tmp_path / "eager", tmp_path / "fast"
    common = [*POINTS, "--steps", "4", "--sample-every", "0", "--set", "run.eval_n=0"]
    assert run_cli(capsys, "train", *common, "--out", eager)[0] == 0
    code, _, err = run_cli(capsys, "train", *common, "--fast", "--out", fast)
    assert code == 0 and "falling back" not in err, err
    w_e, w_f = weights(eager), weights(fast)
    assert w_e.keys() == w_f.keys()
    for k in w_e:
        torch.testing.assert_close(w_f[k], w_e[k], atol=1e-5, rtol=1e-4, msg=k)
    assert "fast: true" in (fast / "config.yaml").read_text()


def test_final_report_is_the_loops_evaluation_and_matches_fastat_eval(tmp_path, capsys):
    """`fastat train` prints its final report from the loop's own evaluation (no second sampling), and it
    equals what `fastat eval --run` measures on the same checkpoint."""
    import json

    from fastat.eval import evaluate_run

    run = tmp_path / "rep"
    assert run_cli(capsys, "train", *POINTS, "--steps", "4", "--sample-every", "0", "--out", run)[0] == 0
    saved = json.loads((run / "eval.json").read_text())
    (ev,) = [r for r in read_metrics(run) if r["kind"] == "eval"]
    assert saved["metrics"]["dist_mean"] == pytest.approx(ev["dist_samples"], rel=1e-6)
    again = evaluate_run(run, n=16, write=False)
    assert again["metrics"]["dist_mean"] == pytest.approx(saved["metrics"]["dist_mean"], rel=1e-5)
    assert again["metrics"]["sw"] == pytest.approx(saved["metrics"]["sw"], rel=1e-5)


# -- the loop's edges: the last step, a second Ctrl-C, a postponed save, a read error, a finished run ------


def test_a_signal_during_the_last_step_lets_the_run_finish(tmp_path, capsys, monkeypatch):
    run = tmp_path / "last"
    _interrupt_at(monkeypatch, 4, "signal")
    code, out, err = run_cli(capsys, "train", *POINTS, "--steps", "4", "--out", run)
    assert code == 0, err
    assert "trained 4 steps" in out and load_checkpoint(run).step == 4
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "eval"] == [4]
    assert (run / "samples" / "step-000004.png").exists() or (run / "samples" / "step-000004.npy").exists()


def test_a_second_ctrl_c_between_steps_quits_at_once(tmp_path, capsys, monkeypatch):
    """Two Ctrl-C while the loop writes a sample grid after step 3: no save at step 3 (the second one
    quits now), the last complete checkpoint (step 2) is the one to resume."""
    real = loop_mod.write_grid

    def grid(run, state, cfg, td, step, ctx):
        if step == 3:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real(run, state, cfg, td, step, ctx)

    monkeypatch.setattr(loop_mod, "write_grid", grid)
    run = tmp_path / "twice"
    code, _, err = run_cli(capsys, "train", *POINTS, "--steps", "10", "--save-every", "2", "--sample-every",
                           "3", "--out", run)  # fmt: skip
    assert code == 130 and "interrupted at step 3; the last complete checkpoint is" in err, err
    assert load_checkpoint(run).step == 2 and "ckpt-000002" in err


def test_a_save_on_a_skipped_step_is_postponed_to_the_next_good_step(tmp_path, capsys, monkeypatch):
    real = loop_mod.train_step

    def step(engine, x0, *, lr):
        if engine.steps_done != 9:  # the 10th step is skipped (as the engine reports a non-finite one)
            return real(engine, x0, lr=lr)
        engine.steps_done += 1
        engine.skip_streak += 1
        return {"loss": torch.tensor(float("nan")), "skipped": torch.ones(())}

    monkeypatch.setattr(loop_mod, "train_step", step)
    run = tmp_path / "later"
    code, _, err = run_cli(capsys, "train", *POINTS, "--steps", "14", "--save-every", "5", "--keep", "10",
                           "--sample-every", "0", "--set", "run.eval_n=0", "--out", run)  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*")) == [
        "ckpt-000005", "ckpt-000011", "ckpt-000014"]  # fmt: skip
    assert {r["step"]: r["skipped"] for r in read_metrics(run) if r["kind"] == "train"}[10] == 1


def test_a_read_error_is_said_as_one(tmp_path, capsys, monkeypatch):
    import errno

    from fastat.data import TensorLoader

    real, calls = TensorLoader.next_batch, [0]

    def next_batch(self):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.EIO, "Input/output error", "/data/shard-00003.npy")
        return real(self)

    monkeypatch.setattr(TensorLoader, "next_batch", next_batch)
    code, _, err = run_cli(capsys, "train", *POINTS, "--steps", "4", "--save-every", "2", "--out",
                           tmp_path / "r")  # fmt: skip
    assert code == 1 and len(without_notes(err).strip().splitlines()) == 1, err
    assert "cannot read /data/shard-00003.npy: Input/output error; the last checkpoint" in err
    assert "ckpt-000002) is intact" in err


def test_resuming_a_finished_run_evaluates_once_and_extending_it_keeps_its_evaluation(tmp_path, capsys):
    run = tmp_path / "done"
    assert run_cli(capsys, "train", *POINTS, "--steps", "4", "--out", run)[0] == 0
    for steps, evals in ((4, [4]), (4, [4]), (6, [4, 6])):
        code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "auto", "--steps", steps,
                               "--no-progress")  # fmt: skip
        assert code == 0, err
        assert [r["step"] for r in read_metrics(run) if r["kind"] == "eval"] == evals


def test_a_half_set_torchrun_environment_is_one_line(tmp_path, capsys, monkeypatch):
    from train_helpers import assert_one_line_error

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    code, _, err = run_cli(capsys, "train", *POINTS, "--dry-run", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "incomplete torchrun job", "WORLD_SIZE='2', RANK=None")


def test_only_the_training_devices_cuda_random_state_is_saved_and_old_lists_still_load(monkeypatch):
    """A checkpoint of a machine with 8 visible GPUs (the old format: every device's state) resumes on
    one with a single GPU; new checkpoints hold the training device's state alone. (CUDA stood in for.)"""
    from types import SimpleNamespace

    states = {0: torch.arange(4, dtype=torch.uint8)}

    def get_state(device="cuda"):
        return states[torch.device(device).index].clone()

    def set_state(state, device="cuda"):
        states[torch.device(device).index] = state.clone()

    def set_all(new):  # as torch does: one device per entry (an IndexError past the visible ones)
        for i, st in enumerate(new):
            if i not in states:
                raise IndexError(f"device {i} is not visible")
            set_state(st, torch.device("cuda", i))

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [states[i].clone() for i in sorted(states)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    engine = SimpleNamespace(objective_state_dict=dict, load_objective_state=lambda state: None,
                             generator=torch.Generator())  # fmt: skip
    st = train_mod.TrainState(nn.Linear(1, 1), engine, None, torch.device("cuda", 0))
    saved = st.rng_state()
    assert torch.equal(saved["cuda"], states[0])  # one tensor: this device's
    old = {**saved, "cuda": [torch.full((4,), 7 + i, dtype=torch.uint8) for i in range(8)]}
    st.set_rng_state(old)
    assert torch.equal(states[0], torch.full((4,), 7, dtype=torch.uint8))
