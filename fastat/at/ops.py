"""The public fused operations of fastat (SPEC section 2), importable by any diffusion codebase.

    from fastat.at import ops
    x_t = ops.q_sample(x0, a, s, eps)                       # a*x0 + s*eps, a, s of shape (B,)
    w = ops.pgd_step(w, grad, radius, alpha, norm="linf")   # ascent step + projection
    loss = ops.at_loss(eps_pred, eps_adv_pred, eps, w, lam) # DDPM loss + equivariance regulariser
    x_t, x_adv, eps, w0 = ops.noise_inject(x0, a, s, radius, seed, offset)  # draws eps, w0 in-kernel
    x_t, x_adv, eps, w0 = ops.noise_inject(x0, a, s, radius, stream)        # ops.NoiseStream: offset advances

Every op validates its arguments, takes float32, bfloat16 or float16, computes in float32 and returns the
input's dtype; per-sample coefficients are floats, 0-dim or ``(B,)`` tensors. CUDA tensors run the Triton
kernels of :mod:`fastat.kernels`, CPU tensors their ``*_ref`` references; ``FASTAT_FORCE_TRITON=1`` (read
at call time; with ``TRITON_INTERPRET=1``) sends CPU tensors to the kernels too.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator
from numbers import Real

import torch

from fastat import kernels as K
from fastat.at.seeding import NoiseStream, rank_generator

__all__ = [
    "NoiseStream",
    "at_loss",
    "at_loss_parts",
    "ddpm_loss",
    "noise_inject",
    "pgd_step",
    "q_sample",
    "rank_generator",
    "trusted_values",
    "uses_triton",
]

# The dtypes the ops take (arithmetic in float32). float64 is refused rather than silently rounded.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = "float32, bfloat16 or float16"


def uses_triton(x: torch.Tensor) -> bool:
    """Whether the ops run their Triton kernels for tensors like ``x`` (ValueError: CPU tensors forced
    onto them without the interpreter, where triton would fail with "0 active drivers")."""
    if not K.HAS_TRITON or not (x.is_cuda or os.environ.get("FASTAT_FORCE_TRITON", "") == "1"):
        return False
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "") != "1":
        raise ValueError(
            "FASTAT_FORCE_TRITON=1 sends CPU tensors to the Triton kernels, which need a GPU or the "
            "interpreter (TRITON_INTERPRET=1, set before triton is imported); unset FASTAT_FORCE_TRITON"
        )
    return True


_state = threading.local()


@contextlib.contextmanager
def trusted_values() -> Iterator[None]:
    """Skip the value checks of coefficient tensors (finite, >= 0) inside this block.

    Those checks read a device tensor back to the host (a sync on CUDA). Callers that build the
    coefficients themselves, such as :class:`fastat.ATObjective` in the training step, turn them off.
    Shape, dtype and device checks stay on.
    """
    prev = getattr(_state, "trusted", False)
    _state.trusted = True
    try:
        yield
    finally:
        _state.trusted = prev


def _skip_value_checks() -> bool:
    if getattr(_state, "trusted", False):
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_tensors(op: str, **tensors: torch.Tensor) -> torch.Tensor:
    """All named tensors: floating, same shape, dtype and device, at least 1-D. Returns the first."""
    first_name, first = None, None
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{op}: {name} must be a floating tensor, {_DTYPE_NAMES} (the ops compute in float32), "
                f"got {x.dtype}"
            )
        if first is None:
            first_name, first = name, x
            if x.dim() == 0:
                raise ValueError(f"{op}: {name} must have a batch dimension, got a 0-dim tensor")
            continue
        if x.shape != first.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(x.shape)}, {first_name} has {tuple(first.shape)}")
        if x.dtype != first.dtype:
            raise TypeError(f"{op}: {name} is {x.dtype} but {first_name} is {first.dtype}")
        if x.device != first.device:
            raise ValueError(f"{op}: {name} is on {x.device} but {first_name} is on {first.device}")
    return first


def _check_nonempty(op: str, x: torch.Tensor) -> None:
    """A loss is a mean over the batch's elements: none is an error, not a NaN or a division by zero."""
    if x.numel() == 0:
        raise ValueError(f"{op}: the batch is empty (shape {tuple(x.shape)}): a loss needs an element")


