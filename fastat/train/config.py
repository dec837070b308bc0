"""The training configuration: frozen dataclasses, read from YAML, overridden by flags, validated.

    cfg = TrainConfig.from_yaml("exp.yaml").with_overrides({"run.steps": 2000, "objective.mode": "pgd"})
    cfg = cfg.validate()            # ConfigError (one line) on any bad value
    cfg.dump("runs/x/config.yaml")  # the resolved config, as the run folder keeps it

A YAML file holds any subset of the sections below (unknown sections and keys are rejected with the
list of valid ones); whatever it leaves out keeps its default. Layering, lowest first: defaults, the
saved config of a run being resumed, the ``--config`` file, command-line flags.

Numbers in YAML may be written ``1e-4`` (PyYAML reads that as a string; we convert it).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastat.train.config_keys import (
    SEED_LIMIT,
    ConfigError,
    canonical,
    check_seed,
    coerce,
    flatten,
    label,
    owned_by,
    plain,
)
from fastat.train.loggers import LOGGERS
from fastat.utils.checks import is_number
from fastat.utils.yaml_io import read_bounded
from fastat.utils.yaml_io import safe_load as bounded_load

__all__ = [
    "SEED_LIMIT",
    "ConfigError",
    "check_seed",
    "DataConfig",
    "EMAConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "flatten",
    "label",
    "load_yaml_overrides",
    "plain",
]


@dataclass(frozen=True)
class DataConfig:
    """What to train on (see :func:`fastat.data.build_dataset`)."""

    dataset: str = "subspace"  # a built-in set (data.KNOWN) | cifar10 | a prepared folder | an image folder
    data_root: str = "data"  # torchvision root for cifar10
    image_size: int | None = None  # required for image folders (prepared ones: must match); subspace: H = W
    n: int = 4096  # known distributions: number of training samples
    max_items: int | None = None  # cifar10 / folders: use the first max_items images
    download: bool = True  # cifar10: fetch it when missing
    seed: int = 0  # draws the known samples and the corruption (apart from the run's seed)
    # fraction p of samples given fixed Gaussian noise (an experiment: the paper's 0.9); None (auto): 0.9
    # on the built-in sets, 0 on real images (cifar10, folders: the data as given unless asked)
    corrupt_frac: float | None = None
    corrupt_sigma: float = 0.2  # its std, in data units ([-1, 1] for images; paper: 0.1, 0.2)
    outliers: float = 0.0  # fraction of samples replaced by outliers
    outlier_kind: str = "uniform"  # uniform | gaussian
    flip: bool | None = None  # random horizontal flips (augmentation); None (auto): off, the data as given
    num_workers: int = 0  # stream placement: loader threads; preparing a folder: processes (0: 2 / all cores)
    placement: str = "auto"  # real images: auto | device (uint8 set on the device) | stream (read ahead)
    device_budget_gb: float | None = None  # auto: device if the set fits this (None: 25% of free memory)
    prefetch: int = 4  # stream placement: batches read ahead
    class_cond: bool = False  # class-conditional training on the data's labels (sub-folders, CIFAR-10's, components)
    cache_dir: str | None = None  # prepared copies of image folders (None: $FASTAT_CACHE or ~/.cache/fastat)
    prepare_wait: float = 86400.0  # seconds to wait for another process preparing the same folder (0: fail)


@dataclass(frozen=True)
class ModelConfig:
    """The denoiser (see :func:`fastat.models.build_model`)."""

    name: str = "auto"  # auto | tiny | cifar10 | celeba64 | lsun256 | mlp | diffusers
    # UNetConfig fields (e.g. dropout), MLP arguments, or diffusers' UNet2DModel arguments (``config``: a
    # JSON/YAML file or model folder to read them from)
    kwargs: dict = field(default_factory=dict)
    num_classes: int | None = None  # data.class_cond: classes of the class embedding (None: the data's)


@dataclass(frozen=True)
class ObjectiveConfig:
    """The loss (see :class:`fastat.ATObjective`), its noise schedule and perturbation budget."""

    mode: str = "adv"  # ddpm | rand | adv | pgd | inv | free
    lam: float = 0.3  # weight of the equivariance regulariser
    lam_scale: str = "const"  # const | radius
    lam_s_min: float = 0.0  # regularise only at noise levels s_t >= lam_s_min (0: every t)
    reg_frac: float = 1.0  # the regulariser on the first ceil(reg_frac * B) samples of a batch only
    p_uncond: float = 0.1  # class_cond: share of labels dropped (the unconditional branch of guidance)
    replays: int = 2  # mode free: optimizer steps per batch (m)
    r_min: float = 0.2  # budget r(t) = r_min + r_scale * s_t ** rho, in `space` units
    r_scale: float = 0.3
    rho: float = 1.0
    space: str = "x"  # x | eps: which space the radius is measured in
    norm: str = "linf"  # linf | l2
    pgd_steps: int = 3  # ascent steps for mode pgd
    step_size: float | None = None  # ascent step / radius (default 1.25 for one step, 2.5/k for k)
    attack_target: str = "prediction"  # prediction | equivariance
    detach_clean: bool = False  # detach eps_theta(x_t) inside the equivariance target
    schedule: str = "linear"  # linear | cosine | scaled_linear | squaredcos_cap_v2 (= cosine)
    T: int = 1000  # diffusion steps
    beta_start: float = 1e-4  # linear / scaled_linear: first and last beta
    beta_end: float = 0.02
    prediction: str = "eps"  # what the model outputs: eps | v | x0
    dm_weight: str = "none"  # denoising-term weight: none (MSE of the output) | eps (MSE of the implied eps)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, then a constant or decaying learning rate, and gradient-norm clipping."""

    lr: float = 1e-3  # the quickstart's; DDPM's CIFAR-10 setting is 2e-4 with 5000 warmup steps
    warmup: int = 20  # steps of linear warmup
    schedule: str = "constant"  # constant | cosine | linear: after warmup, decay to final_lr * lr at the end
    final_lr: float = 0.0  # the decay's end, as a fraction of lr (cosine and linear)
    clip: float = 1.0  # max gradient norm (0 disables clipping)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass(frozen=True)
