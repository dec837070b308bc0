"""The training loop: one function with a flat signature, and the small step it repeats.

    cfg, ckpt = resolve_config(overrides, resume="auto")   # layering, resume, model "auto", run folder
    result = train(cfg, resume=ckpt)                       # builds data/model/objective, runs the loop

Each step (:func:`train_step`, run by :class:`fastat.engine.StepEngine`): next batch (an index on the
device) -> ``ATObjective`` under autocast (noise, attack, loss) -> backward -> clip -> AdamW -> EMA;
with ``run.fast`` (the default on CUDA) the model is compiled and, on CUDA, the step is a CUDA graph. Statistics stay on the device and are read
once per ``log_every`` steps; no ``.item()`` in the step. All randomness comes from seeded generators
(the objective's own ``torch.Generator`` on the device, the loader's generators, the global generator
for initialisation and dropout), and all of their states go into every checkpoint, so a resumed run
continues exactly (bit for bit on the CPU).

Run folder::

    RUN/config.yaml           resolved config
    RUN/metrics.jsonl         one JSON record per log interval (and the final evaluation)
    RUN/samples/step-*.png    EMA sample grids (points: .npy + scatter .png)
    RUN/checkpoints/...       see fastat.checkpoint
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from fastat import __version__
from fastat.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write_text,
    checkpoint_root,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from fastat.config import ConfigError, TrainConfig, _plain
from fastat.data import DATASETS, KNOWN, DatasetError, TensorLoader, TrainingData, build_dataset, derive_seed
from fastat.engine import StepEngine
from fastat.metrics import MetricsLog, StatsAccumulator
from fastat.models import build_model
from fastat.objective import ATObjective
from fastat.samples import generate, write_samples

__all__ = [
    "TrainResult",
    "TrainingError",
    "TrainingInterrupted",
    "build_training_data",
    "model_spec",
    "resolve_config",
    "resolve_device",
    "train",
    "train_step",
    "training_loop",
]

CONFIG_FILE = "config.yaml"
SAMPLES_DIR = "samples"


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


# -- configuration -> things -------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA raises ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 autocast on CUDA, fp32 elsewhere. ``bf16`` on the CPU uses CPU autocast."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def data_shape(cfg: TrainConfig) -> tuple[str, tuple[int, ...]]:
    """``(kind, sample_shape)`` of the configured dataset, without loading it."""
    d = cfg.data
    if d.dataset in KNOWN:
        from fastat.data import known_dataset

        kw = (
            {"height": d.image_size, "width": d.image_size}
            if d.dataset == "subspace" and d.image_size
            else {}
        )
        dist = known_dataset(d.dataset, **kw)
        return dist.kind, tuple(dist.sample_shape)
    size = d.image_size or (32 if d.dataset == "cifar10" else None)
    if size is None:  # validate() requires image_size for folders
        raise ConfigError(f"data.image_size (--image-size) is required for the image folder {d.dataset!r}")
    return "image", (3, size, size)


def model_spec(cfg: TrainConfig) -> dict:
    """``{"name", "kwargs"}`` for :func:`fastat.models.build_model`, fitted to the data's shape:
    ``auto`` picks ``mlp`` for points and the UNet preset nearest the image size; the UNet gets
    ``image_size``/``in_channels`` and the MLP ``dim`` from the data."""
    kind, shape = data_shape(cfg)
    name, kwargs = cfg.model.name, dict(cfg.model.kwargs)
    if name == "auto":
        if kind == "points":
            name = "mlp"
        else:
            size = shape[-1]
            name = (
                "tiny" if size <= 16 else "cifar10" if size <= 32 else "celeba64" if size <= 64 else "lsun256"
            )
    if name == "mlp":
        if kind != "points":
            raise ConfigError(
                f"model mlp is for points; dataset {cfg.data.dataset!r} holds images {shape} (use a UNet)"
            )
        kwargs["dim"] = shape[0]
    else:
        if kind != "image":
            raise ConfigError(
                f"model {name} is a UNet for images; dataset {cfg.data.dataset!r} holds points of shape "
                f"{shape} (use --model mlp or auto)"
            )
        kwargs.update(in_channels=shape[0], image_size=shape[-1])
    return _plain({"name": name, "kwargs": kwargs})


def default_run_name(cfg: TrainConfig) -> str:
    ds = cfg.data.dataset if cfg.data.dataset in DATASETS else Path(cfg.data.dataset).name or "folder"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{ds}-{cfg.objective.mode}"


def finalize(cfg: TrainConfig) -> TrainConfig:
    """Resolve what depends on the data or the clock: the model (``auto``, data-derived arguments)
    and the run folder (``runs/<date>-<time>-<dataset>-<mode>``). Validates first."""
    cfg.validate()
    spec = model_spec(cfg)
    over: dict = {"model.name": spec["name"], "model.kwargs": spec["kwargs"]}
    if cfg.run.out is None:
        over["run.out"] = str(Path("runs") / default_run_name(cfg))
    return cfg.with_overrides(over).validate()


def read_saved_config(ckpt: Path) -> dict:
    """The config stored in a checkpoint folder (its ``config.yaml``, else the one in ``state.pt``)."""
    f = ckpt / CONFIG_FILE
    if f.is_file():
        try:
            d = yaml.safe_load(f.read_text())
        except yaml.YAMLError as e:
            raise CheckpointError(f"cannot read {f}: {str(e).splitlines()[0]}") from None
    else:
        d = load_checkpoint(ckpt).state.get("config")
    if not isinstance(d, dict):
        raise CheckpointError(f"checkpoint {ckpt} holds no config")
    return d


def resolve_config(overrides: dict, resume: str | None = None) -> tuple[TrainConfig, Path | None]:
    """The run's config and the checkpoint to resume from (or None).

    ``overrides``: dotted keys from the ``--config`` file and the flags (flags last). ``resume``:
    ``None`` (fresh run), ``"auto"`` (the newest checkpoint in the run folder if there is one) or a
    path (run folder or checkpoint folder). When resuming, the run's saved config is the base under
    ``overrides`` and the run folder defaults to the checkpoint's.
    """
    cfg = TrainConfig().with_overrides(overrides)
    ckpt: Path | None = None
    if resume == "auto":
        if cfg.run.out is not None:
            ckpt = latest_checkpoint(cfg.run.out)
    elif resume:
        ckpt = find_checkpoint(resume)
    if ckpt is not None:
        saved = read_saved_config(ckpt)
        try:
            base = TrainConfig.from_dict(saved)
        except ConfigError as e:
            raise CheckpointError(f"the config saved in {ckpt} does not load: {e}") from None
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        cfg = base.with_overrides({"run.out": str(run_dir), **overrides})
    return finalize(cfg), ckpt


def prepare_run_dir(out: str, *, resuming: bool) -> Path:
    """Create the run folder and check that it is writable; refuse to start over an existing run."""
    run_dir = Path(out).expanduser()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to the run folder {run_dir} (--out): {e.strerror or e}") from None
    if not resuming and latest_checkpoint(run_dir) is not None:
        raise ConfigError(
            f"the run folder {run_dir} already holds checkpoints; continue it with --resume auto "
            f"or choose another --out"
        )
    return run_dir


def build_training_data(cfg: TrainConfig) -> TrainingData:
    d = cfg.data
    td = build_dataset(
        d.dataset,
        data_root=d.data_root,
        image_size=d.image_size,
        seed=d.seed,
        n=d.n,
        max_items=d.max_items,
        download=d.download,
        num_workers=d.num_workers,
        noise_p=d.corrupt_frac,
        noise_sigma=d.corrupt_sigma,
        outliers=d.outliers,
        outlier_kind=d.outlier_kind,
    )
    if len(td) == 0:
        raise DatasetError(f"dataset {d.dataset!r} is empty")
    if cfg.run.batch_size > len(td):
        raise ConfigError(f"--batch-size {cfg.run.batch_size} is larger than the dataset ({len(td)} samples)")
    return td


def clip_for(kind: str, known: bool) -> float | None:
    """Sampling clamps the predicted x0 to [-1, 1] for images (as DDPM does; the known subspace keeps
    ~99% of its pixels in that range) and leaves points free."""
    return 1.0 if kind == "image" else None


# -- the step ------------------------------------------------------------------------------------------


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps to a constant ``lr`` (``step`` counts from 0)."""
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


