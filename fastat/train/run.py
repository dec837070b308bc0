"""Training: the config turned into a run, and the loop that steps it.

    cfg, ckpt = resolve_config(overrides, resume="auto")   # layering, resume, model "auto", run folder
    result = train(cfg, resume=ckpt)                       # builds data/model/objective, runs the loop

:func:`train` opens the run folder (:class:`fastat.train.run_folder.RunFolder`: lock, checks), builds the
data, the :class:`TrainState` (model, step engine, batches, generator) and restores it from the
checkpoint, writes the config, and hands over to :func:`fastat.train.loop.training_loop` (log, sample, save,
stop, evaluate at the end). The pieces, one module each: :mod:`fastat.train.run_config` (the config resolved:
layering, resume, model ``auto``, device, precision), :mod:`fastat.train.state` (the state and how it is
built), :mod:`fastat.train.loop` (the loop); this module puts them together and re-exports their public names.

Each step (:func:`train_step`, run by :class:`fastat.step.engine.StepEngine`): ``ATObjective`` under
autocast (noise, attack, loss) -> backward -> clip -> AdamW -> EMA; with ``run.fast`` (the default on
CUDA) the model is compiled and, on CUDA, the step is a CUDA graph. All randomness comes from seeded
generators (the objective's own ``torch.Generator`` on the device, the loader's generators, the global
generator for initialisation and dropout), and all of their states go into every checkpoint, so a
resumed run continues exactly (bit for bit on the CPU). What a run folder holds: see
:mod:`fastat.train.run_folder` and :mod:`fastat.train.checkpoint`.

Under ``torchrun`` every rank runs all of this with its :class:`fastat.train.distributed.DistContext`: the
same model, its own shard of each batch and its own random streams, gradients averaged in the step;
rank 0 alone writes the run folder, and the ranks stop at the same step.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from fastat.train.checkpoint import Checkpoint, load_checkpoint
from fastat.train.config import ConfigError, TrainConfig, _plain
from fastat.train.distributed import DistContext
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
            device = resolve_device(r.device, ctx)
            check_step_memory(cfg, device, ctx.world_size)  # before the run folder is touched
            ckpt = load_checkpoint(resume) if isinstance(resume, (str, Path)) else resume
            run = stack.enter_context(RunFolder.open(r.out, resume=ckpt.path if ckpt else None, steps=r.steps,
                                                     keep=r.keep, tensorboard=r.tensorboard,
                                                     writer=ctx.is_main))  # fmt: skip
        check_same_checkpoint(ckpt, ctx)
        td = ctx.in_turn(lambda: build_training_data(cfg, progress=progress), "reading the data")
        with ctx.together("building the model"):
            spec = _plain({"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs)})
            info = data_info(td)
            if ckpt is not None:
                check_compatible(ckpt, spec, info)
            state = build_state(cfg, td, device, {"config": cfg.to_dict(), "model": spec, "data": info}, ctx)
            stack.callback(state.batches.close)  # the stream placement's reader threads
            start = state.restore(ckpt, ctx, r.seed) if ckpt is not None else 0
            with io_errors(run):
                run.start(cfg.to_yaml(), step=start)  # every check passed: the first write
        ctx.broadcast_(state.model, state.ema)  # one model: rank 0's (the same seed built it everywhere)
        return training_loop(run, state, cfg, td, start=start, progress=progress, ctx=ctx, final_eval=final_eval)


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