class EMAConfig:
    """Exponential moving average of the weights: decay min(decay, (1 + n) / (10 + n)) with warmup."""

    decay: float = 0.9999
    warmup: bool = True


@dataclass(frozen=True)
class RunConfig:
    """Where, how long, and how often to log, sample and save. The defaults (with the optimiser's) size
    the no-argument quickstart run; real runs set steps, batch size and learning rate (README recipes)."""

    out: str | None = None  # run folder; None: runs/<date>-<time>-<dataset>-<mode>
    steps: int = 1000  # the quickstart: ~3 minutes on a 2-core CPU (see README)
    batch_size: int = 32
    grad_accum: int = 1  # micro-batches per step (gradient accumulation); the step's batch stays batch_size
    seed: int = 0  # model init, dropout, loss noise, batch order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (autocast) | fp16 (+ GradScaler)
    fast: bool | None = None  # compiled step (+ CUDA graph on CUDA); None: on for CUDA, off on the CPU
    log_every: int = 25  # metrics.jsonl / TensorBoard / progress-bar interval (steps)
    save_every: int = 1000  # checkpoint interval (0: only at the end)
    sample_every: int = 1000  # sample-grid interval (0: only at the end)
    keep: int = 3  # checkpoints kept (the last K)
    sample_n: int = 64  # samples in each grid (fixed noise batch)
    sampler: str = "ddim"  # ddim | ddpm
    sample_steps: int = 50  # DDIM steps
    guidance: float = 1.0  # class_cond: classifier-free guidance of the sample grids (1: conditional only)
    sample_eta: float | None = None  # DDIM eta of grids and the final evaluation; None: 1 on the built-in
    # sets (stochastic sampling: samples of a subspace set ~40% nearer its support), 0 on real images
    eval_n: int = 128  # known distributions: samples for the final distance-to-support (0: skip)
    max_skipped: int = 20  # stop (exit 1) after this many consecutive steps skipped as non-finite
    tensorboard: bool = True  # also log to TensorBoard when it is installed
    attack_eff: bool = True  # log attack_eff (attack vs random w: fastat.at.diagnostics) every log_every
    logger: str = "tensorboard"  # tensorboard | wandb | none: scalars, sample grids (besides metrics.jsonl)
    wandb_project: str = "fastat"  # logger wandb: the W&B project (mode: WANDB_MODE, e.g. offline)
    dist_timeout: float = 900.0  # torchrun: seconds a collective waits for the other ranks, then fails


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "objective": ObjectiveConfig,
    "optim": OptimConfig,
    "ema": EMAConfig,
    "run": RunConfig,
}

