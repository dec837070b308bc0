"""What a run steps and every checkpoint holds (:class:`TrainState`: the model, its step engine, the batch
source, the values saved alongside), and how it is built from the config and the data.

    td = build_training_data(cfg)                          # the data (an image folder prepared first)
    state = build_state(cfg, td, device, extra, ctx)       # model, engine, this rank's batches
    start = state.restore(ckpt, ctx, cfg.run.seed)         # a checkpoint's weights, optimizer, RNG, data
    state.state_dict(step, rngs)                           # what state.pt holds
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from fastat import __version__
from fastat.at.prediction import as_eps_model
from fastat.at.sampling import SamplerSpec
from fastat.data import DatasetError, TensorLoader, TrainingData, build_dataset, image_loader
from fastat.data.placement import DeviceImages, StreamImages
from fastat.models import build_model
from fastat.step.engine import StepEngine
from fastat.train.checkpoint import Checkpoint, CheckpointError, load_weights, require_finite
from fastat.train.config import ConfigError, TrainConfig, plain
from fastat.train.distributed import DistContext
from fastat.train.run_config import (
    CLASS_HINT,
    default_corrupt_frac,
    loose_message,
    resolve_precision,
    run_eta,
    unlabelled_message,
)
from fastat.utils.errors import listing

__all__ = [
    "TrainState",
    "build_batches",
    "build_checked_model",
    "build_state",
    "build_training_data",
    "check_compatible",
    "clip_for",
    "run_sampler",
    "data_info",
    "data_line",
    "model_spec_of",
    "say",
]


def clip_for(kind: str) -> float | None:
    """Sampling clamps the predicted x0 to [-1, 1] for images (as DDPM does; the known subspace keeps
    ~99% of its pixels in that range) and leaves points free."""
    return 1.0 if kind == "image" else None


def run_sampler(cfg: TrainConfig, kind: str) -> SamplerSpec:
    """The sampler of a run's grids and final evaluation (``run.sampler``, ``run.sample_steps``, the eta of
    :func:`~fastat.train.run_config.run_eta`, :func:`clip_for` its data ``kind``)."""
    return SamplerSpec(cfg.run.sampler, cfg.run.sample_steps, run_eta(cfg), clip_for(kind))


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
            say(
                f"fastat: {ckpt.path} was written by {saved_world} rank(s), this run has {ctx.world_size}: "
                f"it continues from step {ckpt.step} with the same weights, optimizer state and data "
                f"position (samples seen), but not bit-exactly (new random streams per rank, batches split "
                f"anew)"
            )
        return ckpt.step


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
        noise_p=d.corrupt_frac if d.corrupt_frac is not None else default_corrupt_frac(d.dataset),
        noise_sigma=d.corrupt_sigma,
        outliers=d.outliers,
        outlier_kind=d.outlier_kind,
        cache_dir=d.cache_dir,
        progress=progress,
        log=say,
        min_items=cfg.run.batch_size,
        prepare_wait=d.prepare_wait,
    )
    if len(td) == 0:
        raise DatasetError(f"dataset {d.dataset!r} is empty")
    if cfg.run.batch_size > len(td):
        raise ConfigError(f"--batch-size {cfg.run.batch_size} is larger than the dataset ({len(td)} samples)")
    if d.class_cond:
        check_labels(cfg, td)
    return td


def check_labels(cfg: TrainConfig, td: TrainingData) -> None:
    """Class-conditional training needs a label for every sample, each below the model's class count."""
    d, kw = cfg.data, cfg.model.kwargs
    if td.labels is None and td.classes is None and td.images is not None:  # a set from an older fastat
        raise DatasetError(unlabelled_message(getattr(td.images, "root", d.dataset)))
    if td.labels is None:
        raise DatasetError(f"data.class_cond (--class-cond): dataset {d.dataset!r} has no class labels "
                           f"({CLASS_HINT})")  # fmt: skip
    loose = int((td.labels < 0).sum())
    if loose:
        raise DatasetError(loose_message(loose, d.dataset, td.classes or ()))
    classes = kw.get("num_classes") or kw.get("num_class_embeds", 1) - 1
    if classes and int(td.labels.max()) >= classes:
        raise ConfigError(f"model.num_classes {classes} is smaller than the data's {int(td.labels.max()) + 1} "
                          f"classes; raise it or leave it unset (the data's)")  # fmt: skip


def build_batches(
    cfg: TrainConfig, td: TrainingData, device: torch.device, *, rank: int = 0, world_size: int = 1
) -> TensorLoader | DeviceImages | StreamImages:
    """The loop's batch source: ``next_batch()`` on the device, ``state_dict()`` for exact resume.

    Known sets: a :class:`TensorLoader` of float data. Real images: :func:`fastat.data.image_loader`
    (uint8 batches, ``data.placement`` auto | device | stream; the choice and its reason go to the log),
    whose ``transform`` the step applies. ``batch_size`` is global; this rank gets its share."""
    d, r = cfg.data, cfg.run
    flip = bool(d.flip)  # None (a config not finalized): off
    if td.images is None:
        return TensorLoader(td.data, r.batch_size, generator_seed=r.seed, device=device, flip=flip, rank=rank,
                            world_size=world_size, labels=td.labels if d.class_cond else None)  # fmt: skip
    budget = None if d.device_budget_gb is None else int(d.device_budget_gb * 1e9)
    loader = image_loader(td.images, r.batch_size, seed=r.seed, device=device, placement=d.placement,
                          flip=flip, corruption=td.corruption, rank=rank, world_size=world_size,
                          workers=d.num_workers or 2, prefetch=d.prefetch, budget_bytes=budget,
                          labels=td.labels if d.class_cond else None)  # fmt: skip
    return loader


