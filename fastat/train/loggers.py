"""Where a run's scalars and sample grids go besides ``metrics.jsonl``: TensorBoard, Weights & Biases, or
nowhere (``run.logger``). Neither package is needed to train.

    logger = open_logger("tensorboard", run_dir, resume_step=0)   # None when TensorBoard is missing
    logger.scalars(step, {"train/loss": 0.1})
    logger.image(step, "samples", hwc_uint8)                    # a grid (or a scatter plot) as an image
    logger.close()

``tensorboard`` writes event files to ``RUN/tb`` (``purge_step`` drops what a resumed run logged after
its checkpoint). ``wandb`` logs to project ``run.wandb_project`` with the run folder's name, files under
``RUN/wandb``; the run's id is kept in ``RUN/wandb/fastat-run-id`` so a resumed run continues the same
W&B run. Its mode is wandb's own: ``WANDB_MODE=offline`` logs without a network (``wandb sync`` later).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

__all__ = ["LOGGERS", "LoggerMissing", "TensorBoardLogger", "WandbLogger", "check_logger", "open_logger",
           "png_array"]  # fmt: skip

LOGGERS = ("tensorboard", "wandb", "none")
WANDB_ID_FILE = "fastat-run-id"
_MISSING = "run.logger wandb needs wandb: pip install 'fastat[wandb]' (or run.logger tensorboard | none)"


class LoggerMissing(ImportError):
    """The logger asked for is not installed (one line: how to install it)."""


class TensorBoardLogger:
    def __init__(self, run_dir: Path, *, resume_step: int | None, writer_cls) -> None:
        self._tb = writer_cls(str(run_dir / "tb"), purge_step=resume_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def image(self, step: int, tag: str, hwc: np.ndarray) -> None:
        self._tb.add_image(tag, hwc, step, dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()


class WandbLogger:
    def __init__(self, run_dir: Path, *, project: str, config: dict | None, wandb) -> None:
        self._wandb = wandb
        folder = run_dir / "wandb"
        folder.mkdir(exist_ok=True)
        id_file = folder / WANDB_ID_FILE
        if id_file.exists():  # a resumed run: the same W&B run
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
        self._run = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow",
                               dir=str(run_dir), config=config)  # fmt: skip
        # the x-axis is the training step (W&B's own counter only grows; a resumed run logs older steps)
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._run.log({**values, "step": step})

    def image(self, step: int, tag: str, hwc: np.ndarray) -> None:
        self._run.log({tag: self._wandb.Image(hwc), "step": step})

    def close(self) -> None:
        self._run.finish()


def open_logger(kind: str, run_dir: str | os.PathLike, *, resume_step: int | None = None,
                project: str = "fastat", config: dict | None = None):  # fmt: skip
    """The logger ``kind`` (:data:`LOGGERS`) of ``run_dir``; ``None`` for ``none`` and for a TensorBoard
    that is not installed (the run logs to ``metrics.jsonl`` only). A missing wandb is
    :class:`LoggerMissing`: it was asked for by name."""
    if kind not in LOGGERS:
        raise ValueError(f"unknown logger {kind!r}; choose one of {', '.join(LOGGERS)}")
    run_dir = Path(run_dir)
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: jsonl only
            return None
        return TensorBoardLogger(run_dir, resume_step=resume_step, writer_cls=SummaryWriter)
    if kind == "wandb":
        check_logger(kind)
        import wandb

        return WandbLogger(run_dir, project=project, config=config, wandb=wandb)
    return None


def check_logger(kind: str) -> None:
    """:class:`LoggerMissing` now (before the data is read) if ``kind`` is ``wandb`` and it is missing."""
    if kind == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise LoggerMissing(_MISSING) from None


def png_array(path: str | os.PathLike) -> np.ndarray:
    """A PNG file as an ``(H, W, 3)`` uint8 array (what a logger shows)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))
