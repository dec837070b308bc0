"""What ``tests/test_distributed.py`` runs on every rank under ``torchrun`` (not collected by pytest).

    torchrun ... tests/dist_child.py fault train ARGS...   # fastat, with a fault injected on one rank
    torchrun ... tests/dist_child.py scenario OUT          # the distributed units, results in OUT/rank<R>.pt
    RANK=0 WORLD_SIZE=1 ... python tests/dist_child.py cuda OUT   # one GPU: NCCL all-reduce in a graph

``fault``: ``FASTAT_TEST_FAULT`` = ``kill`` (SIGKILL itself), ``term`` (SIGTERM itself: a scheduler
stopping one rank) or ``raise`` (an exception inside the step) on rank ``FASTAT_TEST_FAULT_RANK``
before its ``FASTAT_TEST_FAULT_STEP``-th step of this process; ``slowdata``: that rank takes
``FASTAT_TEST_FAULT_STEP`` seconds more to build its data (a long first prepare); ``FASTAT_TEST_CWD``: each
rank works in the folder ``<FASTAT_TEST_CWD><rank>`` (ranks that see different run folders).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def fault(argv: list[str]) -> int:
    from fastat.app.cli import main
    from fastat.train import loop as L
    from fastat.train import run as T

    kind, rank = os.environ.get("FASTAT_TEST_FAULT"), int(os.environ.get("FASTAT_TEST_FAULT_RANK", "1"))
    at = int(os.environ.get("FASTAT_TEST_FAULT_STEP", "1"))
    if "FASTAT_TEST_CWD" in os.environ:
        os.chdir(os.environ["FASTAT_TEST_CWD"] + os.environ["RANK"])
    if kind == "slowdata" and int(os.environ["RANK"]) == rank:
        import time

        build = T.build_training_data

        def slow_build(*a, **k):
            time.sleep(at)
            return build(*a, **k)

        T.build_training_data = slow_build
    elif kind and int(os.environ["RANK"]) == rank:
        step, count = L.train_step, [0]

        def faulty_step(engine, x0, *, lr):
            count[0] += 1
            if count[0] == at:
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif kind == "term":
                    os.kill(os.getpid(), signal.SIGTERM)
                elif kind == "raise":
                    raise RuntimeError("injected failure")
            return step(engine, x0, lr=lr)

        L.train_step = faulty_step
    return main(argv)


def scenario(out: Path) -> int:
    import time

    import torch

    from fastat.at.objective import ATObjective
    from fastat.at.schedule import NoiseSchedule
    from fastat.data import TensorLoader
    from fastat.models import build_model
    from fastat.step.capture import HostReadCheck
    from fastat.step.engine import StepEngine
    from fastat.train.config import ConfigError
    from fastat.train.distributed import DistContext, DistributedError, who_says
    from fastat.train.samples import generate

    class Ops(HostReadCheck):  # every op's name as well as the host reads
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return super().__torch_dispatch__(func, types, args, kwargs)

    ctx = DistContext.from_env(timeout_s=60)
    r = ctx.rank
    res: dict = {"rank": r, "world": ctx.world_size}

    # an error on one rank inside together(): raised on every rank, said by rank 0 only
    try:
        with ctx.together("the test"):
            if r == 1:
                raise ConfigError("only rank 1 is bad")
    except Exception as e:  # noqa: BLE001
        res["together"] = [type(e).__name__, str(e), who_says(e), getattr(e, "exit_code", 2)]

    # data built in turn: rank 0 first, then the others (through the store); a failure on rank 0 skips
    # the others' builds and is raised everywhere
    def build(seconds: float) -> list[float]:
        t0 = time.monotonic()
        time.sleep(seconds)
        return [t0, time.monotonic()]

    res["in_turn"] = ctx.in_turn(lambda: build(0.5 if r == 0 else 0.0), "the test data")
    built = []

    def failing() -> None:
        built.append(r)
        if r == 0:
            raise ConfigError("no data on rank 0")

    try:
        ctx.in_turn(failing, "the test data")
    except Exception as e:  # noqa: BLE001
        res["in_turn_failed"] = [type(e).__name__, str(e), who_says(e), built]
    res["to_main"] = ctx.gather_to_main(f"state of rank {r}")

    # a stop requested on rank 1 at call 3: every rank stops at the same call
    stops = [ctx.agree_stop(r == 1 and i == 3, last=i == 7) for i in range(8)]
    res["stop_at"] = stops.index(True)

    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    schedule = NoiseSchedule(T=50)
    # The compiled step with dynamo + AOTAutograd (which decide what the backward computes) but without
    # Inductor's code generation (minutes on two busy cores; it changes no collective).
    compile_ = torch.compile
    torch.compile = lambda m, **kw: compile_(m, backend="aot_eager", dynamic=kw.get("dynamic"))
    for mode, fast, precision, accum in (("adv", False, "fp32", 1), ("pgd", False, "fp32", 1),
                                         ("adv", True, "fp32", 1), ("adv", False, "fp16", 1),
                                         ("adv", False, "fp32", 2)):  # fmt: skip
        torch.manual_seed(0)
        model = build_model("mlp", dim=2, hidden=16, depth=1, time_dim=8)
        loader = TensorLoader(data, 8, generator_seed=0, rank=r, world_size=ctx.world_size)
        gen = torch.Generator().manual_seed(ctx.rank_seed(0, "objective"))
        obj = ATObjective(schedule=schedule, mode=mode, pgd_steps=3)
        # AdamW's eps and no clipping make the update depend on the gradients' scale (the mean, not sum)
        engine = StepEngine(model, obj, generator=gen, lr=1e-2, eps=1.0, clip=0.0, ema_decay=0.9, fast=fast,
                            precision=precision, log=print, reduce_grads=ctx.grad_sync(model),
                            ranks=ctx, grad_accum=accum)  # fmt: skip
        key = f"{mode}{'-fast' if fast else ''}{'-fp16' if precision == 'fp16' else ''}"
        key += f"-accum{accum}" if accum > 1 else ""
        batches, states, ops = [], [], None
        for step in range(2):
            x0 = loader.next_batch()
            batches.append(x0.clone())
            states.append(gen.get_state())
            if step == 1:
                with Ops() as ops:
                    engine.step(x0, 1e-2)
            else:
                engine.step(x0, 1e-2)
        res[key] = {
            "x0": batches,
            "gen": states,
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "fast": engine.fast,
            "scaler": engine.scaler.state_dict() if engine.scaler is not None else None,
        }
        if ops is not None:
            res[key]["collectives"] = [n for n in ops.names if n.startswith("c10d.")]
            res[key]["host_reads"] = ops.report()
            res[key]["ops"] = len(ops.names)

    # bit-identical check: a one-ulp change on rank 1 is found (said by rank 0)
    torch.manual_seed(0)
    model = build_model("mlp", dim=2, hidden=16, depth=1, time_dim=8)
    ctx.check_identical({"model": model}, step=5)
    if r == 1:
        with torch.no_grad():
            w = next(model.parameters())
            w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(1.0))
    try:
        ctx.check_identical({"model": model}, step=7)
    except DistributedError as e:
        res["identical"] = [str(e), who_says(e)]
    ctx.broadcast_(model)  # rank 0's weights again
    ctx.check_identical({"model": model}, step=8)

    # sampling spread over the ranks: rank 0 gets every sample, as one process would draw them
    noise = torch.randn(11, 2, generator=torch.Generator().manual_seed(3))
    model.eval()
    x = ctx.spread(lambda part, start: generate(model, schedule, part, steps=5), noise)
    res["spread"] = x
    if r == 0:
        res["spread_single"] = generate(model, schedule, noise, steps=5)
    res["from_main"] = ctx.from_main(f"value of rank {r}")
    res["average"] = ctx.average({"a": float(r), "b": 2.0})
    torch.save(res, out / f"rank{r}.pt")
    ctx.close()
    return 0


def cuda_capture(out: Path) -> int:
    """One GPU: the gradient all-reduce (NCCL, a group of one; the average pretends 2 ranks, so the
    gradients are halved after it) captured in the step's CUDA graph, against the same step eagerly."""
    import datetime

    import torch
    import torch.distributed as dist

    from fastat.at.objective import ATObjective
    from fastat.at.schedule import NoiseSchedule
    from fastat.models import build_model
    from fastat.step.engine import StepEngine
    from fastat.train.distributed import DistContext, GradSync

    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=120))
    ctx = DistContext(rank=0, world_size=2)  # GradSync divides by 2: visible in the weights
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)).clamp(-1, 1).cuda()
    res = {}
    for graph in (False, True):
        torch.manual_seed(0)
        model = build_model("tiny", image_size=8, ch=8, groups=4).cuda()
        gen = torch.Generator("cuda").manual_seed(1)
        calls, sync = [], GradSync(list(model.parameters()), ctx)

        def counted(loss, sync=sync, calls=calls):  # Python calls: a replay makes none
            calls.append(1)
            return sync(loss)

        obj = ATObjective(schedule=NoiseSchedule(T=100), mode="adv")
        engine = StepEngine(model, obj, generator=gen, lr=1e-3, eps=1.0, clip=0.0, graph=graph, log=print,
                            reduce_grads=counted)  # fmt: skip
        losses = [float(engine.step(x, 1e-3)["loss"]) for _ in range(7)]
        res[graph] = {"captured": engine.captured, "calls": len(calls), "losses": losses,
                      "weights": {k: v.cpu() for k, v in model.state_dict().items()}}  # fmt: skip
    torch.save(res, out / "cuda.pt")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    what, rest = sys.argv[1], sys.argv[2:]
    run = {"fault": lambda: fault(rest), "scenario": lambda: scenario(Path(rest[0])),
           "cuda": lambda: cuda_capture(Path(rest[0]))}  # fmt: skip
    sys.exit(run[what]())
