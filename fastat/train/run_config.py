"""A run's configuration resolved: the layered config (file, flags, a resumed run's saved config), the
model fitted to the data, the device and precision, the default run folder.

    cfg, ckpt = resolve_config(overrides, resume="auto")   # layering, resume, model "auto", run folder
    device = resolve_device(cfg.run.device)                # auto -> cuda if available
    spec = model_spec(cfg)                                  # {"name", "kwargs"} for build_model

Nothing here loads data or builds a model: :func:`data_shape` reads a prepared set's manifest at most.
"""

from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path

import torch
import yaml

from fastat.data import DATASETS, IMAGE_SETS, KNOWN, is_prepared, read_manifest
from fastat.train.checkpoint import (
    CheckpointError,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    run_dir_of,
)
from fastat.train.config import ConfigError, TrainConfig, plain
from fastat.train.distributed import DistContext
from fastat.train.run_folder import CONFIG_FILE
from fastat.utils.errors import listing, one_line

__all__ = [
    "check_data_memory",
    "data_shape",
    "default_corrupt_frac",
    "default_run_name",
    "diffusers_kwargs",
    "finalize",
    "model_spec",
    "read_saved_config",
    "resolve_config",
    "resolve_device",
    "resolve_precision",
    "resolved_defaults",
    "run_eta",
    "upgrade_saved",
]


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
    if d.dataset in IMAGE_SETS and d.image_size:  # its shape without drawing its basis (C*H*W x k)
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
        if cfg.data.class_cond:  # UNet2DModel's class embedding, the last one the null label
            kwargs["num_class_embeds"] = (cfg.model.num_classes or data_classes(cfg)) + 1
        return plain({"name": name, "kwargs": diffusers_kwargs(cfg, kind, shape, kwargs)})
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
    if cfg.data.class_cond:
        kwargs["num_classes"] = cfg.model.num_classes or data_classes(cfg)
    return plain({"name": name, "kwargs": kwargs})


CLASS_HINT = ("the built-in gmm2d, subspaces and scales have (their components), cifar10 and image folders "
              "whose images lie in class sub-folders (DIR/cat/*.png, DIR/dog/*.png)")


def unlabelled_message(where) -> str:
    """``--class-cond`` on a prepared set written by a fastat that kept no labels."""
    return (f"data.class_cond (--class-cond): {where} was prepared by a fastat that kept no class labels; "
            f"prepare its source again into a new folder")  # fmt: skip


def loose_message(count: int, dataset: str, names) -> str:
    """``--class-cond`` on an image folder with ``count`` images outside its class sub-folders ``names``."""
    return (f"data.class_cond (--class-cond): {count} image(s) of {dataset} lie directly in the folder, in no "
            f"class sub-folder; move them into one (the classes are {listing(names, 20)})")  # fmt: skip


def data_classes(cfg: TrainConfig) -> int:
    """The number of classes of the configured dataset's labels: a known set's components, CIFAR-10's
    ten, an image folder's first-level sub-folders (a prepared folder's from its manifest). An image
    folder with images outside any class sub-folder is an error here, before it is prepared."""
    d = cfg.data
    classes = 0
    if d.dataset in KNOWN:
        from fastat.data import known_dataset

        classes = known_dataset(d.dataset).num_classes
    elif d.dataset == "cifar10":
        classes = 10
    elif is_prepared(d.dataset):
        names = read_manifest(d.dataset).get("classes")
        if names is None:
            raise ConfigError(unlabelled_message(d.dataset))
        classes = len(names)
    elif Path(d.dataset).expanduser().is_dir():
        names, loose = _folder_classes(str(Path(d.dataset).expanduser().resolve()))
        if names and loose:
            raise ConfigError(loose_message(loose, d.dataset, names))
        classes = len(names)
    if not classes:
        raise ConfigError(f"data.class_cond (--class-cond): dataset {d.dataset!r} has no class labels ({CLASS_HINT})")
    return classes


@functools.lru_cache(maxsize=4)
def _folder_classes(root: str) -> tuple[list[str], int]:
    """``(class names, images outside them)`` of an image folder: listed once per process (the model's
    spec is resolved more than once at start-up)."""
    from fastat.data.preparation import folder_labels, list_images

    names, labels = folder_labels(Path(root), list_images(Path(root)))
    return names, int((labels < 0).sum())


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


def default_corrupt_frac(dataset: str) -> float:
    """``data.corrupt_frac`` auto: the paper's 90% noisy copies on the built-in known sets (an experiment
    with a known clean support), none on real images (cifar10, folders, prepared sets: used as given)."""
    return 0.9 if dataset in KNOWN else 0.0