def train_step(engine: StepEngine, x0: torch.Tensor, *, lr: float) -> dict[str, torch.Tensor]:
    """One optimisation step (see :class:`fastat.engine.StepEngine`); detached device statistics."""
    return engine.step(x0, lr)


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step (and save); the second quits at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(
            "fastat: interrupted; saving a checkpoint after this step (Ctrl-C again to quit now)",
            file=sys.stderr,
        )


@contextlib.contextmanager
def _sigint(flag: _StopFlag):
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, flag)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


# -- the loop ------------------------------------------------------------------------------------------


def training_loop(
    run_dir: Path,  # run folder (exists, writable): checkpoints/, samples/, metrics.jsonl
    *,
    # data
    data: torch.Tensor,  # training set (N, ...) float32, as corrupted; moved to `device` whole
    clean: torch.Tensor,  # its clean copy (evaluation only)
    data_kind: str,  # "image" (N, C, H, W) in [-1, 1] | "points" (N, D)
    known,  # KnownDistribution with exact distance_to_support, or None for real images
    flip: bool,  # random horizontal flips of the batches
    # network and loss
    model: nn.Module,  # eps-model forward(x, t), initialised, on `device`
    objective: ATObjective,  # noise sampling, attack and loss (SPEC section 1)
    # optimisation
    steps: int,  # total steps; a resumed run continues up to this
    batch_size: int,
    lr: float,  # AdamW learning rate after warmup
    warmup: int,  # linear warmup steps
    clip: float,  # gradient-norm clipping (0: off)
    weight_decay: float,
    betas: tuple[float, float],
    adam_eps: float,
    ema_decay: float,  # EMA decay (with the (1 + n) / (10 + n) warmup if ema_warmup)
    ema_warmup: bool,
    # run
    seed: int,  # loss noise and batch order (init and dropout: the caller's torch.manual_seed)
    device: torch.device,
    precision: str,  # "fp32" | "bf16" (autocast)
    fast: bool | None,  # compiled step (+ CUDA graph on CUDA); None: on for CUDA, off on the CPU
    log_every: int,  # statistics interval
    save_every: int,  # checkpoint interval (0: only at the end)
    sample_every: int,  # sample interval (0: only at the end)
    keep: int,  # checkpoints kept
    sample_n: int,  # fixed noise batch for the sample grids
    sampler: str,  # "ddim" | "ddpm"
    sample_steps: int,  # DDIM steps
    clip_x0: float | None,  # clamp of predicted x0 while sampling
    eval_n: int,  # known distributions: samples for the final distance to the clean support
    resume: Checkpoint | None = None,  # continue from this checkpoint
    state_extra: dict | None = None,  # plain values saved in every checkpoint (config, model spec, data)
    config_yaml: str = "",  # written beside each checkpoint
    progress: bool = True,  # tqdm progress bar
    tensorboard: bool = True,  # also log to TensorBoard when installed
) -> TrainResult:
    t_start = time.perf_counter()
    schedule = objective.schedule
    sample_shape = tuple(data.shape[1:])
    ckpt_root = checkpoint_root(run_dir)
    samples_dir = run_dir / SAMPLES_DIR

    loader = TensorLoader(data, batch_size, generator_seed=seed, device=device, flip=flip)
    generator = torch.Generator(device=device).manual_seed(derive_seed(seed, "objective"))
    engine = StepEngine(
        model, objective, generator=generator, lr=lr, betas=tuple(betas), eps=adam_eps,
        weight_decay=weight_decay, clip=clip, ema_decay=ema_decay, ema_warmup=ema_warmup,
        precision=precision, fast=device.type == "cuda" if fast is None else fast,
        log=lambda msg: tqdm.write(msg, file=sys.stderr),
    )  # fmt: skip
    optimizer, ema = engine.optimizer, engine.ema
    sample_noise = torch.randn(
        (sample_n, *sample_shape), generator=torch.Generator().manual_seed(derive_seed(seed, "sample-noise"))
    )

    start = 0
    if resume is not None:
        load_weights(model, resume.model, f"{resume.path}/model.safetensors")
        load_weights(ema.module, resume.ema, f"{resume.path}/ema.safetensors")
        st = resume.state
        try:
            engine.load_optimizer_state(st["optimizer"])
            loader.load_state_dict(st["loader"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {resume.path} does not fit this run: {e}") from None
        ema.load_state_dict(st["ema"])
        torch.set_rng_state(st["rng"]["torch"])
        if device.type == "cuda" and st["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        generator.set_state(st["rng"]["objective"])
        start = resume.step

    def state(step: int) -> dict:
        return {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict(),
            "loader": loader.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                "objective": generator.get_state(),
            },
            "fastat_version": __version__,
            **(state_extra or {}),
        }

    def save(step: int) -> Path:
        return save_checkpoint(
            ckpt_root,
            step,
            model=model,
            ema=ema.module,
            state=state(step),
            keep=keep,
            metadata={"fastat_version": __version__},
            files={CONFIG_FILE: config_yaml} if config_yaml else None,
        )

    def write_grid(step: int) -> Path | None:
        x = generate(
            ema.module,
            schedule,
            sample_noise,
            sampler=sampler,
            steps=sample_steps,
            clip_x0=clip_x0,
            device=device,
            generator=torch.Generator(device).manual_seed(derive_seed(seed, "sample-ddpm")),
        )
        samples_dir.mkdir(exist_ok=True)
        if data_kind == "image":
            return write_samples(x, samples_dir / f"step-{step:06d}.png", data_kind)
        npy = write_samples(x, samples_dir / f"step-{step:06d}.npy", data_kind)
        if x.shape[1] not in (2, 3):
            return npy
        png = write_samples(
            x, samples_dir / f"step-{step:06d}.png", data_kind, reference=data[: 4 * sample_n]
        )
        return png or npy

    log = MetricsLog(run_dir, tensorboard=tensorboard, resume_step=start if resume is not None else None)
    acc = StatsAccumulator()
    stop = _StopFlag()
    step, in_step, interrupted = start, False, False
    last_ckpt: Path | None = resume.path if resume is not None else None
    last_samples: Path | None = None
    bar = tqdm(
        total=steps,
        initial=start,
        desc="train",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    t_log, step_log = time.perf_counter(), start
    model.train()
    try:
        with _sigint(stop):
            while step < steps:
                in_step = True
                x0 = loader.next_batch()
                stats = train_step(engine, x0, lr=lr_at(step, lr, warmup))
                acc.add(stats)
                step += 1
                in_step = False
                bar.update(1)
                if step % log_every == 0 or step == steps:
                    means = acc.pop_means()  # the one host sync of the interval
                    now = time.perf_counter()
                    dt = max(now - t_log, 1e-9)
                    means.update(
                        lr=lr_at(step - 1, lr, warmup),
                        epoch=loader.epoch,
                        img_per_s=(step - step_log) * batch_size / dt,
                        sec_per_step=dt / (step - step_log),
                    )
                    t_log, step_log = now, step
                    log.write(step, means)
                    bar.set_postfix(
                        loss=f"{means['loss']:.4f}", img_s=f"{means['img_per_s']:.0f}", refresh=False
                    )
                    if not math.isfinite(means["loss"]):
                        raise TrainingError(
                            f"the loss is {means['loss']} at step {step}; lower --lr or check the data "
                            f"(last checkpoint: {last_ckpt or 'none'})"
                        )
                if stop.requested:
                    interrupted = True
                    break
                if sample_every and step % sample_every == 0 and step < steps:
                    last_samples = write_grid(step)
                if save_every and step % save_every == 0 and step < steps:
                    last_ckpt = save(step)
    except KeyboardInterrupt:
        interrupted = True
        if in_step:  # the step was cut in half: its state is not consistent, keep the last checkpoint
            bar.close()
            log.close()
            raise TrainingInterrupted(step, last_ckpt, saved=False) from None
    finally:
        bar.close()

    if interrupted:
        ckpt = save(step) if step > start or last_ckpt is None else last_ckpt
        log.close()
        raise TrainingInterrupted(step, ckpt, saved=True)

    if last_ckpt is None or step > start or last_ckpt.name != f"ckpt-{step:06d}":
        last_ckpt = save(step)
    last_samples = write_grid(step)
    result_eval: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    if known is not None and eval_n > 0:
        result_eval, eval_metrics = evaluate_known(
            ema.module,
            schedule,
            known,
            data,
            clean,
            n=eval_n,
            sampler=sampler,
            steps=sample_steps,
            clip_x0=clip_x0,
            seed=seed,
            device=device,
        )
        log.write(step, result_eval, kind="eval")
    log.close()
    return TrainResult(
        run_dir,
        step,
        last_ckpt,
        last_samples,
        log.path,
        result_eval,
        device=str(device),
        seconds=time.perf_counter() - t_start,
        eval_metrics=eval_metrics,
        data_kind=data_kind,
    )


def evaluate_known(
    model: nn.Module,
    schedule,
    known,
    data: torch.Tensor,
    clean: torch.Tensor,
    *,
    n: int,
    sampler: str = "ddim",
    steps: int = 50,
    clip_x0: float | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, float], dict[str, float]]:
    """The final evaluation on a known distribution: :func:`fastat.eval.known_metrics` of ``n`` samples
    (what ``fastat eval --run`` reports, from the same seeded noise), and its summary for metrics.jsonl:
    the mean exact distance to the clean support of the samples, the training data and its clean copy."""
    from fastat.eval.evaluate import known_metrics

    t0 = time.perf_counter()
    m = known_metrics(model, schedule, known, train_data=data, n=n, sampler=sampler, steps=steps, eta=0.0,
                      seed=seed, device=device, clip_x0=clip_x0)  # fmt: skip
    summary = {
        "dist_samples": m["dist_mean"],
        "dist_data": m["data_dist_mean"],
        "dist_clean": known.distance_to_support(clean.cpu()).mean().item(),
        "n": n,
        "seconds": time.perf_counter() - t0,
    }
    return summary, m


# -- config -> run -------------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, resume: Path | Checkpoint | None = None, progress: bool = True) -> TrainResult:
    """Build everything ``cfg`` describes and run :func:`training_loop` (from ``resume`` if given).

    ``cfg`` should come from :func:`resolve_config` (or :func:`finalize`); it is written to
    ``RUN/config.yaml``. Raises ConfigError / DatasetError / CheckpointError on bad input,
    :class:`TrainingInterrupted` on Ctrl-C (after saving).
    """
    cfg = finalize(cfg)
    device = resolve_device(cfg.run.device)
    precision = resolve_precision(cfg.run.precision, device)
    ckpt = load_checkpoint(resume) if isinstance(resume, (str, Path)) else resume
    run_dir = prepare_run_dir(cfg.run.out, resuming=ckpt is not None)
    td = build_training_data(cfg)
    spec = _plain({"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs)})
    data_info = {
        "name": td.name,
        "kind": td.kind,
        "sample_shape": list(td.sample_shape),
        "known": td.known is not None,
        "num_samples": len(td),
        "clip_x0": clip_for(td.kind, td.known is not None),
        "source": td.source,
    }
    if ckpt is not None:
        _check_compatible(ckpt, spec, data_info)

    torch.manual_seed(cfg.run.seed)  # model initialisation and dropout
    try:
        model = build_model(spec["name"], **spec["kwargs"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build model {spec['name']} with {spec['kwargs']}: {e}") from None
    model = model.to(device)
    flip = cfg.data.flip if cfg.data.flip is not None else (td.kind == "image" and td.known is None)
    config_yaml = cfg.to_yaml()
    atomic_write_text(run_dir / CONFIG_FILE, config_yaml)
    r, op = cfg.run, cfg.optim
    return training_loop(
        run_dir,
        data=td.data,
        clean=td.clean,
        data_kind=td.kind,
        known=td.known,
        flip=flip,
        model=model,
        objective=cfg.build_objective(),
        steps=r.steps,
        batch_size=r.batch_size,
        lr=op.lr,
        warmup=op.warmup,
        clip=op.clip,
        weight_decay=op.weight_decay,
        betas=op.betas,
        adam_eps=op.eps,
        ema_decay=cfg.ema.decay,
        ema_warmup=cfg.ema.warmup,
        seed=r.seed,
        device=device,
        precision=precision,
        fast=r.fast,
        log_every=r.log_every,
        save_every=r.save_every,
        sample_every=r.sample_every,
        keep=r.keep,
        sample_n=r.sample_n,
        sampler=r.sampler,
        sample_steps=r.sample_steps,
        clip_x0=data_info["clip_x0"],
        eval_n=r.eval_n,
        resume=ckpt,
        state_extra={"config": cfg.to_dict(), "model": spec, "data": data_info},
        config_yaml=config_yaml,
        progress=progress,
        tensorboard=r.tensorboard,
    )


def _check_compatible(ckpt: Checkpoint, spec: dict, data_info: dict) -> None:
    saved = _plain(ckpt.state.get("model"))
    spec = _plain(spec)
    if saved != spec:
        raise CheckpointError(
            f"cannot resume {ckpt.path}: it holds model {_describe(saved)}, "
            f"this run builds {_describe(spec)} "
            f"(drop the model flags to continue it, or train into a new --out)"
        )
    s_data = ckpt.state.get("data", {})
    for key in ("sample_shape", "num_samples"):
        if s_data.get(key) != data_info[key]:
            raise CheckpointError(
                f"cannot resume {ckpt.path}: it was trained on data with {key}={s_data.get(key)}, "
                f"this run's data has {key}={data_info[key]}"
            )


def _describe(spec) -> str:
    if not isinstance(spec, dict):
        return repr(spec)
    kw = ", ".join(f"{k}={v}" for k, v in sorted(spec.get("kwargs", {}).items()))
    return f"{spec.get('name')}({kw})"
