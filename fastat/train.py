"""Training: the config turned into a run, and the loop that steps it.

    cfg, ckpt = resolve_config(overrides, resume="auto")   # layering, resume, model "auto", run folder
    result = train(cfg, resume=ckpt)                       # builds data/model/objective, runs the loop

:func:`train` opens the run folder (:class:`fastat.run_folder.RunFolder`: lock, checks), builds the
data, the :class:`TrainState` (model, step engine, batches, generator) and restores it from the
checkpoint, writes the config, and hands over to :func:`training_loop`, which reads top to bottom::

    while step < steps:
        x0 = batches.next_batch()                    # a batch on the device (images: uint8, see below)
        stats = train_step(engine, x0, lr=...)       # device statistics, no host sync
        interval.add(stats)                          # device sums
        if log step:    run.log(interval.pop())      # the interval's one host sync
        if sample step: write_grid(...)
        if save step:   save(run, state, step)

Each step (:func:`train_step`, run by :class:`fastat.engine.StepEngine`): ``ATObjective`` under
autocast (noise, attack, loss) -> backward -> clip -> AdamW -> EMA; with ``run.fast`` (the default on
CUDA) the model is compiled and, on CUDA, the step is a CUDA graph. All randomness comes from seeded
generators (the objective's own ``torch.Generator`` on the device, the loader's generators, the global
generator for initialisation and dropout), and all of their states go into every checkpoint, so a
resumed run continues exactly (bit for bit on the CPU). What a run folder holds: see
:mod:`fastat.run_folder` and :mod:`fastat.checkpoint`.

Under ``torchrun`` every rank runs all of this with its :class:`fastat.distributed.DistContext`: the
same model, its own shard of each batch and its own random streams, gradients averaged in the step;
rank 0 alone writes the run folder, and the ranks stop at the same step.
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
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from fastat import __version__
from fastat.checkpoint import (
    Checkpoint,
    CheckpointError,
    NonFiniteWeights,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    require_finite,
    run_dir_of,
)
from fastat.config import ConfigError, TrainConfig, _plain
from fastat.data import (
    DATASETS,
    KNOWN,
    DatasetError,
    TensorLoader,
    TrainingData,
    build_dataset,
    derive_seed,
    image_loader,
    is_prepared,
    read_manifest,
)
from fastat.data.placement import DeviceImages, StreamImages
from fastat.distributed import DistContext, mark
from fastat.engine import StepEngine
from fastat.errors import one_line
from fastat.metrics import StatsAccumulator, peak_rss_mb
from fastat.models import build_model
from fastat.prediction import as_eps_model
from fastat.run_folder import CONFIG_FILE, RunFolder
from fastat.samples import generate, write_samples

__all__ = [
    "TrainResult",
    "TrainState",
    "TrainingError",
    "TrainingInterrupted",
    "build_batches",
    "build_state",
    "build_training_data",
    "model_spec",
    "resolve_config",
    "resolve_device",
    "train",
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


# -- configuration -> things -------------------------------------------------------------------------


def resolve_device(name: str, ctx: DistContext | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA raises ConfigError. Under
    ``torchrun`` (``ctx``) each rank gets ``cuda:LOCAL_RANK``."""
    if ctx is not None and ctx.enabled:
        return ctx.cuda_device(resolve_device(name))
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
    if d.dataset == "subspace" and d.image_size:  # its shape without drawing its basis (C*H*W x k)
        return "image", (_subspace_default("channels"), d.image_size, d.image_size)
    if d.dataset in KNOWN:
        from fastat.data import known_dataset

        dist = known_dataset(d.dataset)  # (a sized subspace returned above)
        return dist.kind, tuple(dist.sample_shape)
    if d.dataset != "cifar10" and is_prepared(d.dataset):
        shape = tuple(read_manifest(d.dataset)["shape"])
        if d.image_size is not None and shape[1:] != (d.image_size, d.image_size):
            raise ConfigError(
                f"--dataset {d.dataset} holds {shape[1]}x{shape[2]} images, not "
                f"{d.image_size}x{d.image_size} (--image-size); drop --image-size, or prepare the source "
                f"again at that size"
            )
        return "image", shape
    size = d.image_size or (32 if d.dataset == "cifar10" else None)
    if size is None:  # validate() requires image_size for folders
        raise ConfigError(f"data.image_size (--image-size) is required for the image folder {d.dataset!r}")
    return "image", (3, size, size)