def resolved_defaults(cfg: TrainConfig) -> dict:
    """Overrides that fill in the config's ``auto`` / ``None`` values that the config alone decides:
    ``data.corrupt_frac`` (:func:`default_corrupt_frac`), ``data.flip`` (off), ``run.device`` (``auto``:
    this machine's ``cuda`` or ``cpu``), ``run.precision`` and ``run.fast`` (for that device)."""
    d, r = cfg.data, cfg.run
    over: dict = {}
    if d.corrupt_frac is None:
        over["data.corrupt_frac"] = default_corrupt_frac(d.dataset)
    if d.flip is None:
        over["data.flip"] = False
    if r.device == "auto":
        over["run.device"] = resolve_device("auto").type
    device = torch.device(over.get("run.device", r.device))
    if r.precision == "auto":
        over["run.precision"] = resolve_precision("auto", device)
    if r.fast is None:
        over["run.fast"] = device.type == "cuda"
    return over


def upgrade_saved(saved: dict) -> dict:
    """A saved config with what its ``None`` meant when it was written: ``data.flip`` None was "on for
    real images" before flips became opt-in (a resumed run keeps its augmentation)."""
    data = saved.get("data")
    if isinstance(data, dict) and "flip" in data and data["flip"] is None:
        saved = {**saved, "data": {**data, "flip": str(data.get("dataset", "subspace")) not in KNOWN}}
    return saved


def finalize(cfg: TrainConfig) -> TrainConfig:
    """Resolve what depends on the data, the machine or the clock: the model (``auto``, data-derived
    arguments), the data's corruption and flips, the device, precision and fast path
    (:func:`resolved_defaults`), the sampler's ``eta`` (auto: 1 on the built-in sets, 0 on real images)
    and the run folder (``runs/<date>-<time>-<dataset>-<mode>``): ``config.yaml`` holds the values used.
    Validates first."""
    cfg.validate()
    check_data_memory(cfg)
    spec = model_spec(cfg)
    over: dict = {"model.name": spec["name"], "model.kwargs": spec["kwargs"], **resolved_defaults(cfg)}
    if cfg.run.sample_eta is None:
        over["run.sample_eta"] = run_eta(cfg)
    if cfg.run.out is None:
        over["run.out"] = str(Path("runs") / default_run_name(cfg))
    return cfg.with_overrides(over).validate()


def run_eta(cfg: TrainConfig) -> float:
    """The DDIM eta of a run's grids and evaluation: ``run.sample_eta`` (resolved by :func:`finalize`;
    the same auto rule for configs that predate the key)."""
    eta = cfg.run.sample_eta
    return eta if eta is not None else (1.0 if cfg.data.dataset in KNOWN else 0.0)


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
        saved = upgrade_saved(read_saved_config(ckpt))
        try:
            base = TrainConfig.from_dict(saved)
        except ConfigError as e:
            raise CheckpointError(f"the config saved in {ckpt} does not load: {e}") from None
        cfg = base.with_overrides({"run.out": str(run_dir_of(ckpt)), **overrides})
        check_same_meaning(base, cfg, ckpt)
    return finalize(cfg), ckpt


# What the trained model's output means: a resume may not change them (the weights would be read as
# another quantity, at other noise levels).
MEANING = ("prediction", "T", "schedule", "beta_start", "beta_end")


def check_same_meaning(saved: TrainConfig, cfg: TrainConfig, ckpt: Path) -> None:
    """ConfigError when ``cfg`` resumes ``ckpt`` (trained as ``saved``) with another prediction target or
    noise schedule."""
    a, b = saved.objective, cfg.objective
    cosine = {"cosine", "squaredcos_cap_v2"}
    keys = [k for k in MEANING if getattr(a, k) != getattr(b, k)
            and not (k == "schedule" and {a.schedule, b.schedule} <= cosine)
            and not (k.startswith("beta_") and a.schedule in cosine and b.schedule in cosine)]  # fmt: skip
    if keys:
        new = ", ".join(f"objective.{k} = {getattr(b, k)}" for k in keys)
        old = ", ".join(str(getattr(a, k)) for k in keys)
        raise ConfigError(
            f"cannot resume {ckpt} with {new}: its model was trained with {old}, and its weights mean "
            f"that; start a new run (without --resume) to train with them"
        )


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
    need = 2 * 4 * count * dim + (8 * dim * 3 * _subspace_default("k") if d.dataset in IMAGE_SETS else 0)
    if need > total:
        raise ConfigError(
            f"the dataset needs {need / 2**30:.1f} GiB of memory ({count} samples of shape {list(shape)}, "
            f"float32, with its clean copy), more than this machine's {total / 2**30:.1f} GiB: "
            f"lower --image-size or data.n / data.max_items"
        )
