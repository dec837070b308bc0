"""Handing a trained run to another codebase: ``fastat export --run R --format diffusers OUT``.

    export_run("runs/exp", "out/exp-diffusers")        # EMA weights by default (ema=False: raw weights)
    pipe = DDPMPipeline.from_pretrained("out/exp-diffusers")
    unet = UNet2DModel.from_pretrained("out/exp-diffusers", subfolder="unet")

The diffusers format is a ``DDPMPipeline`` folder: ``model_index.json``, ``unet/`` (``config.json`` and
``diffusion_pytorch_model.safetensors``) and ``scheduler/scheduler_config.json``, a ``DDPMScheduler``
with the run's schedule (by name where diffusers has it, else its exact ``trained_betas``), its prediction
type (``epsilon``, ``v_prediction``, ``sample``) and the run's clamp of the predicted x0. Every image run
exports: a ``--model diffusers`` run's UNet2DModel as is, fastat's own UNet (``tiny``, ``cifar10``, ...)
as the ``UNet2DModel`` of the same network (:mod:`fastat.models.unet_diffusers`: config and weights, the
same outputs to float rounding). Points models (``mlp``) have no diffusers counterpart.

The folder is written next to ``OUT`` under a temporary name and renamed into place: an interrupted
export leaves no half-written ``OUT`` (and the next export removes a killed one's temporary folder). An
existing, non-empty ``OUT`` is refused unless ``overwrite``. A failed write (a full disk) is one line.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from fastat.at.schedule import NoiseSchedule
from fastat.models.unet import UNet
from fastat.models.unet_diffusers import diffusers_config, diffusers_state_dict
from fastat.train.config import ConfigError

__all__ = ["DIFFUSERS_PREDICTION", "FORMATS", "ExportError", "diffusers_scheduler_config", "export_run"]

FORMATS = ("diffusers",)
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_DIFFUSERS_SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
    "squaredcos_cap_v2": "squaredcos_cap_v2",
}


class ExportError(ConfigError):
    """The run cannot be exported in the requested format (one line saying why)."""


def diffusers_scheduler_config(
    schedule: NoiseSchedule, prediction: str = "eps", clip_x0: float | None = 1.0
) -> dict:
    """``DDPMScheduler`` arguments that reproduce ``schedule`` (``alphas_cumprod`` equal to float32
    rounding), the prediction type and the x0 clamp used when sampling."""
    cfg: dict = {
        "num_train_timesteps": schedule.T,
        "prediction_type": DIFFUSERS_PREDICTION[prediction],
        "clip_sample": clip_x0 is not None,
        "clip_sample_range": float(clip_x0) if clip_x0 is not None else 1.0,
        "variance_type": "fixed_small",  # beta_tilde: fastat's DDPM sampler
    }
    name = _DIFFUSERS_SCHEDULES.get(schedule.kind)
    if name is None:
        cfg["trained_betas"] = schedule.betas.tolist()
    else:
        cfg["beta_schedule"] = name
        if name != "squaredcos_cap_v2":
            cfg.update(beta_start=schedule.beta_start, beta_end=schedule.beta_end)
    return cfg


def export_run(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "diffusers",
    ema: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the newest checkpoint of ``run`` (a run or checkpoint folder) to ``out`` in ``format``;
    returns ``out``. ConfigError (ExportError) on a run or destination that does not fit."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    from fastat.eval.evaluate import load_run
    from fastat.models.diffusers_unet import require_diffusers

    diffusers = require_diffusers("fastat export --format diffusers")
    dest = Path(out).expanduser()
    if dest.exists() and not (dest.is_dir() and (overwrite or not any(dest.iterdir()))):
        raise ExportError(f"{dest} already exists and is not empty; choose another OUT or pass --overwrite")
    model, cfg, ckpt = load_run(run, ema=ema, eps_model=False)
    if cfg.model.name == "diffusers":
        unet = model.unet
    elif isinstance(model, UNet):
        unet = diffusers.UNet2DModel(**diffusers_config(model.config))
        unet.load_state_dict(diffusers_state_dict(model), strict=True)
    else:
        raise ExportError(
            f"run {ckpt.run_dir} trained model {cfg.model.name!r}, a network for points; --format diffusers "
            f"holds image UNets (a run on an image dataset)"
        )
    clip_x0 = ckpt.state.get("data", {}).get("clip_x0", 1.0)  # what fastat's own sampling clamps to
    sched_cfg = diffusers_scheduler_config(cfg.build_objective().schedule, cfg.objective.prediction, clip_x0)
    scheduler = diffusers.DDPMScheduler(**sched_cfg)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    return _write_folder(dest, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


def _write_folder(dest: Path, write) -> Path:
    """``write(tmp)`` into a temporary folder beside ``dest``, then rename it to ``dest`` (replacing an
    old one only after the new one is complete)."""
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {parent}: {e.strerror or e}") from None
    tmp = parent / f".tmp-{dest.name}-{os.getpid()}"
    _remove_leftovers(parent, dest.name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if dest.exists():
            trash = parent / f".trash-{dest.name}-{os.getpid()}"
            os.replace(dest, trash)
            try:
                os.replace(tmp, dest)
            except OSError:
                os.replace(trash, dest)  # the old folder back where it was
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own error for a full disk
        raise ExportError(f"cannot write {dest}: {_why(e)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _why(e: BaseException) -> str:
    """The cause of a failed write in a few words: ``SafetensorError`` wraps the OS error in a long
    Rust debug string (``IoError(Os { code: 28, ... })``)."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    m = re.search(r"\bcode: (\d+)", str(e))
    if m:
        return os.strerror(int(m.group(1)))
    from fastat.utils.errors import one_line

    return f"{type(e).__name__}: {one_line(e, first_only=True)[:200]}"


def _remove_leftovers(parent: Path, name: str) -> None:
    """The temporary and trash folders of exports to ``name`` whose process has ended (killed)."""
    from fastat.train.checkpoint import process_ended

    for kind in (".tmp-", ".trash-"):
        for p in parent.glob(f"{kind}{name}-*"):
            pid = p.name[len(kind) + len(name) + 1 :]
            if pid.isdigit() and process_ended(int(pid)) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