def model_spec(cfg: TrainConfig) -> dict:
    """``{"name", "kwargs"}`` for :func:`fastat.models.build_model`, fitted to the data's shape:
    ``auto`` picks ``mlp`` for points and the UNet preset nearest the image size; the UNet gets
    ``image_size``/``in_channels`` and the MLP ``dim`` from the data; a diffusers UNet its ``config``
    file inlined (so checkpoints are self-contained) and its sample size and channels from the data."""
    kind, shape = data_shape(cfg)
    name, kwargs = cfg.model.name, dict(cfg.model.kwargs)
    if name == "diffusers":
        return _plain({"name": name, "kwargs": diffusers_kwargs(cfg, kind, shape, kwargs)})
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


def diffusers_kwargs(cfg: TrainConfig, kind: str, shape: tuple[int, ...], kwargs: dict) -> dict:
    """``UNet2DModel`` arguments for ``--model diffusers``: the ``config`` file's, overridden by the other
    ``model.kwargs``, with ``sample_size``, ``in_channels`` and ``out_channels`` set from the data."""
    from fastat.models.diffusers_unet import INSTALL_HINT, diffusers_available, read_unet_config

    if not diffusers_available():
        raise ConfigError(f"--model diffusers needs the diffusers package: {INSTALL_HINT}")
    if kind != "image":
        raise ConfigError(f"model diffusers is a UNet2DModel for images; dataset {cfg.data.dataset!r} holds "
                          f"points of shape {shape} (use --model mlp or auto)")  # fmt: skip
    if "config" in kwargs:
        try:
            kwargs = {**read_unet_config(kwargs.pop("config")), **kwargs}
        except ValueError as e:
            raise ConfigError(f"model.kwargs.config: {e}") from None
    for key in ("in_channels", "out_channels"):
        if kwargs.get(key, shape[0]) != shape[0]:
            raise ConfigError(f"model.kwargs.{key}={kwargs[key]} but the data has {shape[0]} channels")
    kwargs.update(sample_size=shape[-1], in_channels=shape[0], out_channels=shape[0])
    return kwargs


def default_run_name(cfg: TrainConfig) -> str:
    ds = cfg.data.dataset if cfg.data.dataset in DATASETS else Path(cfg.data.dataset).name or "folder"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{ds}-{cfg.objective.mode}"


def finalize(cfg: TrainConfig) -> TrainConfig:
    """Resolve what depends on the data or the clock: the model (``auto``, data-derived arguments),
    the sampler's ``eta`` (auto: 1 on the built-in sets, 0 on real images) and the run folder
    (``runs/<date>-<time>-<dataset>-<mode>``). Validates first."""
    cfg.validate()
    check_data_memory(cfg)
    spec = model_spec(cfg)
    over: dict = {"model.name": spec["name"], "model.kwargs": spec["kwargs"]}
    if cfg.run.sample_eta is None:
        over["run.sample_eta"] = run_eta(cfg)
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
            raise CheckpointError(f"cannot read {f}: {one_line(e, first_only=True)}") from None
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
        cfg = base.with_overrides({"run.out": str(run_dir_of(ckpt)), **overrides})
    return finalize(cfg), ckpt


def _subspace_default(name: str) -> int:
    import inspect

    from fastat.data import Subspace

    return inspect.signature(Subspace).parameters[name].default


def check_data_memory(cfg: TrainConfig) -> None:
    """Refuse (ConfigError) a built-in dataset that cannot fit in this machine's memory (the training set
    and its clean copy, float32), before trying to allocate it. (Image sets are uint8 and can stream.)"""
    d = cfg.data
    if d.dataset not in KNOWN:
        return
    count = d.n
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if total <= 0:
        return
    _, shape = data_shape(cfg)
    dim = math.prod(shape)
    need = 2 * 4 * count * dim + (8 * dim * _subspace_default("k") if d.dataset == "subspace" else 0)
    if need > total:
        raise ConfigError(
            f"the dataset needs {need / 2**30:.1f} GiB of memory ({count} samples of shape {list(shape)}, "
            f"float32, with its clean copy), more than this machine's {total / 2**30:.1f} GiB: "
            f"lower --image-size or data.n / data.max_items"
        )