DEVICES = ("auto", "cpu", "cuda")
SAMPLERS = ("ddim", "ddpm")
LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, in six sections. Immutable: derive changed copies with
    :meth:`with_overrides`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # -- building --------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, *, base: TrainConfig | None = None) -> TrainConfig:
        """``base`` (defaults if None) with the nested mapping ``d`` applied over it."""
        return (base or cls()).with_overrides(flatten(d))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, *, base: TrainConfig | None = None) -> TrainConfig:
        """``base`` (defaults if None) with the YAML file at ``path`` applied over it."""
        return (base or cls()).with_overrides(load_yaml_overrides(path))

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with dotted keys (``"run.steps"``, ``"model.kwargs.dropout"``) set to new values.

        Values are converted to the field's type (strings like ``"1e-4"`` become floats); a key that
        names no field, or a value of the wrong type, raises :class:`ConfigError`.
        """
        sections = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        for key, value in overrides.items():
            parts = key.split(".")
            section = parts[0]
            if section not in SECTIONS:
                raise ConfigError(
                    f"unknown config section {section!r} (in {key!r}); valid: {', '.join(SECTIONS)}"
                )
            if len(parts) < 2:
                raise ConfigError(f"config key {key!r} names a section, not a field; e.g. {section}.<field>")
            fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
            name = parts[1]
            if name not in fields:
                raise ConfigError(
                    f"unknown config key {section}.{name}; valid keys in {section}: {', '.join(fields)}"
                )
            if fields[name].type == "dict":
                if len(parts) == 2:
                    if not isinstance(value, dict):
                        raise ConfigError(f"{key} must be a mapping, got {value!r}")
                    sections[section][name] = dict(value)
                elif len(parts) > 3:  # not a path into a value: model.kwargs.ch_mult.1 is no key
                    raise ConfigError(f"unknown config key {key!r}: set {'.'.join(parts[:3])} whole")
                else:
                    sections[section][name] = {**sections[section][name], parts[2]: value}
                continue
            if len(parts) > 2:
                raise ConfigError(f"unknown config key {key!r}: {section}.{name} has no sub-keys")
            value = coerce(value, fields[name].type, f"{section}.{name}")
            sections[section][name] = canonical(f"{section}.{name}", value)
        return TrainConfig(**{name: SECTIONS[name](**kw) for name, kw in sections.items()})

    # -- checking --------------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Check every value; return ``self`` or raise :class:`ConfigError` with one line."""
        from fastat.data import DATASETS, KNOWN, OUTLIER_KINDS, PLACEMENTS, is_prepared, known_dataset
        from fastat.models import MODEL_NAMES
        from fastat.step.engine import PRECISIONS

        d, m, o, op, e, r = self.data, self.model, self.objective, self.optim, self.ema, self.run
        # data
        _nonempty(d.dataset, "data.dataset")
        if d.corrupt_frac is not None:
            _frac(d.corrupt_frac, "data.corrupt_frac (--corrupt-frac)")
        _nonneg(d.corrupt_sigma, "data.corrupt_sigma (--corrupt-sigma)")
        _frac(d.outliers, "data.outliers")
        if (d.corrupt_frac or 0.0) + d.outliers > 1:
            raise ConfigError(
                f"data.corrupt_frac + data.outliers must be <= 1, got {d.corrupt_frac} + {d.outliers}"
            )
        _one_of(d.outlier_kind, OUTLIER_KINDS, "data.outlier_kind")
        _positive_int(d.n, "data.n")
        if d.image_size is not None:
            _positive_int(d.image_size, "data.image_size (--image-size)")
            if d.dataset in KNOWN and known_dataset(d.dataset).kind == "points":
                raise ConfigError(
                    f"data.image_size (--image-size) is for image datasets; {d.dataset} holds points"
                )
        check_seed(d.seed, "data.seed")
        if d.max_items is not None:
            _positive_int(d.max_items, "data.max_items")
        _nonneg_int(d.num_workers, "data.num_workers")
        _one_of(d.placement, PLACEMENTS, "data.placement (--data-placement)")
        if d.device_budget_gb is not None:
            _nonneg(d.device_budget_gb, "data.device_budget_gb")
        _positive_int(d.prefetch, "data.prefetch")
        _nonneg(d.prepare_wait, "data.prepare_wait")
        if d.dataset not in DATASETS:
            folder = Path(d.dataset).expanduser()
            if not folder.exists():
                names = ", ".join(DATASETS)
                raise ConfigError(
                    f"unknown dataset {d.dataset!r}: not one of {names} and not an existing folder"
                )
            if not folder.is_dir():
                raise ConfigError(f"data.dataset {d.dataset!r} is a file, not a folder of images")
            if d.image_size is None and not is_prepared(folder):
                raise ConfigError(
                    f"data.image_size (--image-size) is required for the image folder {d.dataset!r}"
                )
        # model
        _one_of(m.name, ("auto", *MODEL_NAMES), "model.name (--model)")
        # objective: checked by its owners (ATObjective, Budget, NoiseSchedule), named here by key and flag
        with owned_by("objective", {"kind": "schedule"}):  # NoiseSchedule(kind=...) is objective.schedule
            self.build_objective()
            if o.mode == "ddpm" and (o.r_min or o.r_scale):  # ddpm draws no perturbation: its budget unused
                self.build_budget()
        # optim
        _positive(op.lr, "optim.lr (--lr)")
        _nonneg_int(op.warmup, "optim.warmup")
        _one_of(op.schedule, LR_SCHEDULES, "optim.schedule")
        _frac(op.final_lr, "optim.final_lr")
        _nonneg(op.clip, "optim.clip")
        _nonneg(op.weight_decay, "optim.weight_decay")
        if len(op.betas) != 2 or not all(0 <= b < 1 for b in op.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(op.betas)}")
        _positive(op.eps, "optim.eps")
        # ema
        if not (math.isfinite(e.decay) and 0 <= e.decay < 1):
            raise ConfigError(f"ema.decay must be in [0, 1), got {e.decay}")
        # run
        if r.out is not None:
            _nonempty(r.out, "run.out (--out)")
        _positive_int(r.steps, "run.steps (--steps)")
        _positive_int(r.batch_size, "run.batch_size (--batch-size)")
        if d.dataset in KNOWN and r.batch_size > d.n:
            raise ConfigError(
                f"run.batch_size (--batch-size) {r.batch_size} is larger than the dataset "
                f"({d.n} samples, data.n)"
            )
        _positive_int(r.grad_accum, "run.grad_accum (--grad-accum)")
        check_grad_accum(r.batch_size, r.grad_accum)
        check_seed(r.seed, "run.seed (--seed)")
        if not (r.device in DEVICES or (r.device.startswith("cuda:") and r.device[5:].isdigit())):
            raise ConfigError(f"run.device (--device) must be auto, cpu, cuda or cuda:N, got {r.device!r}")
        _one_of(r.precision, ("auto", *PRECISIONS), "run.precision (--precision)")
        _positive_int(r.log_every, "run.log_every")
        _nonneg_int(r.save_every, "run.save_every (--save-every)")
        _nonneg_int(r.sample_every, "run.sample_every (--sample-every)")
        _positive_int(r.keep, "run.keep")
        _positive_int(r.sample_n, "run.sample_n")
        _one_of(r.sampler, SAMPLERS, "run.sampler")
        _positive_int(r.sample_steps, "run.sample_steps")
        if r.sample_eta is not None and not (is_number(r.sample_eta) and 0 <= r.sample_eta <= 1):
            _fail("run.sample_eta", "a number in [0, 1] (or none: auto)", r.sample_eta)
        if r.sample_steps > o.T:
            raise ConfigError(f"run.sample_steps must be <= objective.T = {o.T}, got {r.sample_steps}")
        _nonneg_int(r.eval_n, "run.eval_n")
        _positive_int(r.max_skipped, "run.max_skipped")
        _positive(r.dist_timeout, "run.dist_timeout")
        _one_of(r.logger, LOGGERS, "run.logger")
        if m.num_classes is not None:
            _positive_int(m.num_classes, "model.num_classes")
        if not (is_number(r.guidance) and r.guidance >= 0):
            _fail("run.guidance", "a number >= 0", r.guidance)
        _nonempty(r.wandb_project, "run.wandb_project")
        return self

    # -- using ---------------------------------------------------------------------------------------
    def build_budget(self):
        """The :class:`fastat.at.budget.Budget` of ``objective.r_min, r_scale, rho, space, norm``."""
        from fastat.at.budget import Budget

        o = self.objective
        return Budget(o.r_min, o.r_scale, o.rho, o.space, o.norm)

    def build_objective(self):
        """The :class:`fastat.ATObjective` this config describes."""
        from fastat.at.budget import Budget
        from fastat.at.objective import ATObjective
        from fastat.at.schedule import NoiseSchedule

        o = self.objective
        budget = self.build_budget() if o.mode != "ddpm" else Budget()  # ddpm: the default, unused
        return ATObjective(
            schedule=NoiseSchedule(o.schedule, T=o.T, beta_start=o.beta_start, beta_end=o.beta_end),
            mode=o.mode,
            lam=o.lam,
            lam_scale=o.lam_scale,
            budget=budget,
            pgd_steps=o.pgd_steps,
            step_size=o.step_size,
            attack_target=o.attack_target,
            detach_clean=o.detach_clean,
            prediction=o.prediction,
            dm_weight=None if o.dm_weight == "none" else o.dm_weight,
            lam_s_min=o.lam_s_min,
            replays=o.replays,
            reg_frac=o.reg_frac,
            p_uncond=o.p_uncond,
        )

    def to_dict(self) -> dict:
        """Plain nested dict (lists, not tuples): what ``config.yaml`` holds."""
        return plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def dump(self, path: str | os.PathLike) -> Path:
        """Write the YAML atomically to ``path``."""
        from fastat.train.checkpoint import atomic_write_text

        return atomic_write_text(path, self.to_yaml())