def _check_coeff(op: str, name: str, c, like: torch.Tensor, nonneg: bool = False, finite: bool = False):
    """A per-sample coefficient: a real number, or a floating tensor of shape () or (B,) on like's device."""
    if isinstance(c, torch.Tensor):
        if not c.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a float or a floating tensor, got {c.dtype}")
        if c.dim() > 1 or (c.dim() == 1 and c.shape[0] != like.shape[0]):
            raise ValueError(
                f"{op}: {name} must be a float or a tensor of shape ({like.shape[0]},), got {tuple(c.shape)}"
            )
        if c.device != like.device:
            raise ValueError(f"{op}: {name} is on {c.device} but the data is on {like.device}")
        # Value checks read the tensor back to the host: skipped inside capture and trusted blocks.
        if (nonneg or finite) and not _skip_value_checks():
            if finite and not bool(torch.isfinite(c).all()):
                raise ValueError(f"{op}: {name} must be finite")
            if nonneg and bool((c < 0).any()):
                raise ValueError(f"{op}: {name} must be >= 0")
        return c
    if isinstance(c, bool) or not isinstance(c, Real):
        raise TypeError(f"{op}: {name} must be a float or a tensor, got {type(c).__name__}")
    if finite and not math.isfinite(c):
        raise ValueError(f"{op}: {name} must be finite, got {c}")
    if nonneg and c < 0:
        raise ValueError(f"{op}: {name} must be >= 0, got {c}")
    return float(c)


def q_sample(x0: torch.Tensor, a, s, eps: torch.Tensor) -> torch.Tensor:
    """The DDPM forward process ``x_t = a*x0 + s*eps`` with per-sample ``a``, ``s``. Differentiable."""
    x0 = _check_tensors("q_sample", x0=x0, eps=eps)
    a = _check_coeff("q_sample", "a", a, x0, finite=True)
    s = _check_coeff("q_sample", "s", s, x0, finite=True)
    if not uses_triton(x0):
        return K.q_sample_ref(x0, a, s, eps)
    if x0.requires_grad or eps.requires_grad:
        return K.QSampleFunction.apply(x0, a, s, eps)
    return K.q_sample_triton(x0, a, s, eps)


def _check_seed(op: str, name: str, v) -> None:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.dtype.is_floating_point or v.dtype.is_complex:
            raise TypeError(f"{op}: {name} must be an int or a one-element integer tensor")
    elif isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name} must be a non-negative int, got {v!r}")
    elif not 0 <= v < 2**63:  # an int64 (what the kernels and generators hold): larger ones would wrap
        raise ValueError(f"{op}: {name} must be in [0, 2**63), got {v}")


def noise_inject(
    x0: torch.Tensor,
    a,
    s,
    radius,
    seed: int | torch.Tensor | NoiseStream,
    offset: int | torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    store_noise: bool = True,
):
    """Draw ``eps ~ N(0, I)`` and ``w0 ~ U[-radius, radius]`` and return ``(x_t, x~_t, eps, w0)``:

        x_t = a*x0 + s*eps,   x~_t = x_t + s*w0

    ``seed``/``offset``: ints or one-element integer tensors (device tensors let a CUDA graph advance
    them between replays; ``offset`` defaults to 0). Same (seed, offset), same numbers; another offset, an
    independent stream: a loop that passes the same pair twice gets the same noise twice. ``seed`` may
    instead be a :class:`NoiseStream` (no ``offset``): its offset is used, then advanced on the device.
    ``out``: an optional ``[2B, ...]`` buffer that receives ``x_t`` (first half) and ``x~_t``.
    ``store_noise=False`` skips writing eps and w0 on the Triton path (they are returned as None).
    """
    x0 = _check_tensors("noise_inject", x0=x0)
    a = _check_coeff("noise_inject", "a", a, x0, finite=True)
    s = _check_coeff("noise_inject", "s", s, x0, finite=True)
    radius = _check_coeff("noise_inject", "radius", radius, x0, nonneg=True, finite=True)
    stream = seed if isinstance(seed, NoiseStream) else None
    if stream is not None:
        if offset is not None:
            raise ValueError("noise_inject: a NoiseStream carries its own offset; do not pass offset")
        if stream.seed.device != x0.device:
            raise ValueError(f"noise_inject: the NoiseStream is on {stream.seed.device}, x0 on {x0.device}")
        seed, offset = stream.seed, stream.offset
    offset = 0 if offset is None else offset
    _check_seed("noise_inject", "seed", seed)
    _check_seed("noise_inject", "offset", offset)
    if out is not None:
        want = (2 * x0.shape[0], *x0.shape[1:])
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want or out.dtype != x0.dtype:
            raise ValueError(f"noise_inject: out must be a {x0.dtype} tensor of shape {want}")
        if out.device != x0.device:
            raise ValueError(f"noise_inject: out is on {out.device} but x0 is on {x0.device}")
    if uses_triton(x0):
        res = K.noise_inject_triton(x0, a, s, radius, seed, offset, out=out, store_noise=store_noise)
    else:
        xt, xadv, eps, w0 = K.noise_inject_ref(x0, a, s, radius, seed, offset, out=out)
        res = (xt, xadv, eps, w0) if store_noise else (xt, xadv, None, None)
    if stream is not None:
        stream.advance()  # after the launch, in stream order: the kernel has read the old offset
    return res