def build_training_data(cfg: TrainConfig, *, progress: bool = True) -> TrainingData:
    """The run's training data (:func:`fastat.data.build_dataset`); an image folder is prepared into
    the cache first if needed (with a progress bar)."""
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
        cache_dir=d.cache_dir,
        progress=progress,
        log=_say,
        min_items=cfg.run.batch_size,
    )
    if len(td) == 0:
        raise DatasetError(f"dataset {d.dataset!r} is empty")
    if cfg.run.batch_size > len(td):
        raise ConfigError(f"--batch-size {cfg.run.batch_size} is larger than the dataset ({len(td)} samples)")
    return td


def run_eta(cfg: TrainConfig) -> float:
    """The DDIM eta of a run's grids and evaluation: ``run.sample_eta`` (resolved by :func:`finalize`;
    the same auto rule for configs that predate the key)."""
    eta = cfg.run.sample_eta
    return eta if eta is not None else (1.0 if cfg.data.dataset in KNOWN else 0.0)


def clip_for(kind: str) -> float | None:
    """Sampling clamps the predicted x0 to [-1, 1] for images (as DDPM does; the known subspace keeps
    ~99% of its pixels in that range) and leaves points free."""
    return 1.0 if kind == "image" else None


# -- the state a run steps and saves ------------------------------------------------------------------


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
    """One optimisation step (see :class:`fastat.engine.StepEngine`; ``x0=None`` replays the batch in
    ``free`` mode); detached device statistics."""
    return engine.step(x0, lr)


