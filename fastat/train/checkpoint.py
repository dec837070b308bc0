"""Safe, resumable checkpoints: atomic writes, the last K kept, loading that never unpickles objects.

    RUN/checkpoints/ckpt-002000/{model,ema}.safetensors, state.pt    # weights; optimizer, step, RNG, ...
    RUN/checkpoints/latest                                           # "ckpt-002000"

A checkpoint is written into a hidden temporary folder, flushed, then renamed into place (one atomic
``os.replace``); only then is ``latest`` rewritten and the oldest beyond ``keep`` pruned, so a crash
leaves the old or the new checkpoint complete. Readers take the highest complete checkpoint, not what
``latest`` says, and no save replaces a checkpoint of a higher step. Files are written from bytes with plain ``write`` calls
(an ``OSError`` names the file). ``state.pt`` holds tensors and plain values only, read with
``torch.load(weights_only=True)``. Details: docs/DESIGN.md ("Checkpoints and the loop").
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from fastat.utils.errors import one_line

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "NonFiniteWeights",
    "atomic_write",
    "atomic_write_text",
    "find_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_weights",
    "process_ended",
    "prune_checkpoints",
    "read_step",
    "require_finite",
    "run_dir_of",
    "save_checkpoint",
]

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_FILE, EMA_FILE, STATE_FILE = "model.safetensors", "ema.safetensors", "state.pt"
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")
_TMP_PREFIX, _TRASH_PREFIX = ".tmp-", ".trash-"
_OWNER_RE = re.compile(r"-(\d+)(?:@([^/]*))?$")  # "<name>-<pid>@<host>": who wrote a temporary name


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the run that wants to load it."""


class NonFiniteWeights(CheckpointError):
    """Weights hold NaN or inf: refused when writing a checkpoint and when loading one to use it."""


