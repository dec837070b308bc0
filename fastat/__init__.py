"""fastat: fast equivariant adversarial training of diffusion models.

    import fastat
    objective = fastat.ATObjective(mode="adv")
    out = objective(model, x0, generator)   # model(x, t) -> eps
    out.loss.backward()

The public names load on first use (PEP 562), so ``import fastat`` (and ``fastat --help``) does not
import torch: the command line sets OpenMP's wait policy before torch starts its thread pool.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ATObjective": "fastat.at.objective",
    "ATOutput": "fastat.at.objective",
    "Budget": "fastat.at.budget",
    "MLP": "fastat.models",
    "NoiseSchedule": "fastat.at.schedule",
    "StepEngine": "fastat.step.engine",
    "UNet": "fastat.models",
    "build_model": "fastat.models",
    "ddim_sample": "fastat.at.sampling",
    "ddpm_sample": "fastat.at.sampling",
}
_SUBMODULES = ("ops",)

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"fastat.{name}")
    raise AttributeError(f"module 'fastat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
