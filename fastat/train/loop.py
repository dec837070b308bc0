"""The training loop and what it does between steps: log, sample, save, stop on a signal, evaluate at the
end. :func:`fastat.train.run.train` builds the state and calls :func:`training_loop`, which reads top to
bottom::

    while step < steps:
        x0 = batches.next_batch()                    # a batch on the device (images: uint8)
        stats = train_step(engine, x0, lr=...)       # device statistics, no host sync
        interval.add(stats)                          # device sums (one stacked vector per step)
        if log step:    run.log(interval.pop())      # the interval's one host sync
        if sample step: write_grid(...)
        if save step:   save(run, state, step)       # postponed while the last step was skipped
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastat import __version__
from fastat.at.diagnostics import BUCKETS, attack_efficiency
from fastat.at.draws import labelled
from fastat.at.seeding import derive_seed
from fastat.data import Labelled, TrainingData
from fastat.step.engine import StepEngine
from fastat.train.checkpoint import NonFiniteWeights
from fastat.train.config import TrainConfig
from fastat.train.distributed import DistContext, mark
from fastat.train.metrics import StatsAccumulator, peak_rss_mb
from fastat.train.run_folder import RunFolder
from fastat.train.samples import generate, write_samples
from fastat.train.state import TrainState, run_sampler, say

# What the loop calls at the end to measure the trained model: (state, cfg, data, ranks) ->
# (the eval record it logs, the full metrics). The evaluation layer provides it
# (:func:`fastat.eval.evaluate.final_evaluation`); the loop never imports it.
FinalEval = Callable[["TrainState", TrainConfig, TrainingData, DistContext], "tuple[dict, dict]"]

__all__ = [
    "FinalEval",
    "Interval",
    "StopFlag",
    "TrainResult",
    "TrainingError",
    "TrainingInterrupted",
    "io_errors",
    "lr_at",
    "save",
    "step_lr",
    "train_step",
    "training_loop",
]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by the loop after Ctrl-C: ``step`` reached, the checkpoint to resume from, and whether it
    was written now (``saved``) or is an older one (the interrupt cut a step in half)."""

    def __init__(self, step: int, checkpoint: Path | None, saved: bool) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step, self.checkpoint, self.saved = step, checkpoint, saved