# -- helpers -----------------------------------------------------------------------------------------


def check_grad_accum(batch_size: int, grad_accum: int, world_size: int = 1) -> None:
    """Each rank's share of the batch must split into ``grad_accum`` equal micro-batches (ConfigError)."""
    share = batch_size // world_size
    if share % grad_accum:
        per = f" ({share} per rank of {world_size})" if world_size > 1 else ""
        raise ConfigError(f"run.batch_size (--batch-size) {batch_size}{per} must be divisible by "
                          f"run.grad_accum (--grad-accum) {grad_accum}")  # fmt: skip


def load_yaml_overrides(path: str | os.PathLike) -> dict[str, Any]:
    """The dotted overrides held by the YAML file at ``path`` (ConfigError if unreadable or malformed)."""
    p = Path(path).expanduser()
    try:
        text = read_bounded(p)  # bounded: /dev/zero or a huge file is an OSError at once
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    try:
        d = bounded_load(text)  # no aliases (alias bombs), no duplicate keys or sections
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"bad YAML in {p}{where}: {problem}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(
            f"config file {p} must hold a mapping of sections ({', '.join(SECTIONS)}), got {type(d).__name__}"
        )
    for section, value in d.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {p}; valid: {', '.join(SECTIONS)}")
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"section {section!r} in {p} must be a mapping of keys, got {value!r}")
    return flatten({k: v for k, v in d.items() if v is not None})


def _fail(key: str, what: str, value: Any) -> None:
    raise ConfigError(f"{label(key)} must be {what}, got {value!r}")


def _nonneg(x, key):
    if not (is_number(x) and x >= 0):
        _fail(key, "a finite number >= 0", x)


def _positive(x, key):
    if not (is_number(x) and x > 0):
        _fail(key, "a finite number > 0", x)


def _frac(x, key):
    if not (is_number(x) and 0 <= x <= 1):
        _fail(key, "a fraction in [0, 1]", x)


def _positive_int(x, key):
    if not (isinstance(x, int) and not isinstance(x, bool) and x >= 1):
        _fail(key, "an integer >= 1", x)


def _nonneg_int(x, key):
    if not (isinstance(x, int) and not isinstance(x, bool) and x >= 0):
        _fail(key, "an integer >= 0", x)


def _one_of(x, choices, key):
    if x not in choices:
        raise ConfigError(f"unknown {label(key)} {x!r}; choose one of {', '.join(choices)}")


def _nonempty(x, key):
    if not (isinstance(x, str) and x.strip()):
        _fail(key, "a non-empty string", x)