def pgd_step(
    w: torch.Tensor,
    grad: torch.Tensor,
    radius,
    alpha,
    norm: str = "linf",
    x_t: torch.Tensor | None = None,
    s=None,
    x_out: torch.Tensor | None = None,
):
    """One signed-gradient (linf) or normalised-gradient (l2) ascent step, projected onto the budget.

    ``radius`` is the actual bound (elementwise for linf, on the per-sample L2 norm for l2).
    With ``x_t`` and ``s`` the same pass also makes the next model input ``x_t + s*w_new`` (into
    ``x_out`` when given) and ``(w_new, x_next)`` is returned.
    """
    if norm not in K.NORMS:
        raise ValueError(f"pgd_step: unknown norm {norm!r}; choose one of {', '.join(K.NORMS)}")
    if (x_t is None) != (s is None):
        raise ValueError("pgd_step: pass both x_t and s (to write the next input) or neither")
    if x_t is None:
        w = _check_tensors("pgd_step", w=w, grad=grad)
    else:
        w = _check_tensors("pgd_step", w=w, grad=grad, x_t=x_t, **({} if x_out is None else {"x_out": x_out}))
        s = _check_coeff("pgd_step", "s", s, w, finite=True)
    radius = _check_coeff("pgd_step", "radius", radius, w, nonneg=True, finite=True)
    alpha = _check_coeff("pgd_step", "alpha", alpha, w, nonneg=True, finite=True)
    if uses_triton(w):
        return K.pgd_step_triton(w, grad, radius, alpha, norm, x_t=x_t, s=s, x_out=x_out)
    w_new = K.pgd_step_ref(w, grad, radius, alpha, norm)
    if x_t is None:
        return w_new
    x_next = K.q_sample_ref(x_t, 1.0, s, w_new)
    return w_new, (x_out.copy_(x_next) if x_out is not None else x_next)


def ddpm_loss(eps_pred: torch.Tensor, eps: torch.Tensor, dm_weight=1.0) -> torch.Tensor:
    """The standard DDPM loss ``sum(dm_weight_b * (eps_pred - eps)^2) / N``, in the input's dtype
    (float32 for float16 inputs, as :func:`at_loss`)."""
    eps_pred = _check_tensors("ddpm_loss", eps_pred=eps_pred, eps=eps)
    _check_nonempty("ddpm_loss", eps_pred)
    dm_weight = _check_coeff("ddpm_loss", "dm_weight", dm_weight, eps_pred, nonneg=True, finite=True)
    return K.ddpm_loss_ref(eps_pred, eps, dm_weight).to(K.loss_dtype(eps_pred.dtype))


def at_loss_parts(
    eps_pred: torch.Tensor,
    eps_adv_pred: torch.Tensor,
    eps: torch.Tensor,
    w: torch.Tensor,
    lam,
    detach_clean: bool = False,
    dm_weight=1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, ddpm_loss)``: :func:`at_loss` and, detached, its (weighted) DDPM term from the same pass."""
    eps_pred = _check_tensors("at_loss", eps_pred=eps_pred, eps_adv_pred=eps_adv_pred, eps=eps, w=w)
    _check_nonempty("at_loss", eps_pred)
    lam = _check_coeff("at_loss", "lam", lam, eps_pred, nonneg=True, finite=True)
    dm_weight = _check_coeff("at_loss", "dm_weight", dm_weight, eps_pred, nonneg=True, finite=True)
    if uses_triton(eps_pred):
        return K.ATLossFunction.apply(eps_pred, eps_adv_pred, eps, w, lam, detach_clean, dm_weight)
    return K.at_loss_parts_ref(eps_pred, eps_adv_pred, eps, w, lam, detach_clean, dm_weight)


def at_loss(
    eps_pred: torch.Tensor,
    eps_adv_pred: torch.Tensor,
    eps: torch.Tensor,
    w: torch.Tensor,
    lam,
    detach_clean: bool = False,
    dm_weight=1.0,
) -> torch.Tensor:
    """The equivariant AT loss ``L_DM + sum(lam_b * (eps_adv_pred - eps_pred - w)^2) / N``.

    ``lam`` is a float or a ``(B,)`` tensor; ``lam = 0`` gives exactly :func:`ddpm_loss` (on the
    Triton path: exactly the kernel's own DDPM term). ``dm_weight`` (float or ``(B,)``) weighs each
    sample's DDPM term: ``L_DM = sum(dm_weight_b * (eps_pred - eps)^2) / N``. Differentiable in both
    predictions. Returned in the inputs' dtype, but float32 for float16 inputs (so that a GradScaler's
    ``scale(loss)``, 2^16 by default, stays finite; the input gradients come back in float16).
    """
    return at_loss_parts(eps_pred, eps_adv_pred, eps, w, lam, detach_clean, dm_weight)[0]