@dataclass
class TrainState:
    """What the loop steps and every checkpoint holds: the model, its step engine (optimizer, EMA, the
    objective's generator), the batch source, and plain values saved alongside (config, model, data)."""

    model: nn.Module
    engine: StepEngine
    batches: TensorLoader | DeviceImages | StreamImages
    device: torch.device
    extra: dict = field(default_factory=dict)

    @property
    def generator(self) -> torch.Generator:
        """The objective's generator (noise, timesteps, perturbations): the engine's."""
        return self.engine.generator

    @property
    def ema(self) -> nn.Module:
        """The EMA weights (what sampling uses)."""
        return self.engine.ema.module

    def ema_eps_model(self) -> nn.Module:
        """The EMA model as an eps-model (a v- or x0-model converted): what the samplers and the
        evaluations take."""
        obj = self.engine.objective
        return as_eps_model(self.ema, obj.prediction, obj.schedule)

    def rng_state(self) -> dict:
        """This process's random states: the global generators (initialisation, dropout; on CUDA the
        training device's), and the objective's (noise, timesteps, perturbations), with what the
        objective keeps between steps (``free``: this rank's replayed batch, its t, noise seed and
        perturbation; on the CPU)."""
        kept = tree_map(lambda v: v.cpu() if isinstance(v, torch.Tensor) else v,
                        self.engine.objective_state_dict())  # fmt: skip
        return {
            "torch": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
            "objective": self.generator.get_state(),
            **({"objective_state": kept} if kept else {}),
        }

    def set_rng_state(self, rng: dict) -> None:
        torch.set_rng_state(rng["torch"])
        cuda = rng.get("cuda")
        if self.device.type == "cuda" and cuda is not None and len(cuda):
            if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible device's; this one's
                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                cuda = cuda[index] if index < len(cuda) else cuda[0]
            torch.cuda.set_rng_state(cuda, self.device)
        self.generator.set_state(rng["objective"])
        self.engine.load_objective_state(rng.get("objective_state", {}))  # free: mid-replay too

    def state_dict(self, step: int, rngs: list[dict] | None = None) -> dict:
        """Everything but the weights, for ``state.pt`` (tensors and plain values only). ``rngs``: the
        random states of every rank (data parallel: ``rng_ranks``, with the world size; else ``rng``)."""
        rngs = rngs or [self.rng_state()]
        return {
            "step": step,
            "optimizer": self.engine.optimizer.state_dict(),
            "ema": self.engine.ema.state_dict(),
            "loader": self.batches.state_dict(),
            **({"world_size": len(rngs), "rng_ranks": rngs} if len(rngs) > 1 else {"rng": rngs[0]}),
            "fastat_version": __version__,
            **({"scaler": self.engine.scaler.state_dict()} if self.engine.scaler is not None else {}),
            **self.extra,
        }

    def restore(self, ckpt: Checkpoint, ctx: DistContext, seed: int) -> int:
        """Load a checkpoint's weights and state (CheckpointError if they do not fit or are not finite);
        returns its step. Saved by as many ranks as this run has: every rank continues its own random
        streams, exactly. By another number: the same weights, optimizer, step and data position (in
        samples), with new random streams per rank: a continuation, not bit-exact (said on stderr)."""
        require_finite(ckpt.model, f"the weights of {ckpt.path}")
        require_finite(ckpt.ema, f"the EMA weights of {ckpt.path}")
        load_weights(self.model, ckpt.model, f"{ckpt.path}/model.safetensors")
        load_weights(self.ema, ckpt.ema, f"{ckpt.path}/ema.safetensors")
        st = ckpt.state
        saved_world = int(st.get("world_size", 1))
        exact = saved_world == ctx.world_size
        try:
            self.engine.load_optimizer_state(st["optimizer"])
            self.batches.load_state_dict(st["loader"], strict=exact)
            self.engine.ema.load_state_dict(st["ema"])
            if exact:
                self.set_rng_state(st["rng_ranks"][ctx.rank] if "rng_ranks" in st else st["rng"])
            else:  # new streams for the new ranks, not those of the run's start
                torch.manual_seed(ctx.rank_seed(seed, f"dropout@{ckpt.step}"))
                self.generator.manual_seed(ctx.rank_seed(seed, f"objective@{ckpt.step}"))
            if self.engine.scaler is not None and "scaler" in st:  # fp16: the loss scale goes on
                self.engine.scaler.load_state_dict(st["scaler"])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"checkpoint {ckpt.path} does not fit this run: {e}") from None
        if not exact and ctx.is_main:
            _say(
                f"fastat: {ckpt.path} was written by {saved_world} rank(s), this run has {ctx.world_size}: "
                f"it continues from step {ckpt.step} with the same weights, optimizer state and data "
                f"position (samples seen), but not bit-exactly (new random streams per rank, batches split "
                f"anew)"
            )
        return ckpt.step


def build_batches(
    cfg: TrainConfig, td: TrainingData, device: torch.device, *, rank: int = 0, world_size: int = 1
) -> TensorLoader | DeviceImages | StreamImages:
    """The loop's batch source: ``next_batch()`` on the device, ``state_dict()`` for exact resume.

    Known sets: a :class:`TensorLoader` of float data. Real images: :func:`fastat.data.image_loader`
    (uint8 batches, ``data.placement`` auto | device | stream; the choice and its reason go to the log),
    whose ``transform`` the step applies. ``batch_size`` is global; this rank gets its share."""
    d, r = cfg.data, cfg.run
    flip = d.flip if d.flip is not None else (td.kind == "image" and td.known is None)
    if td.images is None:
        return TensorLoader(td.data, r.batch_size, generator_seed=r.seed, device=device, flip=flip, rank=rank,
                            world_size=world_size)  # fmt: skip
    budget = None if d.device_budget_gb is None else int(d.device_budget_gb * 1e9)
    loader = image_loader(td.images, r.batch_size, seed=r.seed, device=device, placement=d.placement,
                          flip=flip, corruption=td.corruption, rank=rank, world_size=world_size,
                          workers=d.num_workers or 2, prefetch=d.prefetch, budget_bytes=budget)  # fmt: skip
    if rank == 0:
        shape = "x".join(map(str, td.images.shape))
        _say(f"fastat: data: {len(td.images)} images {shape} on {device}, placement {loader.placement}: "
             f"{loader.reason}")  # fmt: skip
    return loader


