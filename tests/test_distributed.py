"""Data-parallel training under ``torchrun``, proven on the CPU with gloo and 2 processes.

Each ``torchrun`` start costs seconds (two interpreters importing torch), so a few runs serve many
tests: the 2-rank units of :mod:`fastat.train.distributed` and the step engine in one job
(``tests/dist_child.py scenario``), one uninterrupted 2-rank training run, and one run stopped twice
(SIGTERM on one rank, then SIGKILL of one rank) and resumed. Every job runs with a timeout: a hang
fails the test instead of the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import run_cli, without_notes

from fastat.at.objective import ATObjective
from fastat.at.sampling import SamplerSpec
from fastat.at.schedule import NoiseSchedule
from fastat.data import build_dataset
from fastat.eval.evaluate import MeasureSpec, evaluate_known
from fastat.models import build_model
from fastat.step.engine import StepEngine
from fastat.train.config import ConfigError, TrainConfig
from fastat.train.distributed import DistContext, fingerprint
from fastat.train.metrics import read_metrics

CHILD = Path(__file__).with_name("dist_child.py")
TIMEOUT = 150  # seconds for one torchrun job (they take ~10-20 s)

# gmm2d with a small MLP: 60 steps of global batch 32 take well under a second per rank
ARGS = ["--dataset", "gmm2d", "--model", "mlp", "--set", "model.kwargs={hidden: 32, depth: 1, time_dim: 16}",
        "--set", "data.n=512", "--batch-size", "32", "--steps", "60", "--log-every", "5",
        "--save-every", "10", "--no-progress", "--set", "run.keep=10", "--set", "run.sample_n=8",
        "--set", "run.sample_steps=4", "--set", "run.eval_n=16", "--set", "run.tensorboard=false",
        "--set", "run.dist_timeout=60",
        "--set", "run.sample_eta=0"]  # fmt: skip  (deterministic DDIM: the spread eval == one process's)


def torchrun(*args, env: dict | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` (a free port of its own), with a timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "0.2", *map(str, args)]  # fmt: skip
    full_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


def fastat_lines(err: str, notes: bool = False) -> list[str]:
    """The lines fastat itself printed on stderr (not torchrun's report); the start-up notes only with
    ``notes``."""
    return [ln for ln in (err if notes else without_notes(err)).splitlines() if ln.startswith("fastat")]


def no_fastat_traceback(err: str) -> bool:
    """No Python traceback passed through fastat's code (torchrun's own report has one of its own)."""
    return not any("fastat/" in ln and ln.strip().startswith("File ") for ln in err.splitlines())


# -- units, one process ---------------------------------------------------------------------------------


def test_the_global_batch_must_split_over_the_ranks():
    with pytest.raises(ConfigError, match=r"--batch-size 30 is the global batch .* size 4, e\.g\. 28 or 32"):
        DistContext(rank=0, world_size=4).check_batch(30)
    DistContext(rank=3, world_size=4).check_batch(32)


def test_one_process_is_the_identity():
    ctx = DistContext()
    assert not ctx.enabled and ctx.is_main and ctx.grad_sync(torch.nn.Linear(2, 2)) is None
    rows = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(ctx.spread(lambda part, start: part * 2 + start, rows), rows * 2)
    assert ctx.gather_objects({"a": 1}) == [{"a": 1}] and ctx.average({"x": 3.0}) == {"x": 3.0}
    assert [ctx.agree_stop(i == 2) for i in range(4)] == [False, False, True, False]


def test_gradient_buckets_follow_the_parameters_that_have_gradients():
    """The bucket layout is computed once and again only when the gradients present (or their dtypes)
    change: one dtype per bucket, parameter order within it, at most bucket_bytes each."""
    from fastat.train.distributed import GradSync

    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float32]
    params = [torch.zeros(4, dtype=d, requires_grad=True) for d in dtypes]
    sync = GradSync(params, DistContext(rank=0, world_size=2), bucket_bytes=32)  # two float32 grads each

    def layout() -> list[list[int]]:
        return [[next(i for i, p in enumerate(params) if p.grad is g) for g in b] for b in sync._buckets()]

    for p in params:
        p.grad = torch.ones_like(p)
    assert layout() == [[2], [0, 1], [3]]  # bfloat16 sorts first
    params[1].grad = None
    assert layout() == [[2], [0, 3]]
    params[1].grad = torch.ones(4)
    assert layout() == [[2], [0, 1], [3]]


def test_fingerprint_sees_one_bit():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g).to(torch.bfloat16), torch.arange(4)]
    fp = fingerprint(ts)
    assert torch.equal(fp, fingerprint([t.clone() for t in ts]))
    for i in range(3):
        changed = [t.clone() for t in ts]
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
        bits = changed[i].view(ints[ts[i].element_size()]).view(-1)
        bits[1] ^= 1  # the lowest bit of one element
        assert not torch.equal(fp, fingerprint(changed)), i
    assert not torch.equal(fp, fingerprint([ts[1], ts[0], ts[2]]))  # the same tensors in another order


# -- the 2-rank units (one torchrun job) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenario")
    p = torchrun(CHILD, "scenario", out)
    assert p.returncode == 0, p.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_an_error_on_one_rank_is_raised_on_every_rank_and_said_by_rank_0(scenario):
    assert scenario[0]["together"] == ["RankFailed", "rank 1: only rank 1 is bad", "main", 2]
    assert scenario[1]["together"] == ["ConfigError", "only rank 1 is bad", "none", 2]


def test_a_stop_requested_on_one_rank_stops_every_rank_at_the_same_step(scenario):
    assert scenario[0]["stop_at"] == scenario[1]["stop_at"] == 4  # requested at call 3, agreed at call 4


@pytest.mark.parametrize("key", ["adv", "pgd", "adv-fast", "adv-fp16", "adv-accum2"])
def test_one_gradient_all_reduce_per_step_and_none_in_the_attack(scenario, key):
    """The recorded ops of a whole step (noise, attack forwards and input-only backwards, the training
    backward, AdamW, EMA) hold exactly one collective: the gradient all-reduce; ``pgd`` runs 3 attack
    backwards, ``adv-fast`` the compiled model (dynamo + AOTAutograd) and its detached attack copy,
    ``adv-fp16`` float16 autocast with its GradScaler (the all-reduce of the scaled gradients),
    ``adv-accum2`` two micro-batches (grad_accum = 2): one all-reduce per step, not per micro-batch."""
    for res in scenario:
        assert res[key]["collectives"] == ["c10d.allreduce_.default"], res[key]["collectives"]
        assert res[key]["ops"] > 300  # the recorder saw the whole step
        assert "distributed.py" not in res[key]["host_reads"], res[key]["host_reads"]  # capturable
    assert scenario[0]["adv-fast"]["fast"] and scenario[1]["adv-fast"]["fast"]


def test_accumulated_ranks_equal_the_unaccumulated_ranks(scenario):
    """grad_accum = 2 on 2 ranks: the same weights as the unaccumulated 2-rank step (to rounding: each
    rank's batch in two micro-batches), identical on both ranks."""
    for res in scenario:
        assert res["adv-accum2"]["x0"][0].shape == res["adv"]["x0"][0].shape == (4, 2)
        for name, w in res["adv"]["weights"].items():
            acc = res["adv-accum2"]["weights"][name]
            assert torch.equal(acc, scenario[0]["adv-accum2"]["weights"][name]), name
            torch.testing.assert_close(acc, w, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("key", ["adv", "pgd", "adv-fast", "adv-fp16"])
def test_ranks_hold_identical_weights_equal_to_the_averaged_gradient_step(scenario, key):
    """Two steps on 2 ranks == two steps of one process whose loss is the mean of the two ranks' losses
    (each rank's own batch and random stream), through the same engine (AdamW's eps = 1 and no clipping:
    summed instead of averaged gradients would move the weights by ~1e-3)."""
    a, b = scenario
    for name in a[key]["weights"]:
        assert torch.equal(a[key]["weights"][name], b[key]["weights"][name]), name

    class TwoRanks:  # the objective of one process standing in for both ranks
        def __init__(self, obj, gens):
            self.obj, self.gens, self.calls = obj, gens, 0

        def __call__(self, model, x0, generator, attack_model=None):
            step, self.calls = self.calls, self.calls + 1
            outs = [
                self.obj(model, x[step], g, attack_model=attack_model)
                for x, g in zip(x0s, self.gens, strict=True)
            ]
            return type(outs[0])((outs[0].loss + outs[1].loss) / 2, outs[0].stats)

    mode, precision = key.split("-")[0], "fp16" if key.endswith("fp16") else "fp32"
    x0s = [res[key]["x0"] for res in scenario]
    gens = [torch.Generator().set_state(res[key]["gen"][0]) for res in scenario]
    torch.manual_seed(0)
    model = build_model("mlp", dim=2, hidden=16, depth=1, time_dim=8)
    obj = TwoRanks(ATObjective(schedule=NoiseSchedule(T=50), mode=mode, pgd_steps=3), gens)
    engine = StepEngine(model, obj, generator=gens[0], lr=1e-2, eps=1.0, clip=0.0, ema_decay=0.9,
                        precision=precision, log=print)  # fmt: skip
    for step in range(2):
        engine.step(x0s[0][step], 1e-2)
    # the same sums in another order (autograd adds four paths at once, not two ranks of two): measured
    # <= 2e-9 in float32 and <= 1.5e-6 under float16 autocast; summed gradients would differ by ~1e-3
    atol = 2e-5 if precision == "fp16" else 1e-7
    for name, w in model.state_dict().items():
        torch.testing.assert_close(w, a[key]["weights"][name], rtol=0, atol=atol, msg=name)
    assert not torch.equal(x0s[0][0], x0s[1][0])  # each rank had its own shard
    if precision == "fp16":  # the loss scale moved alike on both ranks, as in one process
        assert a[key]["scaler"] == b[key]["scaler"] == engine.scaler.state_dict()


def test_weights_that_differ_by_one_ulp_stop_every_rank(scenario):
    for res in scenario:
        message, who = res["identical"]
        assert who == "main" and "model weights of rank 1 differ from rank 0's at step 7" in message


def test_data_is_built_on_rank_0_first_and_a_failure_there_stops_every_rank(scenario):
    a, b = scenario
    assert a["in_turn"][1] <= b["in_turn"][0]  # rank 1 began once rank 0 had finished (0.5 s)
    assert a["in_turn_failed"] == ["ConfigError", "no data on rank 0", "main", [0]]
    assert b["in_turn_failed"] == ["RankFailed", "no data on rank 0", "none", []]  # rank 1 never built


def test_the_random_states_are_gathered_on_rank_0_only(scenario):
    assert scenario[0]["to_main"] == ["state of rank 0", "state of rank 1"] and scenario[1]["to_main"] is None


def test_sampling_is_spread_and_gathered_on_rank_0(scenario):
    a, b = scenario
    assert b["spread"] is None and a["spread"].shape == (11, 2)
    torch.testing.assert_close(a["spread"], a["spread_single"], rtol=1e-6, atol=1e-6)
    assert a["from_main"] == b["from_main"] == "value of rank 0"
    assert a["average"] == b["average"] == {"a": 0.5, "b": 2.0}


# -- training runs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """An uninterrupted 2-rank run (the reference of the resume test)."""
    out = tmp_path_factory.mktemp("two") / "run"
    p = torchrun("-m", "fastat", "train", *ARGS, "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


def test_two_ranks_write_one_run_folder(two_ranks):
    out, p = two_ranks
    records = read_metrics(out)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(5, 61, 5))  # once each
    assert [r["step"] for r in records if r["kind"] == "eval"] == [60]
    assert p.stdout.count("run:        ") == 1 and p.stdout.count("trained 60 steps") == 1
    ranks = "fastat: torchrun: world size 2, backend gloo, per-rank batch 16 (global 32) on cpu"
    assert fastat_lines(p.stderr, notes=True).count(ranks) == 1  # said once, by rank 0
    saved = sorted(c.name for c in (out / "checkpoints").glob("ckpt-*"))
    assert saved == [f"ckpt-{s:06d}" for s in range(10, 61, 10)]
    state = torch.load(out / "checkpoints" / "ckpt-000060" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2 and "rng" not in state  # each once
    r0, r1 = (st["objective"] for st in state["rng_ranks"])
    assert not torch.equal(r0, r1)  # each rank its own noise, timesteps and perturbations
    assert not (out / "tb").exists() and len(list(out.glob("**/*.tmp*"))) == 0
    # the final evaluation, sampled by both ranks and measured on rank 0 == one process's (DDIM)
    cfg = TrainConfig.from_dict(state["config"])
    ema = build_model("mlp", dim=2, hidden=32, depth=1, time_dim=16).eval()
    ema.load_state_dict(load_file(out / "checkpoints" / "ckpt-000060" / "ema.safetensors"))
    td = build_dataset("gmm2d", n=512, seed=0, noise_p=0.9, noise_sigma=0.2)
    summary, _ = evaluate_known(ema, cfg.build_objective().schedule, td.known, td.data, td.clean,
                                MeasureSpec(n=16, sampler=SamplerSpec(steps=4)))  # fmt: skip
    (record,) = [r for r in records if r["kind"] == "eval"]
    assert record["dist_samples"] == pytest.approx(summary["dist_samples"], rel=1e-6)


def _fixed_set_loss(run: Path, step: int, x_t, t, eps) -> float:
    """The DDPM loss of a checkpoint on a fixed set of (x_t, t, eps): the training loss without the
    training noise, so two runs with other random streams can be compared tightly."""
    model = build_model("mlp", dim=2, hidden=32, depth=1, time_dim=16).eval()
    model.load_state_dict(load_file(run / "checkpoints" / f"ckpt-{step:06d}" / "model.safetensors"))
    with torch.no_grad():
        return ((model(x_t, t) - eps) ** 2).mean().item()


def test_two_ranks_track_one_rank(two_ranks, tmp_path, capsys):
    """2 ranks x global batch 32 against 1 process x batch 32 (the same global batches: one data order):
    the loss on a fixed set of 4096 (x_t, t, eps) at every checkpoint within 5% (measured: at most 1.4%,
    3 seeds; other seeds of one process differ by up to 27%)."""
    one = tmp_path / "one"
    code, _, err = run_cli(capsys, "train", *ARGS, "--out", one)
    assert code == 0, err
    td = build_dataset("gmm2d", n=512, seed=0, noise_p=0.9, noise_sigma=0.2)  # the run's training set
    g = torch.Generator().manual_seed(5)
    x0 = td.data.repeat(8, 1)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a, s = NoiseSchedule(T=1000).coeffs(t)
    x_t = a[:, None] * x0 + s[:, None] * eps
    curves = [
        [_fixed_set_loss(run, s, x_t, t, eps) for s in range(10, 61, 10)] for run in (one, two_ranks[0])
    ]
    for l1, l2 in zip(*curves, strict=True):
        assert abs(l2 - l1) <= 0.05 * l1, curves
    assert curves[0][-1] < 0.8 * curves[0][0]  # both learned


def test_stopped_by_sigterm_then_killed_then_resumed_is_bit_exact(two_ranks, tmp_path):
    """SIGTERM on rank 1 alone (a scheduler's) during step 13: both ranks stop at the same step (the vote
    of step 20 carries the request, decided at step 30: StopFlag.VOTE_EVERY = 10), save once and exit;
    resumed, SIGKILL of rank 1: rank 0 stops too (no hang); resumed again: the run ends with the very
    weights, EMA and losses of the uninterrupted one.

    Nothing here depends on how fast the machine is: the faults fire at step counts of the ranks' own
    progress (tests/dist_child.py), the stop is voted at fixed steps, and no clock limits a rank. A busy
    machine only makes the jobs slower, so the collectives wait as long as the jobs may (a rank slowed
    past ARGS' run.dist_timeout of 60 s would be reported as gone, an error line), and the jobs' own
    timeout is a guard against a hang, not a bound on the work."""
    out, slow_ok = tmp_path / "run", {"timeout": 900}
    args = [*ARGS, "--set", f"run.dist_timeout={slow_ok['timeout']}"]
    fault = {"FASTAT_TEST_FAULT_RANK": "1"}
    term = {**fault, "FASTAT_TEST_FAULT": "term", "FASTAT_TEST_FAULT_STEP": "13"}  # rank 1, its step 13
    p = torchrun(CHILD, "fault", "train", *args, "--out", out, env=term, **slow_ok)
    assert p.returncode != 0 and no_fastat_traceback(p.stderr), p.stderr[-3000:]
    lines = fastat_lines(p.stderr)  # rank 0 speaks (the signal came to rank 1)
    assert len(lines) == 1 and "interrupted at step 30; checkpoint saved" in lines[0], lines
    assert (out / "checkpoints" / "latest").read_text().strip() == "ckpt-000030"

    kill = {**fault, "FASTAT_TEST_FAULT": "kill", "FASTAT_TEST_FAULT_STEP": "12"}  # step 42: 30 + 12
    p = torchrun(CHILD, "fault", "train", *args, "--out", out, "--resume", "auto", env=kill, **slow_ok)
    assert p.returncode != 0 and "SIGKILL" in p.stderr, p.stderr[-3000:]
    assert no_fastat_traceback(p.stderr), p.stderr[-3000:]
    assert not [ln for ln in fastat_lines(p.stderr) if "error" in ln], p.stderr[-3000:]  # torchrun says how
    assert (out / "checkpoints" / "latest").read_text().strip() == "ckpt-000040"

    p = torchrun("-m", "fastat", "train", *args, "--out", out, "--resume", "auto", **slow_ok)
    assert p.returncode == 0, p.stderr[-3000:]
    ref = two_ranks[0] / "checkpoints" / "ckpt-000060"
    for f in ("model.safetensors", "ema.safetensors"):
        got, want = load_file(out / "checkpoints" / "ckpt-000060" / f), load_file(ref / f)
        assert all(torch.equal(got[k], want[k]) for k in want), f
    losses = [
        {r["step"]: r["loss"] for r in read_metrics(d) if r["kind"] == "train"} for d in (out, two_ranks[0])
    ]
    assert losses[0].keys() == losses[1].keys() and losses[0] == losses[1]


def test_building_the_data_may_take_longer_than_the_collective_timeout(tmp_path):
    """Rank 0 builds its data for 6 s (a long first prepare) with run.dist_timeout = 3 s: the other rank
    waits through the store, not a collective, and the run trains."""
    slow = {"FASTAT_TEST_FAULT": "slowdata", "FASTAT_TEST_FAULT_RANK": "0", "FASTAT_TEST_FAULT_STEP": "6"}
    p = torchrun(CHILD, "fault", "train", *ARGS, "--steps", "10", "--set", "run.dist_timeout=3",
                 "--set", "run.eval_n=0", "--out", tmp_path / "run", env=slow)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "trained 10 steps" in p.stdout


def test_ranks_that_see_different_run_folders_stop_with_one_line(two_ranks, tmp_path):
    """A relative --out in another working directory per rank (as on nodes with their own disks): rank 0
    would resume the run's checkpoint, rank 1 start fresh; refused before anything is written."""
    import shutil

    shutil.copytree(two_ranks[0], tmp_path / "rank0" / "run")
    (tmp_path / "rank1").mkdir()
    before = sorted(p.name for p in (tmp_path / "rank0" / "run").rglob("*"))
    p = torchrun(CHILD, "fault", "train", *ARGS, "--set", "run.dist_timeout=10", "--out", "run", "--resume",
                 "auto", env={"FASTAT_TEST_CWD": f"{tmp_path}/rank"})  # fmt: skip
    assert p.returncode != 0 and no_fastat_traceback(p.stderr), p.stderr[-3000:]
    assert fastat_lines(p.stderr) == [
        "fastat: error: rank 1: this rank would resume nothing (a fresh start), rank 0 ckpt-000060 "
        "(step 60): the run folder must be on a filesystem that every rank sees at the same path (a shared "
        "disk; an absolute --out)"
    ], p.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "rank0" / "run").rglob("*")) == before
    assert not list((tmp_path / "rank1").iterdir())


def test_a_rank_error_is_one_line(tmp_path):
    fault = {"FASTAT_TEST_FAULT": "raise", "FASTAT_TEST_FAULT_RANK": "1", "FASTAT_TEST_FAULT_STEP": "3"}
    p = torchrun(CHILD, "fault", "train", *ARGS, "--out", tmp_path / "run", env=fault)
    assert p.returncode != 0
    assert fastat_lines(p.stderr) == [
        "fastat: error: rank 1: RuntimeError: injected failure (--traceback for details)"
    ], p.stderr[-3000:]
    assert no_fastat_traceback(p.stderr), p.stderr[-3000:]
    assert "traceback : fastat: error: rank 1: RuntimeError: injected" in p.stderr  # torchrun's report


def test_resume_with_another_world_size_continues_and_says_so(two_ranks, tmp_path, capsys):
    ckpt = two_ranks[0] / "checkpoints" / "ckpt-000040"
    code, _, err = run_cli(capsys, "train", *ARGS, "--resume", ckpt, "--out", tmp_path / "one")
    assert code == 0, err
    assert "written by 2 rank(s), this run has 1: it continues from step 40" in " ".join(err.split())
    assert "not bit-exactly" in err
    records = [r for r in read_metrics(tmp_path / "one") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [45, 50, 55, 60] and all(r["loss"] < 10 for r in records)
    state = torch.load(tmp_path / "one" / "checkpoints" / "ckpt-000060" / "state.pt", weights_only=True)
    assert (state["loader"]["epoch"], state["loader"]["samples"]) == divmod(60 * 32, 512)  # by samples seen
    assert "world_size" not in state  # one rank now


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pytest -k cuda on a GPU machine)")
def test_cuda_nccl_all_reduce_is_captured_with_the_step(tmp_path):
    """On one GPU (an NCCL group of one): the step with its gradient all-reduce is captured in a CUDA
    graph (not a fallback), and its replays give the weights and losses of the same step run eagerly."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}  # fmt: skip
    p = subprocess.run([sys.executable, CHILD, "cuda", tmp_path], env=env, capture_output=True, text=True,
                       timeout=TIMEOUT)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    res = torch.load(tmp_path / "cuda.pt", weights_only=False)
    eager, graph = res[False], res[True]
    assert graph["captured"] and not eager["captured"], p.stdout[-2000:]
    assert eager["calls"] == 7 and graph["calls"] == 4  # 3 warm-up steps and the capture; replays after
    assert graph["losses"] == pytest.approx(eager["losses"], rel=1e-5, abs=1e-6)
    for k, w in eager["weights"].items():
        torch.testing.assert_close(graph["weights"][k], w, rtol=1e-5, atol=1e-6, msg=k)
