"""Memory checked before a run writes anything: the training step's estimate against what is free.

    check_step_memory(cfg, device)                  # ConfigError: one line with the estimate
    require_memory(need, "64 samples", device, hint="lower --n")

The estimate is a lower bound: weights with their gradients, AdamW moments and EMA copy (5 float32
copies), the activations that backward keeps (every leaf module's output for one sample, from a forward
of the model on the ``meta`` device: no memory, no compute; twice for the AT modes, whose clean and
perturbed forwards are both differentiated; one micro-batch's with ``run.grad_accum``), the step's
batch tensors (about 8 per sample) and a built-in dataset held in memory (float32, with its clean
copy). A compiled step keeps less (fused elementwise ops), so only a request far over the free memory (``OVER`` times the RAM on the CPU, the
device's free memory on CUDA) is refused: before the first write, instead of dying in the allocator
after the run folder was written.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from fastat.train.config import ConfigError, TrainConfig

__all__ = ["activation_elements", "available_bytes", "check_step_memory", "estimate_step", "require_memory"]

BATCH_TENSORS = 8  # x0, noise, x_t, w, predictions, targets: per-sample tensors of the objective
OVER = 1.5  # refused above this many times the free memory


def available_bytes(device: torch.device) -> int | None:
    """Free memory for ``device``: the CUDA device's free memory, else the RAM the kernel reports as
    available (None where neither can be read)."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def meta_model(spec: dict) -> nn.Module | None:
    """The model of ``spec`` (``{"name", "kwargs"}``) on the ``meta`` device: its shapes, no memory.
    ConfigError with the message the run gives for arguments that do not build it."""
    from fastat.train.state import build_checked_model  # the real build's checks and message

    try:
        return build_checked_model(spec, "meta")
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - a network that cannot be built on meta: no estimate
        return None


def activation_elements(model: nn.Module, sample_shape: tuple[int, ...]) -> int | None:
    """Elements of every leaf module's output for one sample (a meta forward); None if the model cannot
    run on ``meta`` (e.g. a third-party network with host-side checks)."""
    total = 0

    def count(module, args, out) -> None:
        nonlocal total
        total += out.numel() if torch.is_tensor(out) else 0

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            x = torch.zeros((1, *sample_shape), device="meta")
            model(x, torch.zeros(1, dtype=torch.long, device="meta"))
    except Exception:  # noqa: BLE001 - an op without a meta kernel: no estimate, no refusal
        return None
    finally:
        for h in hooks:
            h.remove()
    return total


def estimate_step(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> dict[str, int]:
    """Bytes per part of one training step of ``cfg`` on one rank (see the module docstring)."""
    from fastat.data import KNOWN
    from fastat.train.run_config import data_shape, model_spec, resolve_precision

    _, shape = data_shape(cfg)
    model = meta_model(model_spec(cfg))
    batch = max(1, cfg.run.batch_size // world_size)
    dim = math.prod(shape)
    width = 4 if resolve_precision(cfg.run.precision, device) == "fp32" else 2
    kept = 1 if cfg.objective.mode == "ddpm" else 2
    parts = {"weights": 5 * 4 * sum(p.numel() for p in model.parameters())} if model is not None else {}
    acts = activation_elements(model, shape) if model is not None else None
    if acts is not None:
        parts["activations"] = kept * width * acts * max(1, batch // cfg.run.grad_accum)  # one micro-batch
    parts["batch"] = BATCH_TENSORS * 4 * dim * batch
    if cfg.data.dataset in KNOWN:
        parts["data"] = 2 * 4 * dim * cfg.data.n
    return parts


def require_memory(need: int, what: str, device: torch.device, hint: str) -> None:
    """ConfigError when ``need`` bytes (for ``what``) exceed :data:`OVER` times the free memory of
    ``device``."""
    free = available_bytes(device)
    if free is not None and need > OVER * free:
        where = f"free memory on {device}" if device.type == "cuda" else "available RAM"
        raise ConfigError(
            f"{what} needs about {_size(need)}, more than the {_size(free)} of {where}: {hint}"
        )


def check_step_memory(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> None:
    """Refuse (ConfigError, one line with the estimate) a run whose step cannot fit in memory."""
    parts = estimate_step(cfg, device, world_size)
    said = ", ".join(f"{k} {_size(v)}" for k, v in parts.items())
    require_memory(
        sum(parts.values()),
        f"the training step (batch {cfg.run.batch_size}; {said})",
        device,
        "lower --batch-size, --image-size or data.n, or raise --grad-accum",
    )


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"
