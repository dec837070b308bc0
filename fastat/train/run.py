"""Training: the config turned into a run, and the loop that steps it.

    cfg, ckpt = resolve_config(overrides, resume="auto")   # layering, resume, model "auto", run folder
    result = train(cfg, resume=ckpt)                       # builds data/model/objective, runs the loop

:func:`train` opens the run folder, builds the data and the :class:`TrainState`, restores it from the
checkpoint, writes the config and hands over to :func:`fastat.train.loop.training_loop`. The pieces, one
module each: :mod:`fastat.train.run_config` (the config resolved), :mod:`fastat.train.state` (the state),
:mod:`fastat.train.loop` (the loop); this module puts them together and re-exports their public names.
Every random state goes into every checkpoint, so a resumed run continues exactly; under ``torchrun``
every rank runs all of this. Details: docs/DESIGN.md ("Checkpoints and the loop").
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from fastat.train.checkpoint import Checkpoint, load_checkpoint
from fastat.train.config import ConfigError, TrainConfig, check_grad_accum
from fastat.train.distributed import DistContext
from fastat.train.loggers import check_logger
from fastat.train.loop import (
    FinalEval,
    TrainingError,
    TrainingInterrupted,
    TrainResult,
    io_errors,
    lr_at,
    step_lr,
    train_step,
    training_loop,
)
from fastat.train.memory import check_step_memory
from fastat.train.run_config import (
    data_shape,
    finalize,
    model_spec,
    resolve_config,
    resolve_device,
    resolve_precision,
    run_eta,
)
from fastat.train.run_folder import RunFolder
from fastat.train.state import (
    TrainState,
    build_batches,
    build_state,
    build_training_data,
    check_compatible,
    clip_for,
    data_info,
    data_line,
    model_spec_of,
    say,
)

__all__ = [
    "TrainResult",
    "TrainState",
    "TrainingError",
    "TrainingInterrupted",
    "build_batches",
    "build_state",
    "build_training_data",
    "clip_for",
    "data_shape",
    "finalize",
    "lr_at",
    "model_spec",
    "resolve_config",
    "resolve_device",
    "resolve_precision",
    "run_eta",
    "step_lr",
    "train",
    "train_step",
    "training_loop",
]


def train(cfg: TrainConfig, *, resume: Path | Checkpoint | None = None, progress: bool = True,
          ctx: DistContext | None = None, final_eval: FinalEval | None = None) -> TrainResult:  # fmt: skip
    """Build everything ``cfg`` describes and run :func:`training_loop` (from ``resume`` if given).

    ``cfg`` should come from :func:`resolve_config` (or :func:`finalize`). The run folder is locked
    for the whole run, and nothing in it changes before every check has passed (folder ownership, data,
    model, checkpoint contents); then ``RUN/config.yaml`` is written. Raises ConfigError / DatasetError /
    CheckpointError on bad input, :class:`TrainingInterrupted` on Ctrl-C (after saving).
    ``final_eval`` measures the trained model at the end (the command line passes
    :func:`fastat.eval.evaluate.final_evaluation`); None measures nothing.

    Under ``torchrun`` every rank calls this (``ctx``; None: joined here from the environment): rank 0
    alone takes and writes the run folder, every rank resumes the checkpoint rank 0 resumes (else a
    ConfigError: the run folder must be on a filesystem every rank sees), the data is built in turn
    (:meth:`fastat.train.distributed.DistContext.in_turn`: rank 0 may prepare a cache the others then read), and
    a failed check on any rank stops all of them with one message.
    """
    if ctx is None:
        with DistContext.from_env(timeout_s=cfg.run.dist_timeout) as ctx:
            return train(cfg, resume=resume, progress=progress, ctx=ctx, final_eval=final_eval)
    progress = progress and ctx.is_main
    with ctx.together("the config"):
        cfg = finalize(cfg)
    cfg = ctx.from_main(cfg)  # rank 0's (a default run folder is named by rank 0's clock)
    r = cfg.run
    with contextlib.ExitStack() as stack:
        with ctx.together("start-up"):
            ctx.check_batch(r.batch_size)
            check_grad_accum(r.batch_size, r.grad_accum, ctx.world_size)
            check_logger(r.logger if ctx.is_main else "none")  # only rank 0 logs
            device = resolve_device(r.device, ctx)
            check_step_memory(cfg, device, ctx.world_size)  # before the run folder is touched
            if ctx.enabled and ctx.is_main:
                say(ranks_line(ctx, r.batch_size, device))
            ckpt = load_checkpoint(resume) if isinstance(resume, (str, Path)) else resume
            run = stack.enter_context(RunFolder.open(r.out, resume=ckpt.path if ckpt else None, steps=r.steps,
                                                     keep=r.keep, tensorboard=r.tensorboard,
                                                     writer=ctx.is_main, logger=r.logger,
                                                     wandb_project=r.wandb_project))  # fmt: skip
        check_same_checkpoint(ckpt, ctx)
        td = ctx.in_turn(lambda: build_training_data(cfg, progress=progress), "reading the data")
        with ctx.together("building the model"):
            spec = model_spec_of(cfg)
            info = data_info(td)
            if ckpt is not None:
                check_compatible(ckpt, spec, info)
            state = build_state(cfg, td, device, {"config": cfg.to_dict(), "model": spec, "data": info}, ctx)
            stack.callback(state.batches.close)  # the stream placement's reader threads
            if cfg.data.placement == "auto":  # config.yaml records the placement chosen (known sets: device)
                cfg = cfg.with_overrides({"data.placement": getattr(state.batches, "placement", "device")})
                state.extra["config"] = cfg.to_dict()
            start = state.restore(ckpt, ctx, r.seed) if ckpt is not None else 0
            if ctx.is_main:
                say(data_line(cfg, td, state.batches, device))
                if ckpt is not None:
                    say(f"fastat: resuming {run.path} from step {start} ({ckpt.path.name})")
            with io_errors(run):
                run.start(cfg.to_yaml(), step=start)  # every check passed: the first write
        ctx.broadcast_(state.model, state.ema)  # one model: rank 0's (the same seed built it everywhere)
        return training_loop(run, state, cfg, td, start=start, progress=progress, ctx=ctx, final_eval=final_eval)


def ranks_line(ctx: DistContext, batch_size: int, device) -> str:
    """The one line a torchrun job says at its start: world size, backend, per-rank batch."""
    import torch.distributed as dist

    backend = str(dist.get_backend()) if dist.is_initialized() else "none"
    if ":" in backend:  # "cpu:gloo,cuda:nccl": the one this run's device uses
        backend = dict(p.split(":", 1) for p in backend.split(",")).get(device.type, backend)
    return (f"fastat: torchrun: world size {ctx.world_size}, backend {backend}, per-rank batch "
            f"{batch_size // ctx.world_size} (global {batch_size}) on {device.type}")  # fmt: skip


def check_same_checkpoint(ckpt: Checkpoint | None, ctx: DistContext) -> None:
    """Every rank resumes the checkpoint rank 0 resumes (its name and step), or none where rank 0 starts
    fresh: else a ConfigError on every rank, before anything is written (ranks that see different run
    folders, e.g. a node-local disk or a relative ``--out`` in another working directory)."""
    if not ctx.enabled:
        return
    mine = None if ckpt is None else (ckpt.path.name, ckpt.step)
    main = ctx.from_main(mine)

    def said(c: tuple | None) -> str:
        return "nothing (a fresh start)" if c is None else f"{c[0]} (step {c[1]})"

    with ctx.together("the checkpoint to resume"):
        if mine != main:  # said by rank 0 as "rank R: ..."
            raise ConfigError(
                f"this rank would resume {said(mine)}, rank 0 {said(main)}: the run folder must be on a "
                f"filesystem that every rank sees at the same path (a shared disk; an absolute --out)"
            )