@dataclass
class TrainResult:
    """What a run produced. ``eval`` holds the final known-distribution distances (empty for images),
    ``eval_metrics`` the full :func:`fastat.eval.known_metrics` they come from (``fastat eval``'s report)."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    samples: Path | None
    metrics: Path
    eval: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    device: str = "cpu"
    seconds: float = 0.0
    eval_metrics: dict[str, float] = field(default_factory=dict)
    data_kind: str = ""
    start: int = 0  # the step this call started from (a resumed run's checkpoint step)

    @property
    def trained_line(self) -> str:
        """What this call trained: ``trained N steps (steps A..B)``, N counting this call only."""
        n = self.step - self.start
        if n == 0:
            return f"trained 0 steps (the run was at step {self.step})"
        return f"trained {n} steps (steps {self.start + 1}..{self.step})"


def lr_at(step: int, lr: float, warmup: int, schedule: str = "constant", total: int = 0,
          final: float = 0.0) -> float:  # fmt: skip
    """The learning rate of step ``step`` (counting from 0): linear warmup over ``warmup`` steps to
    ``lr``, then ``schedule``: ``constant``, or ``cosine`` / ``linear`` decay from ``lr`` to ``final * lr``
    at step ``total - 1`` (the run's last step; a resumed run that raises ``total`` stretches the decay)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant" or total - 1 <= warmup:
        return lr
    frac = min(1.0, (step - warmup) / (total - 1 - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * frac)) if schedule == "cosine" else 1.0 - frac
    return lr * (final + (1.0 - final) * decay)


def step_lr(cfg: TrainConfig, step: int) -> float:
    """:func:`lr_at` with the run's optimiser settings (``optim.*``) and length (``run.steps``)."""
    op = cfg.optim
    return lr_at(step, op.lr, op.warmup, op.schedule, cfg.run.steps, op.final_lr)


def train_step(engine: StepEngine, x0, *, lr: float) -> dict[str, torch.Tensor]:
    """One optimisation step (see :class:`fastat.step.engine.StepEngine`; ``x0=None`` when the engine does
    not want a batch: the objective reuses the one it kept); detached device statistics."""
    return engine.step(x0, lr)


class StopFlag:
    """The first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step and save; a
    second one quits at once, keeping the last complete checkpoint. A request during the run's last step
    lets the run finish (save, samples, evaluation). Under ``torchrun`` the ranks stop at the same step
    (:meth:`agreed`: they vote every :attr:`VOTE_EVERY` steps, so a stop lands within ``2 * VOTE_EVERY``
    steps of the signal), and a repeat within ``DUPLICATE_S`` counts as the same request (torchrun
    forwards the terminal's Ctrl-C to workers that already got it)."""

    DUPLICATE_S = 2.0
    VOTE_EVERY = 10  # steps between the ranks' stop votes (one tiny all-reduce each)

    def __init__(self, ctx: DistContext) -> None:
        self.ctx, self._at = ctx, 0.0
        self.requested = False  # a signal came to this process
        self.stopping = False  # the ranks agreed to stop

    def __call__(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested:
            if self.ctx.enabled and now - self._at < self.DUPLICATE_S:
                return
            raise KeyboardInterrupt
        self.requested, self._at = True, now
        if self.ctx.is_main:
            name = "terminated" if signum == signal.SIGTERM else "interrupted"
            say(f"fastat: {name}; saving a checkpoint after this step (Ctrl-C again to quit now)")

    def agreed(self, step: int, steps: int) -> bool:
        """Whether every rank stops after ``step`` of ``steps`` (the same answer on all of them); never
        after the last step, which ends the run normally."""
        last = step == steps
        if self.ctx.enabled and not last and step % self.VOTE_EVERY:
            return False
        self.stopping = self.ctx.agree_stop(self.requested, last=last) and not last
        return self.stopping

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


class Interval:
    """Statistics of one log interval: device sums (no host sync), read once by :meth:`pop`. A step
    the engine skipped (``stats["skipped"]`` = 1: non-finite loss or gradients) is counted in
    ``skipped`` and left out of the other means. A few device ops per step: the statistics are
    stacked into one vector (:class:`fastat.train.metrics.StatsAccumulator`)."""

    def __init__(self, step: int, batch_size: int) -> None:
        self.acc, self.batch_size = StatsAccumulator(), batch_size
        self.skipped: torch.Tensor | int = 0
        self.t0, self.step0 = time.perf_counter(), step

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        skipped = stats["skipped"]
        self.acc.add({k: v for k, v in stats.items() if k != "skipped"}, weight=1 - skipped)
        self.skipped = skipped.detach().float() + self.skipped

    def pop(self, step: int, streak: torch.Tensor, ctx: DistContext, **extra: float) -> dict[str, float]:
        """Means since the last pop (over all ranks: ``ctx``), the skipped steps, the engine's
        ``skip_streak``, throughput (of the global batch) and ``extra``: one host sync for all of it."""
        skipped = self.skipped if torch.is_tensor(self.skipped) else torch.zeros(())
        means = self.acc.pop_means({"skip_streak": streak, "skipped": skipped})
        means = ctx.average(means)  # one process: unchanged; counts: the same on every rank
        means["skipped"], means["skip_streak"] = round(means["skipped"]), round(means["skip_streak"])
        now = time.perf_counter()
        dt, n = max(now - self.t0, 1e-9), max(step - self.step0, 1)
        means.update(extra, img_per_s=n * self.batch_size / dt, sec_per_step=dt / n)
        self.t0, self.step0, self.skipped = now, step, 0
        return means


def due(step: int, every: int, steps: int) -> bool:
    """A periodic action (sample, save) at ``step``: every ``every`` steps (0: never), not at the end
    (the end has its own)."""
    return every > 0 and step % every == 0 and step < steps


def save(run: RunFolder, state: TrainState, cfg: TrainConfig, step: int, ctx: DistContext, *,
         periodic: bool = False) -> Path | None:  # fmt: skip
    """Checkpoint ``step`` into the run folder (rank 0 writes, with every rank's random states; the
    others wait), unless the run is failing: too many skipped steps in a row, non-finite weights
    (TrainingError naming the last good checkpoint; nothing written) or ranks whose weights differ.
    Nothing to do when the folder's newest checkpoint is already this step's (returns it).

    A ``periodic`` save while the last step was skipped is postponed (returns None; the loop retries it
    at the next step that was not skipped): a run that went bad (e.g. a huge learning rate made the
    weights garbage, then every step non-finite) must not push its good checkpoints out with garbage
    ones before ``run.max_skipped`` stops it. (The streak is the same on every rank: a step is skipped
    everywhere or nowhere.)"""
    if run.holds(step):
        return run.last_checkpoint
    streak = int(state.engine.skip_streak)  # a host sync, once per save
    check_skips(streak, cfg, step, run)
    if periodic and streak > 0:
        return None
    ctx.check_identical({"model": state.model, "EMA": state.ema}, step)
    rngs = ctx.gather_to_main(state.rng_state(), "the random states")
    with ctx.together("the checkpoint"), io_errors(run):
        try:
            full = state.state_dict(step, rngs) if run.writer else {}  # only rank 0 writes
            return run.save(step, model=state.model, ema=state.ema, state=full,
                            metadata={"fastat_version": __version__})  # fmt: skip
        except NonFiniteWeights as e:
            raise TrainingError(f"{e}; no checkpoint written at step {step}. {_last_good(run)}") from None


def check_skips(streak: int, cfg: TrainConfig, step: int, run: RunFolder) -> None:
    """Stop (TrainingError) once ``run.max_skipped`` steps in a row were skipped as non-finite."""
    if streak >= cfg.run.max_skipped:  # the same on every rank (a global step is skipped everywhere)
        raise mark(TrainingError(
            f"stopped at step {step}: the last {streak} steps were skipped (non-finite loss or gradients; "
            f"run.max_skipped = {cfg.run.max_skipped}). {_last_good(run)}"
        ), "main")  # fmt: skip


def _last_good(run: RunFolder) -> str:
    return (f"The last good checkpoint is {run.last_checkpoint or 'none'}: lower --lr (or check the data) "
            f"and resume it")  # fmt: skip


def write_grid(
    run: RunFolder, state: TrainState, cfg: TrainConfig, td: TrainingData, step: int, ctx: DistContext
) -> Path | None:
    """EMA samples from the run's fixed noise batch: ``samples/step-N.png`` (points: ``.npy`` and, for
    2-D/3-D points with matplotlib, a scatter ``.png``). Each rank samples its share; rank 0 writes."""
    r = cfg.run
    noise_gen = torch.Generator().manual_seed(derive_seed(r.seed, "sample-noise"))
    noise = torch.randn((r.sample_n, *td.sample_shape), generator=noise_gen)
    model, schedule = state.ema_eps_model(), state.engine.objective.schedule
    classes = getattr(state.model, "num_classes", 0) if cfg.data.class_cond else 0

    def sample(part: torch.Tensor, start: int) -> torch.Tensor:  # this rank's rows, its own DDPM noise
        g = torch.Generator(state.device)
        g.manual_seed(derive_seed(r.seed, "sample-ddpm" + (f"@{start}" if start else "")))
        # class_cond: a grid over the classes (sample i of class i mod num_classes), guided
        labels = torch.arange(start, start + len(part)) % classes if classes else None
        return generate(model, schedule, part, run_sampler(cfg, td.kind), device=state.device, generator=g,
                        labels=labels, guidance=r.guidance)  # fmt: skip

    x = ctx.spread(sample, noise)
    if not run.writer or x is None:
        return None
    with io_errors(run):
        path = _write_grid_file(run, x, td, step, r.sample_n)
        run.log_image(step, "samples", path)  # TensorBoard / W&B: the grid (points: the scatter plot)
        return path


def _write_grid_file(run: RunFolder, x: torch.Tensor, td: TrainingData, step: int, n: int) -> Path | None:
    if td.kind == "image":
        return write_samples(x, run.samples_file(step, ".png"), td.kind)
    npy = write_samples(x, run.samples_file(step, ".npy"), td.kind)
    if x.shape[1] not in (2, 3):
        return npy
    png = write_samples(x, run.samples_file(step, ".png"), td.kind, reference=td.data[: 4 * n])
    return png or npy


def progress_bar(cfg: TrainConfig, start: int, enabled: bool) -> tqdm:
    return tqdm(total=cfg.run.steps, initial=start, desc="train", unit="step", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr)  # fmt: skip


def training_loop(
    run: RunFolder,  # the run folder, started (config written, metrics open)
    state: TrainState,  # model, engine (optimizer, EMA), batches, generator: restored when resuming
    cfg: TrainConfig,  # steps, intervals, learning rate, sampling settings
    td: TrainingData,  # the training set (sample shape, kind, final evaluation)
    *,
    start: int = 0,  # the step the state is at
    progress: bool = True,  # tqdm progress bar
    ctx: DistContext | None = None,  # the ranks of a torchrun job (None: this process alone)
    final_eval: FinalEval | None = None,  # measures the trained model at the end (None: nothing)
) -> TrainResult:
    """Train from ``start`` to ``cfg.run.steps`` (every rank): log, sample and save on their intervals,
    save and evaluate at the end. Ctrl-C or SIGTERM finishes the step, saves, raises TrainingInterrupted
    (a second one: at once, keeping the last complete checkpoint)."""
    t_start = time.perf_counter()
    r, ctx = cfg.run, ctx or DistContext()
    interval, stop, bar = Interval(start, r.batch_size), StopFlag(ctx), progress_bar(cfg, start, progress)
    step, pending_save, batch = start, False, None
    state.model.train()
    try:
        with stop.installed():
            while step < r.steps:
                with io_errors(run, "read"):
                    x0 = state.batches.next_batch() if state.engine.wants_batch else None  # None: reuse it
                batch = x0 if x0 is not None else batch
                stats = train_step(state.engine, x0, lr=step_lr(cfg, step))
                step += 1
                interval.add(stats)
                bar.update(1)
                if step % r.log_every == 0 or step == r.steps:
                    log_interval(run, interval, bar, state, cfg, step, ctx, batch)
                if stop.agreed(step, r.steps):
                    break
                if due(step, r.sample_every, r.steps):
                    write_grid(run, state, cfg, td, step, ctx)
                pending_save = pending_save or due(step, r.save_every, r.steps)
                if pending_save and step < r.steps:  # postponed (None) while the last step was skipped
                    pending_save = save(run, state, cfg, step, ctx, periodic=True) is None
            ckpt = save(run, state, cfg, step, ctx)
            if stop.stopping:
                raise TrainingInterrupted(step, ckpt, saved=True)
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:  # the second Ctrl-C: a step, a save or a collective cut in half
        raise TrainingInterrupted(step, run.last_checkpoint, saved=False) from None
    finally:
        bar.close()
    samples = write_grid(run, state, cfg, td, step, ctx)
    summary, eval_metrics = final_eval(state, cfg, td, ctx) if final_eval else ({}, {})
    if summary:
        with io_errors(run):
            run.log(step, summary, kind="eval")
    return TrainResult(run.path, step, run.last_checkpoint, samples, run.metrics_path, summary,
                       device=str(state.device), seconds=time.perf_counter() - t_start,
                       eval_metrics=eval_metrics, data_kind=td.kind, start=start)  # fmt: skip


def log_interval(run: RunFolder, interval: Interval, bar: tqdm, state: TrainState, cfg: TrainConfig,
                 step: int, ctx: DistContext, x0: torch.Tensor | None = None) -> None:  # fmt: skip
    """Read the interval's statistics (averaged over the ranks) and the engine's skip streak (the
    interval's one host sync), add the attack diagnostic on the last batch ``x0`` (``run.attack_eff``),
    write them (rank 0), and stop (TrainingError) once ``run.max_skipped`` steps in a row were skipped
    as non-finite."""
    means = interval.pop(step, state.engine.skip_streak, ctx, lr=step_lr(cfg, step - 1),
                         epoch=state.batches.epoch, rss_peak_mb=peak_rss_mb(),
                         **cost_metrics(state.engine, cfg.run.batch_size, step))  # fmt: skip
    if cfg.run.attack_eff and x0 is not None:
        t0 = time.perf_counter()
        means.update(attack_diagnostic(state, cfg, x0, step))
        interval.t0 += time.perf_counter() - t0  # the next interval's img/s counts training only
    with io_errors(run):
        run.log(step, means)
    bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{means['img_per_s']:.0f}", refresh=False)
    check_skips(means["skip_streak"], cfg, step, run)


def attack_diagnostic(state: TrainState, cfg: TrainConfig, x0: torch.Tensor, step: int) -> dict[str, float]:
    """:func:`fastat.at.diagnostics.attack_efficiency` of the live weights on the batch ``x0``: in eval
    mode, from a generator of its own (the run's randomness and resume are untouched)."""
    engine, model = state.engine, state.model
    x = engine.prepare_batch(x0) if engine.prepare_batch is not None else x0
    x, y = (x.x, x.y) if isinstance(x, Labelled) else (x, None)  # class_cond: each sample with its label
    n = min(x.shape[0], 32)
    gen = torch.Generator(device=state.device).manual_seed(derive_seed(cfg.run.seed, f"attack-eff-{step}"))
    was = model.training
    model.eval()
    try:
        with torch.autocast(state.device.type, enabled=False):
            net = labelled(model, y[:n] if y is not None else None)
            stats = attack_efficiency(net, engine.objective, x[:n].float(), gen, buckets=min(BUCKETS, n))
    finally:
        model.train(was)
    return {k: float(v) for k, v in stats.items()}


def cost_metrics(engine: StepEngine, batch_size: int, step: int) -> dict[str, float]:
    """What ``step`` steps cost, in forward-pass equivalents (``flop_units``: per image seen, one step;
    a backward counts 2; :meth:`fastat.ATObjective.flop_units`). Images seen count every step's batch,
    ``free``'s replays included; ``fresh_images`` counts each batch once."""
    units = engine.objective.flop_units(batch_size)
    seen = step * batch_size
    fresh = -(-step // engine.steps_per_batch) * batch_size  # free trains each batch on several steps
    return {"flop_units": units, "images_seen": seen, "fresh_images": fresh, "flop_units_total": units * seen}


@contextlib.contextmanager
def io_errors(run: RunFolder, doing: str = "write"):
    """A failed read or write (a missing shard; a full disk, a read-only folder) as one TrainingError
    naming the operation, the file, the cause and the checkpoint that is still intact."""
    try:
        yield
    except OSError as e:
        where = "the data" if doing == "read" else "to the run folder"
        what = f"cannot {doing} {e.filename}" if e.filename else f"cannot {doing} {where}"
        raise TrainingError(
            f"{what}: {e.strerror or e}; the last checkpoint ({run.last_checkpoint or 'none'}) is intact"
        ) from None