def require_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteWeights` naming ``what`` if any floating tensor holds NaN or inf."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteWeights(
            f"{what} are not finite (NaN or inf in {len(bad)} of {len(tensors)} tensors, e.g. {bad[0]})"
        )


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

    Readers see the old file or the complete new one; on any error the temporary file is removed, and
    an ``OSError`` that names no file (a full disk in ``write``) is raised naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{_owner()}")
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename and str(e.filename) != str(tmp):
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent, directory=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: write_bytes(p, text.encode()))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk; any failure is an ``OSError`` naming ``path``
    (a failed ``write`` alone would not say which file the full disk hit)."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def _owner() -> str:
    """``<pid>@<host>``: the suffix of this process's temporary names (see :func:`_owner_gone`)."""
    return f"{os.getpid()}@{socket.gethostname()}"


def _owner_gone(name: str) -> bool:
    """Whether the process that named a temporary folder ``...-<pid>@<host>`` has ended."""
    m = _OWNER_RE.search(name)
    return m is not None and process_ended(int(m.group(1)), m.group(2))


def process_ended(pid: int, host: str | None = None) -> bool:
    """Whether process ``pid`` on ``host`` (None: this host) has ended. A process on another host cannot
    be checked and counts as running; so does this process."""
    if host not in (None, socket.gethostname()) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. EPERM: it exists
        return False
    return False


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
    Non-finite weights are refused (:class:`NonFiniteWeights`) before anything is written, so every
    checkpoint on disk is finite and pruning (which keeps the newest) never removes the newest finite one.

    ``state`` must hold only tensors and plain values (it is checked by loading it back with
    ``weights_only=True`` semantics at resume time). ``metadata`` (strings) goes into both safetensors
    headers; ``files`` (name -> text) are written beside the weights (e.g. ``config.yaml``). Returns the
    checkpoint folder.
    """
    root = Path(root)
    name = f"ckpt-{step:06d}"
    final, tmp = root / name, root / f"{_TMP_PREFIX}{name}-{_owner()}"
    newer = [p for p in list_checkpoints(root) if _step_of(p) > step and _complete(p)]
    if newer:
        raise CheckpointError(
            f"{root} holds {newer[-1].name}, newer than step {step}: saving would leave it as the newest "
            f"checkpoint of another history; resume it, or branch with --out NEW_FOLDER"
        )
    weights = {MODEL_FILE: _tensors(model), EMA_FILE: _tensors(ema)}
    for fname, tensors in weights.items():
        require_finite(tensors, f"the {'EMA ' if fname == EMA_FILE else ''}weights to save as {final}")
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    meta = {"format": "pt", "step": str(step), **(metadata or {})}
    try:
        tmp.mkdir()
        for fname, tensors in weights.items():
            write_bytes(tmp / fname, safetensors_bytes(tensors, metadata=meta))
        del weights
        buf = io.BytesIO()
        torch.save(state, buf)
        write_bytes(tmp / STATE_FILE, buf.getbuffer())
        del buf
        for fname, text in (files or {}).items():
            write_bytes(tmp / fname, text.encode())
        _fsync_path(tmp, directory=True)
        if final.exists():  # re-saving a step (e.g. interrupted right after a periodic save)
            _trash(final)
        os.replace(tmp, final)
        _fsync_path(root, directory=True)
    except OSError as e:  # name the file by its final place, not the temporary folder
        shutil.rmtree(tmp, ignore_errors=True)
        where = final / Path(e.filename).name if e.filename and tmp.name in str(e.filename) else e.filename
        raise OSError(e.errno, e.strerror or str(e), str(where) if where else None) from None
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
    """Delete all but the newest ``keep`` checkpoints (never the one ``latest`` names), leftover trash,
    and the temporary folders of writers that have ended (never one another process is still writing).
    Each checkpoint is renamed to a trash name before it is deleted, so a crash half-way through leaves
    no partial folder under a ``ckpt-*`` name. Returns the checkpoints deleted."""
    root = Path(root)
    ckpts = list_checkpoints(root)
    latest = _read_latest(root)
    doomed = [p for p in ckpts[: max(len(ckpts) - max(keep, 1), 0)] if p.name != latest]
    for p in doomed:
        _trash(p)
    for p in root.iterdir():
        mine = p.name.endswith(f"-{_owner()}")
        if (p.name.startswith(_TRASH_PREFIX) and (mine or _owner_gone(p.name))) or (
            p.name.startswith(_TMP_PREFIX) and _owner_gone(p.name)
        ):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    return doomed


def _trash(path: Path) -> None:
    """Delete a folder by first renaming it (atomic) to a name no reader looks at."""
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}-{_owner()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# -- finding and reading -----------------------------------------------------------------------------


def _read_latest(root: Path) -> str | None:
    try:
        name = (root / LATEST).read_text().strip()
    except OSError:
        return None
    return name if _CKPT_RE.match(name) else None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder (the highest step whose three files are there),
    or None. ``latest`` is not trusted over the folders: a save killed after renaming its checkpoint
    into place and before updating ``latest`` leaves it naming the one before."""
    ckpts = [p for p in list_checkpoints(checkpoint_root(run_dir)) if _complete(p)]
    return ckpts[-1] if ckpts else None


def _complete(ckpt: Path) -> bool:
    return all((ckpt / f).is_file() for f in (STATE_FILE, MODEL_FILE, EMA_FILE))


def _step_of(ckpt: Path) -> int:
    return int(_CKPT_RE.match(ckpt.name).group(1))


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


def read_step(ckpt: str | os.PathLike) -> int:
    """The step of a checkpoint folder, from its EMA weights' header (cheap: reads no tensor)."""
    f = Path(ckpt) / EMA_FILE
    try:
        with safe_open(f, "pt") as h:
            return int((h.metadata() or {})["step"])
    except (OSError, SafetensorError, KeyError, ValueError) as e:
        raise CheckpointError(f"cannot read the step of checkpoint {ckpt}: {e}") from None


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
        return run_dir_of(self.path)


def run_dir_of(ckpt: Path) -> Path:
    """The run folder of the checkpoint folder ``ckpt`` (``RUN/checkpoints/ckpt-N`` -> ``RUN``)."""
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent


def load_checkpoint(path: str | os.PathLike, *, weights: bool = True) -> Checkpoint:
    """Read a checkpoint (see :func:`find_checkpoint` for ``path``). ``weights=False`` skips the model
    weights (the EMA weights and state are always read)."""
    ckpt = find_checkpoint(path)
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol: the error below says it, once
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        model = load_file(ckpt / MODEL_FILE) if weights else {}
        ema = load_file(ckpt / EMA_FILE)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"cannot read checkpoint {ckpt}: {STATE_FILE} holds objects other than tensors and plain "
                f"values, or pickle instructions the safe loader does not read (refused to unpickle them)"
            ) from None
        raise CheckpointError(f"cannot read checkpoint {ckpt}: {STATE_FILE} is corrupt ({e})") from None
    except (OSError, RuntimeError, SafetensorError, EOFError) as e:
        raise CheckpointError(f"cannot read checkpoint {ckpt}: {one_line(e, first_only=True)}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt pickle stream fails in many ways (KeyError, struct.error)
        raise CheckpointError(
            f"cannot read checkpoint {ckpt}: {STATE_FILE} is corrupt ({type(e).__name__}: {e})"
        ) from None
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