def build_state(cfg: TrainConfig, td: TrainingData, device: torch.device, extra: dict,
                ctx: DistContext | None = None) -> TrainState:  # fmt: skip
    """The model (initialised from ``run.seed``: the same on every rank), its engine, this rank's
    batches and the objective's generator (this rank's own stream, as dropout)."""
    r, op = cfg.run, cfg.optim
    ctx = ctx or DistContext()
    spec = extra["model"]
    torch.manual_seed(r.seed)  # model initialisation and (one rank) dropout
    try:
        model = build_model(spec["name"], **spec["kwargs"])
    except (TypeError, ValueError, ImportError) as e:
        raise ConfigError(f"cannot build model {spec['name']} with {spec['kwargs']}: {e}") from None
    model = model.to(device)
    if ctx.enabled:
        torch.manual_seed(ctx.rank_seed(r.seed, "dropout"))
    batches = build_batches(cfg, td, device, rank=ctx.rank, world_size=ctx.world_size)
    generator = torch.Generator(device=device).manual_seed(ctx.rank_seed(r.seed, "objective"))
    engine = StepEngine(
        model, cfg.build_objective(), generator=generator, lr=op.lr, betas=tuple(op.betas), eps=op.eps,
        weight_decay=op.weight_decay, clip=op.clip, ema_decay=cfg.ema.decay, ema_warmup=cfg.ema.warmup,
        precision=resolve_precision(r.precision, device),
        fast=device.type == "cuda" if r.fast is None else r.fast,
        log=_say if ctx.is_main else _quiet,
        prepare_batch=getattr(batches, "transform", None),  # uint8 image batches -> float, in the step
        reduce_grads=ctx.grad_sync(model), ranks=ctx if ctx.enabled else None,
    )  # fmt: skip
    return TrainState(model, engine, batches, device, extra)


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def _quiet(msg: str) -> None:
    """Ranks other than 0 keep the messages every rank would print alike."""


