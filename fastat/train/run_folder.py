"""A run folder, owned by one trainer: its lock, the checks before anything is written, and what the
run writes there (config, checkpoints, metrics, sample grids).

    RunFolder.check("runs/exp", resume=ckpt, steps=2000)   # read-only: what --dry-run checks
    with RunFolder.open("runs/exp", resume=ckpt, steps=2000) as run:   # checks, then takes the lock
        run.start(cfg.to_yaml(), step=start)                # the first write: config.yaml, metrics
        run.save(step, model=model, ema=ema, state=state)   # atomic checkpoint, pruned to run.keep
        run.log(step, {"loss": 0.1}); run.write_samples(step, x, "image")
    # the lock is released on any exit; a folder created by a start that failed is removed again

One trainer at a time: the folder itself is held (``flock`` on an open descriptor, so deleting
``RUN/.lock`` admits no second trainer; the file names the holder). A fresh run takes only a new, empty
or fastat run folder without checkpoints; a resume continues its own newest checkpoint or branches into
an empty folder; nothing changes until the first record, sample or checkpoint. ``writer=False`` checks
and writes nothing (ranks other than 0). The rules: docs/DESIGN.md ("Checkpoints and the loop").
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import tempfile
from pathlib import Path

import yaml
from torch import nn

from fastat.train.checkpoint import (
    CHECKPOINTS,
    atomic_write_text,
    checkpoint_root,
    latest_checkpoint,
    list_checkpoints,
    process_ended,
    read_step,
    save_checkpoint,
)
from fastat.train.config import ConfigError, TrainConfig
from fastat.train.metrics import METRICS_FILE, MetricsLog
from fastat.utils.yaml_io import read_bounded
from fastat.utils.yaml_io import safe_load as bounded_load

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system: the pid check alone
    fcntl = None

__all__ = ["CONFIG_FILE", "LOCK_FILE", "SAMPLES_DIR", "RunFolder", "RunFolderBusy", "is_run_folder"]

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
SAMPLES_DIR = "samples"


class RunFolderBusy(ConfigError):
    """Another live trainer holds the run folder's lock."""


