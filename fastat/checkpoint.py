"""Safe, resumable checkpoints: atomic writes, the last K kept, loading that never unpickles objects.

A run folder holds its checkpoints as one folder per step, plus a pointer to the newest::

    RUN/checkpoints/ckpt-002000/model.safetensors   # model weights
                                ema.safetensors     # EMA weights (what sampling uses)
                                state.pt            # optimizer, step, RNG states, data position, config
    RUN/checkpoints/latest                          # "ckpt-002000"

A checkpoint is written into a hidden temporary folder next to its final place, flushed to disk, then
renamed into place (one atomic ``os.replace``); only then is ``latest`` rewritten (temp file + rename)
and the oldest folders beyond ``keep`` deleted. A crash at any moment leaves either the old or the new
checkpoint complete, never a partial one under a ``ckpt-*`` name.

``state.pt`` holds only tensors and plain Python values (dicts, lists, numbers, strings) and is read
with ``torch.load(weights_only=True)``; the weights are safetensors. Nothing is unpickled.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "atomic_write",
    "atomic_write_text",
    "find_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
]

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_FILE, EMA_FILE, STATE_FILE = "model.safetensors", "ema.safetensors", "state.pt"
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the run that wants to load it."""


# -- atomic files ------------------------------------------------------------------------------------


def _fsync_path(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not support fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path in ``path``'s folder, then rename it to ``path``.

    Readers see the old file or the complete new one; on any error the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent, directory=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


# -- writing -----------------------------------------------------------------------------------------


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    ema: nn.Module,
    state: dict,
    keep: int = 3,
    metadata: dict[str, str] | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Write ``root/ckpt-{step:06d}/`` atomically, point ``root/latest`` at it, keep the newest ``keep``.

    ``state`` must hold only tensors and plain values (it is checked by loading it back with
    ``weights_only=True`` semantics at resume time). ``metadata`` (strings) goes into both safetensors
    headers; ``files`` (name -> text) are written beside the weights (e.g. ``config.yaml``). Returns the
    checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:06d}"
    final, tmp = root / name, root / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    meta = {"format": "pt", "step": str(step), **(metadata or {})}
    try:
        tmp.mkdir()
        save_file(_tensors(model), tmp / MODEL_FILE, metadata=meta)
        save_file(_tensors(ema), tmp / EMA_FILE, metadata=meta)
        torch.save(state, tmp / STATE_FILE)
        for fname, text in (files or {}).items():
            (tmp / fname).write_text(text)
        for f in (MODEL_FILE, EMA_FILE, STATE_FILE, *(files or {})):
            _fsync_path(tmp / f)
        _fsync_path(tmp, directory=True)
        if final.exists():  # re-saving a step (e.g. interrupted right after a periodic save)
            old = root / f"{_TMP_PREFIX}old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_path(root, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, name + "\n")
    prune_checkpoints(root, keep)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (never the one ``latest`` names) and leftover
    temporary folders of crashed writers. Returns what was deleted."""
    root = Path(root)
    ckpts = list_checkpoints(root)
    latest = _read_latest(root)
    doomed = [p for p in ckpts[: max(len(ckpts) - max(keep, 1), 0)] if p.name != latest]
    doomed += [p for p in root.iterdir() if p.name.startswith(_TMP_PREFIX) and p.is_dir()]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# -- finding and reading -----------------------------------------------------------------------------


def _read_latest(root: Path) -> str | None:
    try:
        name = (root / LATEST).read_text().strip()
    except OSError:
        return None
    return name if _CKPT_RE.match(name) else None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder (``latest``, else the highest step), or None."""
    root = checkpoint_root(run_dir)
    name = _read_latest(root)
    if name is not None and (root / name / STATE_FILE).is_file():
        return root / name
    ckpts = [p for p in list_checkpoints(root) if (p / STATE_FILE).is_file()]
    return ckpts[-1] if ckpts else None


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a run folder, its ``checkpoints`` folder, or a checkpoint folder itself."""
    p = Path(path).expanduser()
    if (p / STATE_FILE).is_file():
        return p
    if p.name == CHECKPOINTS:
        p = p.parent
    found = latest_checkpoint(p)
    if found is None:
        what = "does not exist" if not p.exists() else "holds no checkpoint"
        raise CheckpointError(
            f"{p} {what} (expected a run folder with {CHECKPOINTS}/ckpt-*/ or a ckpt-* folder)"
        )
    return found


@dataclass
class Checkpoint:
    """A loaded checkpoint: the two weight sets (CPU tensors) and the training state."""

    path: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def run_dir(self) -> Path:
        """The run folder the checkpoint belongs to."""
        return self.path.parent.parent if self.path.parent.name == CHECKPOINTS else self.path.parent


def load_checkpoint(path: str | os.PathLike, *, weights: bool = True) -> Checkpoint:
    """Read a checkpoint (see :func:`find_checkpoint` for ``path``). ``weights=False`` skips the model
    weights (the EMA weights and state are always read)."""
    ckpt = find_checkpoint(path)
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        model = load_file(ckpt / MODEL_FILE) if weights else {}
        ema = load_file(ckpt / EMA_FILE)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"cannot read checkpoint {ckpt}: {STATE_FILE} holds objects other than tensors and plain values "
            f"(refused to unpickle them)"
        ) from None
    except (OSError, RuntimeError, SafetensorError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {ckpt}: {first}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{ckpt / STATE_FILE} is not a fastat training state")
    return Checkpoint(ckpt, model, ema, state)


def load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``tensors`` into ``module``; a different set of names or shapes raises CheckpointError."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    shapes = [k for k in own if k in tensors and tuple(own[k].shape) != tuple(tensors[k].shape)]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        if shapes:
            k = shapes[0]
            got, want = tuple(tensors[k].shape), tuple(own[k].shape)
            parts.append(f"{len(shapes)} of another shape (e.g. {k}: {got} vs {want})")
        raise CheckpointError(f"the weights in {source} do not fit this model: {'; '.join(parts)}")
    module.load_state_dict(tensors, strict=True)