# -- what the loop does between steps ------------------------------------------------------------------


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
            _say(f"fastat: {name}; saving a checkpoint after this step (Ctrl-C again to quit now)")

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
    stacked into one vector (:class:`fastat.metrics.StatsAccumulator`)."""

    def __init__(self, step: int, batch_size: int) -> None:
        self.acc, self.batch_size = StatsAccumulator(), batch_size
        self.skipped: torch.Tensor | int = 0
        self.t0, self.step0 = time.perf_counter(), step

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        skipped = stats["skipped"]
        self.acc.add({k: v for k, v in stats.items() if k != "skipped"}, weight=1 - skipped)
        self.skipped = skipped.detach().float() + self.skipped

    def pop(self, step: int, streak: torch.Tensor, ctx: DistContext | None = None,
            **extra: float) -> dict[str, float]:  # fmt: skip
        """Means since the last pop (over all ranks: ``ctx``), the skipped steps, the engine's
        ``skip_streak``, throughput (of the global batch) and ``extra``: one host sync for all of it."""
        skipped = self.skipped if torch.is_tensor(self.skipped) else torch.zeros(())
        means = self.acc.pop_means({"skip_streak": streak, "skipped": skipped})
        means = ctx.average(means) if ctx is not None else means  # counts: the same on every rank
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
    with ctx.together("the checkpoint"), _io_errors(run):
        try:
            return run.save(step, model=state.model, ema=state.ema, state=state.state_dict(step, rngs),
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

    def sample(part: torch.Tensor, start: int) -> torch.Tensor:  # this rank's rows, its own DDPM noise
        g = torch.Generator(state.device)
        g.manual_seed(derive_seed(r.seed, "sample-ddpm" + (f"@{start}" if start else "")))
        return generate(model, schedule, part, sampler=r.sampler, steps=r.sample_steps, eta=run_eta(cfg),
                        clip_x0=clip_for(td.kind), device=state.device,
                        generator=g)  # fmt: skip

    x = ctx.spread(sample, noise)
    if not run.writer or x is None:
        return None
    with _io_errors(run):
        return _write_grid_file(run, x, td, step, r.sample_n)


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


# -- the loop ------------------------------------------------------------------------------------------


def training_loop(
    run: RunFolder,  # the run folder, started (config written, metrics open)
    state: TrainState,  # model, engine (optimizer, EMA), batches, generator: restored when resuming
    cfg: TrainConfig,  # steps, intervals, learning rate, sampling settings
    td: TrainingData,  # the training set (sample shape, kind, final evaluation)
    *,
    start: int = 0,  # the step the state is at
    progress: bool = True,  # tqdm progress bar
    ctx: DistContext | None = None,  # the ranks of a torchrun job (None: this process alone)
) -> TrainResult:
    """Train from ``start`` to ``cfg.run.steps`` (every rank): log, sample and save on their intervals,
    save and evaluate at the end. Ctrl-C or SIGTERM finishes the step, saves, raises TrainingInterrupted
    (a second one: at once, keeping the last complete checkpoint)."""
    t_start = time.perf_counter()
    r, ctx = cfg.run, ctx or DistContext()
    interval, stop, bar = Interval(start, r.batch_size), StopFlag(ctx), progress_bar(cfg, start, progress)
    step, pending_save = start, False
    state.model.train()
    try:
        with stop.installed():
            while step < r.steps:
                with _io_errors(run, "read"):
                    x0 = state.batches.next_batch() if state.engine.wants_batch else None  # None: replays
                stats = train_step(state.engine, x0, lr=step_lr(cfg, step))
                step += 1
                interval.add(stats)
                bar.update(1)
                if step % r.log_every == 0 or step == r.steps:
                    log_interval(run, interval, bar, state, cfg, step, ctx)
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
    summary, eval_metrics = final_evaluation(state, cfg, td, ctx)
    if summary:
        with _io_errors(run):
            run.log(step, summary, kind="eval")
    return TrainResult(run.path, step, run.last_checkpoint, samples, run.metrics_path, summary,
                       device=str(state.device), seconds=time.perf_counter() - t_start,
                       eval_metrics=eval_metrics, data_kind=td.kind)  # fmt: skip


def log_interval(run: RunFolder, interval: Interval, bar: tqdm, state: TrainState, cfg: TrainConfig,
                 step: int, ctx: DistContext) -> None:  # fmt: skip
    """Read the interval's statistics (averaged over the ranks) and the engine's skip streak (the
    interval's one host sync), write them (rank 0), and stop (TrainingError) once ``run.max_skipped``
    steps in a row were skipped as non-finite."""
    means = interval.pop(step, state.engine.skip_streak, ctx, lr=step_lr(cfg, step - 1),
                         epoch=state.batches.epoch, rss_peak_mb=peak_rss_mb(),
                         **cost_metrics(state.engine, cfg.run.batch_size, step))  # fmt: skip
    with _io_errors(run):
        run.log(step, means)
    bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{means['img_per_s']:.0f}", refresh=False)
    check_skips(means["skip_streak"], cfg, step, run)


def cost_metrics(engine: StepEngine, batch_size: int, step: int) -> dict[str, float]:
    """What ``step`` steps cost, in forward-pass equivalents (``flop_units``: per image seen, one step;
    a backward counts 2; :meth:`fastat.ATObjective.flop_units`). Images seen count every step's batch,
    ``free``'s replays included; ``fresh_images`` counts each batch once."""
    units = engine.objective.flop_units(batch_size)
    seen = step * batch_size
    return {"flop_units": units, "images_seen": seen, "fresh_images": -(-step // engine.replays) * batch_size,
            "flop_units_total": units * seen}  # fmt: skip


def final_evaluation(state: TrainState, cfg: TrainConfig, td: TrainingData,
                     ctx: DistContext) -> tuple[dict, dict]:  # fmt: skip
    """Known distributions: :func:`evaluate_known` of the EMA model (the samples spread over the ranks,
    the metrics on rank 0); ``({}, {})`` for real images and on the other ranks."""
    r = cfg.run
    if td.known is None or r.eval_n <= 0:
        return {}, {}
    model, schedule = state.ema_eps_model(), state.engine.objective.schedule
    return evaluate_known(model, schedule, td.known, td.data, td.clean, n=r.eval_n, sampler=r.sampler,
                          steps=r.sample_steps, eta=run_eta(cfg), clip_x0=clip_for(td.kind),
                          seed=r.seed, device=state.device, spread=ctx.spread)  # fmt: skip


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
    eta: float = 0.0,
    clip_x0: float | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    spread=None,
) -> tuple[dict[str, float], dict[str, float]]:
    """The final evaluation on a known distribution: :func:`fastat.eval.known_metrics` of ``n`` samples
    (what ``fastat eval --run`` reports, from the same seeded noise), and its summary for metrics.jsonl:
    the mean exact distance to the clean support of the samples, the training data and its clean copy.
    ``spread``: :meth:`fastat.distributed.DistContext.spread` (``({}, {})`` on ranks other than 0)."""
    from fastat.eval.evaluate import known_metrics

    t0 = time.perf_counter()
    m = known_metrics(model, schedule, known, train_data=data, n=n, sampler=sampler, steps=steps, eta=eta,
                      seed=seed, device=device, clip_x0=clip_x0, spread=spread)  # fmt: skip
    if not m:
        return {}, {}
    summary = {
        "dist_samples": m["dist_mean"],
        "dist_data": m["data_dist_mean"],
        "dist_clean": known.distance_to_support(clean.cpu()).mean().item(),
        "n": n,
        "seconds": time.perf_counter() - t0,
    }
    return summary, m


# -- config -> run -------------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, resume: Path | Checkpoint | None = None, progress: bool = True,
          ctx: DistContext | None = None) -> TrainResult:  # fmt: skip
    """Build everything ``cfg`` describes and run :func:`training_loop` (from ``resume`` if given).

    ``cfg`` should come from :func:`resolve_config` (or :func:`finalize`). The run folder is locked
    for the whole run, and nothing in it changes before every check has passed (folder ownership, data,
    model, checkpoint contents); then ``RUN/config.yaml`` is written. Raises ConfigError / DatasetError /
    CheckpointError on bad input, :class:`TrainingInterrupted` on Ctrl-C (after saving).

    Under ``torchrun`` every rank calls this (``ctx``; None: joined here from the environment): rank 0
    alone takes and writes the run folder, every rank resumes the checkpoint rank 0 resumes (else a
    ConfigError: the run folder must be on a filesystem every rank sees), the data is built in turn
    (:meth:`fastat.distributed.DistContext.in_turn`: rank 0 may prepare a cache the others then read), and
    a failed check on any rank stops all of them with one message.
    """
    if ctx is None:
        with DistContext.from_env(timeout_s=cfg.run.dist_timeout) as ctx:
            return train(cfg, resume=resume, progress=progress, ctx=ctx)
    progress = progress and ctx.is_main
    with ctx.together("the config"):
        cfg = finalize(cfg)
    cfg = ctx.from_main(cfg)  # rank 0's (a default run folder is named by rank 0's clock)
    r = cfg.run
    with contextlib.ExitStack() as stack:
        with ctx.together("start-up"):
            ctx.check_batch(r.batch_size)
            device = resolve_device(r.device, ctx)
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
                _check_compatible(ckpt, spec, info)
            state = build_state(cfg, td, device, {"config": cfg.to_dict(), "model": spec, "data": info}, ctx)
            stack.callback(state.batches.close)  # the stream placement's reader threads
            start = state.restore(ckpt, ctx, r.seed) if ckpt is not None else 0
            with _io_errors(run):
                run.start(cfg.to_yaml(), step=start)  # every check passed: the first write
        ctx.broadcast_(state.model, state.ema)  # one model: rank 0's (the same seed built it everywhere)
        return training_loop(run, state, cfg, td, start=start, progress=progress, ctx=ctx)


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


@contextlib.contextmanager
def _io_errors(run: RunFolder, doing: str = "write"):
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


def data_info(td: TrainingData) -> dict:
    """What a checkpoint records about its training data (``fastat sample``/``eval`` read it)."""
    return {
        "name": td.name,
        "kind": td.kind,
        "sample_shape": list(td.sample_shape),
        "known": td.known is not None,
        "num_samples": len(td),
        "clip_x0": clip_for(td.kind),
        "source": td.source,
    }


def _check_compatible(ckpt: Checkpoint, spec: dict, data_info: dict) -> None:
    """CheckpointError unless the checkpoint holds the model ``spec`` (plain, as saved) and was trained on
    data of this shape and size."""
    saved = _plain(ckpt.state.get("model"))
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