class RunFolder:
    """The run folder ``path`` while a trainer uses it. Build it with :meth:`open`."""

    def __init__(
        self, path: str | os.PathLike, *, keep: int = 3, writer: bool = True, tensorboard: bool = True,
        logger: str = "tensorboard", wandb_project: str = "fastat",
    ) -> None:  # fmt: skip
        self.path = Path(path).expanduser()
        self.keep, self.writer, self.tensorboard = keep, writer, tensorboard
        self.logger, self.wandb_project = logger, wandb_project  # run.logger (see fastat.train.loggers)
        self.last_checkpoint: Path | None = None  # the newest checkpoint of this run (written or resumed)
        self.config_yaml = ""
        self.steps: int | None = None  # the run's total steps (from open)
        self._lock: _Lock | None = None
        self._log: MetricsLog | None = None
        self._created: list[Path] = []  # folders made by open(), removed again if start() never came
        self._started = False  # something was written (start() called and a first write came)
        self._start_step: int | None = None

    # -- opening ---------------------------------------------------------------------------------------

    @staticmethod
    def check(path: str | os.PathLike, *, resume: Path | None = None, steps: int | None = None) -> Path:
        """Every check :meth:`open` makes, writing nothing: the folder can be created and written, no live
        trainer holds it, and it may take this run (see the module's rules). Returns the folder."""
        run_dir = Path(path).expanduser()
        _check_writable(run_dir)
        if run_dir.is_dir():  # the folder's lock, held even where the lock file was deleted
            _Lock(run_dir / LOCK_FILE).probe()
        _check_owner(run_dir, resume, steps)
        return run_dir

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        resume: Path | None = None,  # the checkpoint folder this run continues
        steps: int | None = None,  # the run's total steps (must not be below the checkpoint's)
        keep: int = 3,  # checkpoints kept
        writer: bool = True,
        tensorboard: bool = True,
        logger: str = "tensorboard",  # tensorboard | wandb | none (besides metrics.jsonl)
        wandb_project: str = "fastat",
    ) -> RunFolder:
        """Check the folder, create it if needed and take its lock; nothing else is written yet.
        Raises ConfigError (or :class:`RunFolderBusy`) with one line on any failed check."""
        run = cls(path, keep=keep, writer=writer, tensorboard=tensorboard, logger=logger,
                  wandb_project=wandb_project)  # fmt: skip
        run.steps = steps
        if not writer:
            return run
        run_dir = cls.check(run.path, resume=resume, steps=steps)
        try:
            run._created = _mkdirs(run_dir)
            run._lock = _Lock(run_dir / LOCK_FILE)
            run._lock.acquire()
            _check_owner(run_dir, resume, steps)  # again, under the lock
        except BaseException:
            run.close()
            raise
        run.last_checkpoint = resume
        return run

    def start(self, config_yaml: str, *, step: int) -> None:
        """The first write: ``config.yaml``, and the metrics log (records after ``step`` are dropped: a
        run that died after its last checkpoint wrote them; so is the final evaluation's record at
        ``step`` when the run resumes at its end, which evaluates again; a run that starts fresh or
        branches here starts an empty log)."""
        self.config_yaml, self._start_step = config_yaml, step
        if not self.writer:
            self._started = True

    def _commit(self) -> None:
        """The first write (from :meth:`log`, :meth:`save`, :meth:`samples_file`): once a step has run."""
        if self._started or self._start_step is None:
            return
        self._started = True
        atomic_write_text(self.path / CONFIG_FILE, self.config_yaml)
        step = self._start_step
        own = self.last_checkpoint is not None and _same(self.last_checkpoint, self.path)
        at_end = self.steps is not None and step >= self.steps
        self._log = MetricsLog(self.path, tensorboard=self.tensorboard, resume_step=step if own else 0,
                               final=at_end, logger=self.logger, project=self.wandb_project,
                               config=yaml.safe_load(self.config_yaml) if self.logger == "wandb" else None,
                               )  # fmt: skip

    # -- writing ---------------------------------------------------------------------------------------

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    def log(self, step: int, values: dict, *, kind: str = "train") -> None:
        self._commit()
        if self._log is not None:
            self._log.write(step, values, kind=kind)

    def log_image(self, step: int, tag: str, png: Path | None) -> None:
        """The PNG file ``png`` (a sample grid or scatter plot) as image ``tag`` of the logger, if any."""
        if self._log is not None and png is not None and png.suffix == ".png":
            self._log.image(step, tag, png)

    def save(self, step: int, *, model: nn.Module, ema: nn.Module, state: dict, metadata: dict) -> Path:
        """Write checkpoint ``step`` atomically (with the config beside it), point ``latest`` at it and
        prune to ``keep``. Returns its folder (on a non-writer: the folder the writer writes)."""
        path = checkpoint_root(self.path) / f"ckpt-{step:06d}"
        if self.writer:
            self._commit()
            files = {CONFIG_FILE: self.config_yaml} if self.config_yaml else None
            path = save_checkpoint(checkpoint_root(self.path), step, model=model, ema=ema, state=state,
                                   keep=self.keep, metadata=metadata, files=files)  # fmt: skip
        self.last_checkpoint = path
        return path

    def holds(self, step: int) -> bool:
        """Whether this folder's newest checkpoint is the one of ``step`` (nothing to save again)."""
        last = self.last_checkpoint
        return last is not None and _same(last, self.path) and last.name == f"ckpt-{step:06d}"

    def samples_file(self, step: int, suffix: str) -> Path:
        """``RUN/samples/step-NNNNNN<suffix>`` (its folder created)."""
        folder = self.path / SAMPLES_DIR
        if self.writer:
            self._commit()
            folder.mkdir(exist_ok=True)
        f = folder / f"step-{step:06d}{suffix}"
        if self.writer and (f.is_symlink() or f.exists() and not f.is_file()):
            raise ConfigError(f"{f} is in the way of the run's samples (not a plain file); move it away")
        return f

    # -- closing ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the log and release the lock; a folder this run created and never started is removed."""
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if not self._started:
            for d in reversed(self._created):
                try:
                    d.rmdir()  # only if still empty
                except OSError:
                    break
        self._created = []

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the checks --------------------------------------------------------------------------------------


def _check_writable(run_dir: Path) -> None:
    """The folder exists and is writable, or its nearest existing ancestor is a writable folder."""
    p = run_dir
    while not p.exists():
        if p.is_symlink():  # a dangling link
            raise ConfigError(f"cannot write to the run folder {run_dir} (--out): {p} is a broken link")
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"cannot write to the run folder {run_dir} (--out): {p} is not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to the run folder {run_dir} (--out): {p} is not writable")
    try:  # access() says yes to root where nothing can be created (e.g. /proc): create and remove a probe
        os.rmdir(tempfile.mkdtemp(prefix=".fastat-probe-", dir=p))
    except OSError as e:
        why = f"{p} is not writable ({e.strerror})"
        raise ConfigError(f"cannot write to the run folder {run_dir} (--out): {why}") from None


def _same(ckpt: Path, run_dir: Path) -> bool:
    """Whether the checkpoint folder ``ckpt`` belongs to the run folder ``run_dir``."""
    return ckpt.parent.name == CHECKPOINTS and ckpt.parent.parent.resolve() == run_dir.resolve()


