"""What a denoiser's output means: reading it (any output type) and converting between parameterisations.

    out = model_output(unet(x_t, t))         # a tensor, a tuple, diffusers' UNet2DOutput -> the tensor
    eps_hat = to_eps("v", out, x_t, a, s)    # a v-model's noise estimate
    x0_hat = to_x0("v", out, x_t, a, s)
    model = EpsModel(unet, "v", schedule)    # any model -> forward(x, t) -> eps tensor

Every prediction type (``eps``, ``v``, ``x0``) reads as ``eps_hat = alpha o + beta x_t``, so the eps-space
equivariance residual is a residual in the model's own space,
``alpha * (o(x~_t) - o(x_t) - c_w w)``: :func:`regulariser_coeffs` returns ``(c_w, alpha^2)``. The table
and the derivation: docs/DESIGN.md ("Loss").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastat.kernels import per_sample
from fastat.utils.checks import SettingError, unknown

__all__ = [
    "PREDICTIONS",
    "EpsModel",
    "as_eps_model",
    "canonical_prediction",
    "model_output",
    "regulariser_coeffs",
    "resolve_prediction",
    "target",
    "to_eps",
    "to_x0",
]

PREDICTIONS = ("eps", "v", "x0")

# Names other codebases use: diffusers' prediction_type, denoising-diffusion-pytorch's objective.
ALIASES = {
    "epsilon": "eps",
    "pred_noise": "eps",
    "v_prediction": "v",
    "pred_v": "v",
    "sample": "x0",
    "pred_x0": "x0",
}


def canonical_prediction(name: Any) -> str:
    """``eps``, ``v`` or ``x0`` for any accepted name (also ``epsilon``, ``v_prediction``, ``sample``,
    ``pred_noise``, ``pred_v``, ``pred_x0``); ValueError otherwise."""
    if isinstance(name, str):
        key = name.strip().lower()
        if key in PREDICTIONS:
            return key
        if key in ALIASES:
            return ALIASES[key]
    raise unknown("prediction", name, PREDICTIONS, display="prediction type",
                  also=f" (also accepted: {', '.join(ALIASES)})")  # fmt: skip


def resolve_prediction(requested: Any, declared: str | None) -> str:
    """The prediction type to use: ``requested`` (canonicalised) or, when None, the one ``declared`` by
    the schedule's source (``NoiseSchedule.prediction``), else ``eps``. A contradiction is an error."""
    if requested is None:
        return declared or "eps"
    pred = canonical_prediction(requested)
    if declared is not None and pred != declared:
        raise SettingError(
            "prediction",
            f"{{name}}={requested!r} contradicts the scheduler, which trains {declared}-prediction "
            f"(leave prediction unset to use the scheduler's)",
        )
    return pred


def model_output(out: Any) -> torch.Tensor:
    """The prediction tensor inside a model's output: a tensor, a tuple/list (its first element) or an
    object with a tensor ``.sample`` (diffusers' ``UNet2DOutput``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(
        f"the model returned {type(out).__name__}; expected a tensor, a tuple or list whose first element "
        f"is the prediction, or an object with a tensor .sample (e.g. diffusers' UNet2DOutput)"
    )


def to_eps(
    prediction: str, out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """The noise estimate implied by the output ``out`` of a ``prediction``-model at ``x_t``."""
    p = canonical_prediction(prediction)
    if p == "eps":
        return out
    a, s = per_sample(a, out, dtype=None), per_sample(s, out, dtype=None)
    if p == "v":
        return a * out + s * x_t
    return (x_t - a * out) / s


def to_x0(
    prediction: str, out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """The clean-sample estimate implied by the output ``out`` of a ``prediction``-model at ``x_t``."""
    p = canonical_prediction(prediction)
    if p == "x0":
        return out
    a, s = per_sample(a, out, dtype=None), per_sample(s, out, dtype=None)
    if p == "v":
        return a * x_t - s * out
    return (x_t - s * out) / a


def target(
    prediction: str, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """What a ``prediction``-model is trained to output at ``x_t = a x0 + s eps``."""
    p = canonical_prediction(prediction)
    if p == "eps":
        return eps
    if p == "x0":
        return x0
    from fastat import ops  # v = a eps - s x0, one fused pass

    return ops.q_sample(x0, -s, a, eps)


def regulariser_coeffs(prediction: str, a: torch.Tensor, s: torch.Tensor, equivariant: bool = True):
    """``(c_w, lam_factor)`` such that the eps-space residual ``||eps_hat(x~) - eps_hat(x) - [w]||^2``
    equals ``lam_factor * ||o(x~) - o(x) - c_w w||^2`` (``[w]`` dropped when not ``equivariant``).

    Per-sample tensors (numbers for ``eps``); see the module docstring for the algebra.
    """
    p = canonical_prediction(prediction)
    if p == "eps":
        return (1.0 if equivariant else 0.0), 1.0
    if p == "v":
        return (a if equivariant else -(s * s) / a), a * a
    return (0.0 if equivariant else s / a), (a / s).square()


class EpsModel(nn.Module):
    """``model`` seen as an eps-model: ``forward(x, t)`` returns the noise estimate as a tensor, whatever
    the model's output type and prediction type. ``schedule`` gives ``a_t``, ``s_t`` for the conversion.

    The wrapped model is a submodule, so ``.eval()``/``.train()`` and batch-norm handling reach it.
    """

    def __init__(self, model: nn.Module, prediction: str = "eps", schedule=None) -> None:
        super().__init__()
        self.model = model
        self.prediction = canonical_prediction(prediction)
        if self.prediction != "eps" and schedule is None:
            raise ValueError(f"EpsModel: a {self.prediction}-prediction model needs the noise schedule")
        self.schedule = schedule
        if hasattr(model, "sample_shape"):
            self.sample_shape = model.sample_shape

    def forward(self, x: torch.Tensor, t: torch.Tensor, *cond) -> torch.Tensor:
        out = model_output(self.model(x, t, *cond))  # cond: class labels of a class-conditional model
        if self.prediction == "eps":
            return out
        a, s = self.schedule.coeffs(t)
        return to_eps(self.prediction, out.float(), x.float(), a, s).to(out.dtype)


def as_eps_model(model: nn.Module, prediction: str = "eps", schedule=None) -> nn.Module:
    """``model`` itself for an eps-model, else an :class:`EpsModel` view of it."""
    return model if canonical_prediction(prediction) == "eps" else EpsModel(model, prediction, schedule)
