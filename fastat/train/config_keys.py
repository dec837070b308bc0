"""Config keys as people write them: the command-line flag of a key, values from YAML and flags converted
to the field's type, an owner's errors said with the key, and the one-line :class:`ConfigError`.

    label("objective.lam")               # "objective.lam (--lam)": how messages name a key
    coerce("1e-4", "float", "optim.lr")  # 0.0001 (PyYAML reads 1e-4 as a string)
    with owned_by("objective", {}):      # ATObjective's SettingError -> ConfigError naming the key
        cfg.build_objective()
    plain({"betas": (0.9, 0.999)})       # {"betas": [0.9, 0.999]}: what YAML and JSON give back
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from fastat.utils.checks import SettingError

__all__ = [
    "FLAGS",
    "SEED_LIMIT",
    "ConfigError",
    "canonical",
    "check_seed",
    "coerce",
    "flatten",
    "label",
    "owned_by",
    "plain",
]

SEED_LIMIT = 2**53  # seeds stay exact in YAML/JSON numbers and in the seeds derived from them


class ConfigError(ValueError):
    """A configuration value, key or file is wrong. The message is one line that says which and why."""


# `fastat train` flag (argparse dest) -> (config key, type, help): the flags that override the YAML file
FLAGS = {
    "dataset": (
        "data.dataset",
        str,
        "dataset: gmm2d | plane3d | subspace | subspaces | scales | cifar10 | prepared folder | image folder",
    ),
    "data_placement": (
        "data.placement",
        str,
        "real images: auto | device (uint8 set on the device) | stream (read ahead from disk)",
    ),
    "data_root": ("data.data_root", str, "torchvision root for cifar10 (default: data)"),
    "image_size": ("data.image_size", int, "image size (required for folders; resizes others)"),
    "corrupt_frac": (
        "data.corrupt_frac", float,
        "fraction of training samples made noisy (default: 0.9 on the built-in sets, 0 on real images)",
    ),
    "corrupt_sigma": ("data.corrupt_sigma", float, "std of that noise in data units (default 0.2)"),
    "model": ("model.name", str, "auto | tiny | cifar10 | celeba64 | lsun256 | mlp | diffusers"),
    "mode": ("objective.mode", str, "ddpm | rand | adv | pgd | inv | free (default adv)"),
    "lam": ("objective.lam", float, "weight of the equivariance regulariser (default 0.3)"),
    "replays": ("objective.replays", int, "mode free: optimizer steps per batch (default 2)"),
    "reg_frac": ("objective.reg_frac", float, "regularise only this share of each batch (default 1)"),
    "p_uncond": ("objective.p_uncond", float, "--class-cond: share of labels dropped (default 0.1)"),
    "steps": ("run.steps", int, "total training steps"),
    "batch_size": ("run.batch_size", int, "batch size"),
    "grad_accum": ("run.grad_accum", int, "micro-batches per step (gradient accumulation; default 1)"),
    "lr": ("optim.lr", float, "AdamW learning rate"),
    "out": ("run.out", str, "run folder (default runs/<date>-<time>-<dataset>-<mode>)"),
    "seed": ("run.seed", int, "seed of the run (init, dropout, loss noise, batch order)"),
    "device": ("run.device", str, "auto | cpu | cuda | cuda:N"),
    "precision": ("run.precision", str, "auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp32 on CPU)"),
    "save_every": ("run.save_every", int, "checkpoint every N steps (0: only at the end)"),
    "sample_every": ("run.sample_every", int, "sample grid every N steps (0: only at the end)"),
    "log_every": ("run.log_every", int, "metrics every N steps"),
    "keep": ("run.keep", int, "keep the last K checkpoints"),
}
_FLAG_OF = {key: "--" + dest.replace("_", "-") for dest, (key, _, _) in FLAGS.items()}


def label(key: str) -> str:
    """How a message names the config key ``key``: with its flag when it has one."""
    flag = _FLAG_OF.get(key)
    return f"{key} ({flag})" if flag else key


@contextlib.contextmanager
def owned_by(section: str, renames: dict[str, str]):
    """Checks made by the component that owns a section's settings (e.g. ``build_objective()``): its
    :class:`SettingError` said with the config key and flag (its argument name mapped through ``renames``
    where the two differ), any other ValueError or TypeError with the section, as a ConfigError."""
    try:
        yield
    except SettingError as err:
        key = f"{section}.{renames.get(err.setting, err.setting)}"
        raise ConfigError(err.message(label(key))) from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{section}: {err}") from None


def canonical(key: str, value: Any) -> Any:
    """The canonical spelling of a value that its owner accepts under several names (``objective.prediction``:
    ``v_prediction`` -> ``v``); a value the owner refuses is left as it is (validate says why)."""
    if key == "objective.prediction" and isinstance(value, str):
        from fastat.at.prediction import canonical_prediction  # torch: imported when the key is set

        with contextlib.suppress(ValueError):
            return canonical_prediction(value)
    return value


def check_seed(x: Any, key: str) -> int:
    """A seed: an integer in ``[0, SEED_LIMIT)``; ConfigError naming ``key`` otherwise."""
    if not (isinstance(x, int) and not isinstance(x, bool) and 0 <= x < SEED_LIMIT):
        raise ConfigError(f"{key} must be an integer in [0, 2**53), got {x!r}")
    return x


def flatten(d: dict) -> dict[str, Any]:
    """``{"run": {"steps": 5}}`` -> ``{"run.steps": 5}`` (one level: sections, then their keys)."""
    out: dict[str, Any] = {}
    for section, value in d.items():
        if isinstance(value, dict):
            out.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            out[str(section)] = value
    return out


def plain(x):
    """Tuples -> lists, recursively: what YAML and JSON give back (so saved and new values compare equal)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def coerce(value: Any, typ: str, key: str) -> Any:
    """Convert ``value`` to the annotated type ``typ`` (a string, e.g. ``"float | None"``)."""
    optional = typ.endswith("| None")
    base = typ.replace("| None", "").strip()
    if value is None or (
        optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "~")
    ):
        if optional:
            return None
        raise ConfigError(f"{key} must not be empty (expected {base})")
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if base == "int":
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = math.nan
            if math.isfinite(f) and f.is_integer():
                return int(f)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if base == "float":
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if base == "str":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if base.startswith("tuple[float"):
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list of numbers, got {value!r}")
        return tuple(coerce(v, "float", key) for v in value)
    raise AssertionError(f"no conversion for type {typ} of {key}")  # pragma: no cover