def _check_owner(run_dir: Path, resume: Path | None, steps: int | None) -> None:
    has = list_checkpoints(checkpoint_root(run_dir))
    if resume is None:
        if has:
            raise ConfigError(
                f"the run folder {run_dir} already holds checkpoints; continue it with --resume auto "
                f"or choose another --out"
            )
        _check_not_foreign(run_dir)
        return
    if steps is not None:
        at = read_step(resume)
        if steps < at:
            raise ConfigError(
                f"--steps {steps} is below the step of the checkpoint it resumes ({resume}: step {at}); "
                f"--steps is the total, not the steps to add"
            )
    if _same(resume, run_dir):
        newest = latest_checkpoint(run_dir)
        if newest is not None and newest.resolve() != resume.resolve():
            raise ConfigError(
                f"{resume} is older than the run's newest checkpoint {newest.name}, which resuming it would "
                f"overwrite; resume the newest, or branch from it with --out NEW_FOLDER"
            )
    elif has:
        raise ConfigError(
            f"the run folder {run_dir} (--out) holds another run's checkpoints; to branch from {resume}, "
            f"choose a new --out"
        )
    else:
        _check_not_foreign(run_dir)


def _check_not_foreign(run_dir: Path) -> None:
    """A run that starts in ``run_dir`` (fresh or branched) takes it only if it is new, empty (a stale
    lock aside) or a fastat run's folder: nothing a user put there is ever overwritten."""
    try:
        entries = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"cannot read the run folder {run_dir} (--out): {e.strerror or e}") from None
    if entries and not is_run_folder(run_dir):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(
            f"the run folder {run_dir} (--out) is not empty and is not a fastat run (it holds {shown}); "
            f"choose a new or empty --out"
        )


def is_run_folder(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` is a fastat run's folder: its ``config.yaml`` holds a fastat config's sections
    (what :meth:`RunFolder.start` writes), or it holds checkpoints."""
    run_dir = Path(run_dir)
    if list_checkpoints(checkpoint_root(run_dir)):
        return True
    try:
        d = bounded_load(read_bounded(run_dir / CONFIG_FILE))
    except (OSError, yaml.YAMLError):
        return False
    sections = {f.name for f in dataclasses.fields(TrainConfig)}
    return isinstance(d, dict) and "run" in d and set(d) <= sections


def _mkdirs(run_dir: Path) -> list[Path]:
    """Create ``run_dir`` and its missing parents; returns the folders created, outermost first."""
    missing = []
    p = run_dir
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write to the run folder {run_dir} (--out): {e.strerror or e}") from None
    return list(reversed(missing))


# -- the lock ----------------------------------------------------------------------------------------


class _Lock:
    """An exclusive ``flock`` on the folder (an open descriptor of it, held while the lock is: a deleted
    lock file cannot release it), and one on a file in it holding ``<pid>@<host>`` of its holder (the
    name in the busy message; the lock itself where the folder cannot be locked). The file is removed on
    release (and the acquirer checks it still locked the file at the path, not a removed one)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._dir_fd: int | None = None

    def acquire(self) -> None:
        self._dir_fd = self._lock_folder()
        try:
            self._acquire_file()
        except BaseException:
            self._close_folder()
            raise

    def _lock_folder(self, probe: bool = False) -> int | None:
        """The folder's descriptor, locked (None: no ``flock`` here); RunFolderBusy if another holds it."""
        if fcntl is None:
            return None
        try:
            fd = os.open(self.path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as e:
            if probe:
                return None
            raise ConfigError(
                f"cannot write to the run folder {self.path.parent} (--out): {e.strerror or e}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self._busy(None)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                raise
            return None
        if probe:
            os.close(fd)  # drops it
            return None
        return fd

    def _close_folder(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def _acquire_file(self) -> None:
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ConfigError(
                    f"cannot write to the run folder {self.path.parent} (--out): {e.strerror or e}"
                ) from None
            try:
                locked = self._flock(fd)
                if not locked:
                    self._busy(fd)
                if not self._same_file(fd):  # the previous holder removed it between our open and flock
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return
        raise RunFolderBusy(f"the run folder {self.path.parent} is locked and unlocked by other trainers")

    def probe(self) -> None:
        """Raise :class:`RunFolderBusy` if a live trainer holds the lock (takes and drops it otherwise)."""
        self._lock_folder(probe=True)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            if not self._flock(fd, probe=True):
                self._busy(fd)
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: the next trainer makes a new one
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None
            self._close_folder()

    # -- internals

    def _flock(self, fd: int, probe: bool = False) -> bool:
        """True if the lock was taken (probe: and dropped again), False if another process holds it."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
            else:
                if probe:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                return True
        # no flock here: the holder written in the file decides
        holder = self._holder(fd)
        return holder is None or _gone(holder)

    def _holder_by_name(self) -> str | None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            return self._holder(fd)
        finally:
            os.close(fd)

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _holder(fd: int) -> str | None:
        try:
            text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        except OSError:
            return None
        return text or None

    def _busy(self, fd: int | None):
        holder = (self._holder(fd) if fd is not None else self._holder_by_name()) or "another process"
        raise RunFolderBusy(
            f"the run folder {self.path.parent} is in use by another trainer ({holder}); wait for it to "
            f"finish or choose another --out"
        )


def _gone(holder: str) -> bool:
    """Whether the ``<pid>@<host>`` holder of a lock file (read where ``flock`` is missing) has ended."""
    pid, _, host = holder.partition("@")
    return pid.isdigit() and process_ended(int(pid), host or None)
