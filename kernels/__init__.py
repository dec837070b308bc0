"""fastat.kernels: each fused Triton op beside the plain-PyTorch reference that defines it.

| module | reference (the definition) | Triton launcher |
| noise  | ``q_sample_ref``, ``noise_inject_ref`` | ``q_sample_triton`` / ``QSampleFunction``, ``noise_inject_triton`` |
| pgd    | ``pgd_step_ref`` | ``pgd_step_triton`` |
| loss   | ``at_loss_ref``, ``ddpm_loss_ref`` | ``at_loss_triton`` / ``ATLossFunction`` |

Launchers take already-validated arguments; the public, validating, dispatching entry points are in
:mod:`fastat.at.ops`. ``per_sample`` (a per-sample coefficient shaped to broadcast over a batch) and
``loss_dtype`` (float32 for float16 losses) are shared with the rest of fastat.
"""

from ._common import loss_dtype, per_sample
from ._triton import HAS_TRITON
from .loss import ATLossFunction, at_loss_parts_ref, at_loss_ref, at_loss_triton, ddpm_loss_ref
from .noise import QSampleFunction, noise_inject_ref, noise_inject_triton, q_sample_ref, q_sample_triton
from .pgd import NORMS, pgd_step_ref, pgd_step_triton

__all__ = [
    "HAS_TRITON",
    "NORMS",
    "ATLossFunction",
    "QSampleFunction",
    "at_loss_parts_ref",
    "at_loss_ref",
    "at_loss_triton",
    "ddpm_loss_ref",
    "loss_dtype",
    "noise_inject_ref",
    "noise_inject_triton",
    "per_sample",
    "pgd_step_ref",
    "pgd_step_triton",
    "q_sample_ref",
    "q_sample_triton",
]