def data_line(cfg: TrainConfig, td: TrainingData, batches, device: torch.device) -> str:
    """The run's data line: what the data is, what the trainer applies to it (:func:`applied`) and, for
    real images, where it is placed and why."""
    what = applied(td, cfg.data.corrupt_sigma, bool(cfg.data.flip))
    if cfg.data.class_cond and td.num_classes:  # label K is the K-th name (fastat sample --class K)
        names = listing(f"{k} {n}" for k, n in enumerate(td.classes or ()))
        what += f"; class labels: {td.num_classes} classes" + (f" ({names})" if names else "")
    shape = "x".join(map(str, td.sample_shape))
    if td.images is None:
        return f"fastat: data: {td.name}, {len(td)} samples {shape} on {device}; {what}"
    return (f"fastat: data: {len(td.images)} images {shape} {_prepared(td)}; {what}; on {device}, placement "
            f"{batches.placement}: {batches.reason}")  # fmt: skip


def applied(td: TrainingData, sigma: float, flip: bool) -> str:
    """What the trainer does to the data it was given (the data line says it): the corruption (how many
    samples get noise of std ``sigma``, how many are outliers) and flips; ``used as given`` when nothing."""
    n, what = len(td), "images" if td.images is not None else "samples"
    parts = []
    noisy, out = int(td.noisy_mask.sum()), int(td.outlier_mask.sum())
    if noisy and sigma > 0:
        parts.append(f"fixed Gaussian noise (sigma {sigma:g}) added to {noisy} of the {n} {what} "
                     f"({noisy / n:.0%}, data.corrupt_frac)")  # fmt: skip
    if out:
        parts.append(f"{out} {what} replaced by outliers (data.outliers)")
    if flip:
        parts.append("random horizontal flips (data.flip)")
    if not parts:
        return "no noise added, no flips"
    return "applied: " + ", ".join(parts)


def _prepared(td: TrainingData) -> str:
    """How a real image set was made from its source: resized and cropped when it was prepared."""
    images = td.images
    manifest = getattr(images, "manifest", None)
    if manifest is not None:
        size = manifest.get("image_size", td.sample_shape[-1])
        return f"from {td.source} (prepared: short side resized to {size} px, centre crop)"
    return f"from {td.source} (as stored, not resized)"


def build_state(cfg: TrainConfig, td: TrainingData, device: torch.device, extra: dict,
                ctx: DistContext | None = None) -> TrainState:  # fmt: skip
    """The model (initialised from ``run.seed``: the same on every rank), its engine, this rank's
    batches and the objective's generator (this rank's own stream, as dropout)."""
    r, op = cfg.run, cfg.optim
    ctx = ctx or DistContext()
    spec = extra["model"]
    torch.manual_seed(r.seed)  # model initialisation and (one rank) dropout
    model = build_checked_model(spec).to(device)
    if ctx.enabled:
        torch.manual_seed(ctx.rank_seed(r.seed, "dropout"))
    batches = build_batches(cfg, td, device, rank=ctx.rank, world_size=ctx.world_size)
    generator = torch.Generator(device=device).manual_seed(ctx.rank_seed(r.seed, "objective"))
    engine = StepEngine(
        model, cfg.build_objective(), generator=generator, lr=op.lr, betas=tuple(op.betas), eps=op.eps,
        weight_decay=op.weight_decay, clip=op.clip, ema_decay=cfg.ema.decay, ema_warmup=cfg.ema.warmup,
        precision=resolve_precision(r.precision, device),
        fast=device.type == "cuda" if r.fast is None else r.fast,
        log=say if ctx.is_main else _quiet,
        prepare_batch=getattr(batches, "transform", None),  # uint8 image batches -> float, in the step
        reduce_grads=ctx.grad_sync(model), ranks=ctx if ctx.enabled else None, grad_accum=r.grad_accum,
    )  # fmt: skip
    return TrainState(model, engine, batches, device, extra)


def model_spec_of(cfg: TrainConfig) -> dict:
    """The finalized config's model as a plain ``{"name", "kwargs"}`` (what checkpoints record)."""
    return plain({"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs)})


def build_checked_model(spec: dict, device: torch.device | str | None = None) -> nn.Module:
    """The model of ``spec`` (``{"name", "kwargs"}``), a bad spec as one ConfigError. ``device="meta"``
    (``--dry-run``) allocates no weights but runs every check of the real build, with its message."""
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return build_model(spec["name"], **spec["kwargs"])
    except (TypeError, ValueError, ImportError) as e:
        raise ConfigError(f"cannot build model {spec['name']} with {spec['kwargs']}: {e}") from None


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
        "classes": list(td.classes) if td.classes else None,  # the names of the labels (fastat sample --class)
    }


def check_compatible(ckpt: Checkpoint, spec: dict, data_info: dict) -> None:
    """CheckpointError unless the checkpoint holds the model ``spec`` (plain, as saved) and was trained on
    data of this shape and size."""
    saved = plain(ckpt.state.get("model"))
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


def say(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def _quiet(msg: str) -> None:
    """Ranks other than 0 keep the messages every rank would print alike."""
