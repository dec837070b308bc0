"""The equivariant adversarial-training objective (SPEC section 1) for any denoiser ``model(x, t)``.

    objective = ATObjective(mode="adv")                    # an eps-model, fastat's schedule
    objective = ATObjective(schedule=ddpm_scheduler, prediction="v")   # a diffusers / lucidrains setup
    out = objective(model, x0, generator)                  # draws t, eps, w; attacks; returns the loss
    out.loss.backward()

One call: ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``, ``x_t = a_t x0 + s_t eps``, clean prediction
``eps_theta(x_t)``, then ``w`` by mode, the perturbed prediction ``eps_theta(x_t + s_t w)`` and

    L_AT = mean|| eps_theta(x_t) - eps ||^2 + lambda_t * mean|| eps_theta(x_t + s_t w) - (eps_theta(x_t) + w) ||^2

| mode | w |
| ddpm | none: the plain DDPM loss, one forward |
| rand | w ~ U(budget) |
| adv  | random start + 1 signed-gradient step of size 1.25 r, projected (FGSM) |
| pgd  | random start + ``pgd_steps`` steps of size 2.5 r / k, projected after each |
| inv  | as adv, but the target ignores w: || eps_theta(x_t + s_t w) - eps_theta(x_t) ||^2 (ablation) |
| free | minibatch replay: no attack passes; the ascent reuses the training backward (below) |

**free** (Free-AT-style, Shafahi et al. 2019, beyond the paper). Each batch is trained on ``replays = m``
consecutive calls (optimizer steps), its *replays*. Replay 0 draws ``t``, ``eps`` and the random start
``w_0 ~ U(budget)`` as ``adv`` does; replays 1..m-1 keep the batch, ``t`` and ``eps`` (so ``x_t``) and
use ``w_k = Proj_r(w_{k-1} + alpha * sign(g_{k-1}))`` (l2: ``alpha * g / ||g||``), ``alpha =
step_size * r(t)`` (default 1.25 r, the budget r(t) as for every mode), where ``g_{k-1} = dL/dx~`` is the
gradient of replay k-1's training loss with respect to its perturbed input ``x~ = x_t + s_t w_{k-1}``,
computed by that replay's own backward (a hook on ``x~``): the perturbation costs no forward or backward
pass of its own. Exactly: with ``o``, ``o~`` the clean and perturbed outputs and ``N`` the elements,
``g = dL/dx~ = (2 lambda_t / N) (o~ - o - c_w w)^T do~/dx~`` (the regulariser is the only term that sees
``x~``). Free-AT's ``dL/dw`` is ``s_t g - (2 lambda_t c_w / N) (o~ - o - c_w w)``: ``free`` uses its first
term only, leaving out where ``w`` enters the loss directly; ``s_t > 0`` scales each sample's ``g``, so the
step's sign (l2: direction) is that of the first term. It is not ``adv``'s ascent on either attack target
(``attack_target`` does not apply): ``equivariance``'s gradient adds the same direct term, ``prediction``'s
uses the residual ``o~ - o`` without ``w``. And it comes one optimizer step late (the weights moved between
the replays: Free-AT's approximation). Without a backward (or with a non-finite
gradient, whose elements count as 0) ``w`` stays where it was. Unlike Shafahi et al., ``w`` is not carried
to the next batch: its ``x_t`` is new. Statistics: ``j`` is that regulariser's residual ``J(w_k)``,
``gain`` is ``J(w_k) / J(w_0)`` with ``J(w_0)`` measured at replay 0 of the batch (1 on fresh replays).
The replay state lives on the device (:class:`fastat.at.replay.Replay`): ``state_dict()`` checkpoints it.
Pass the same batch to all m calls, or ``None`` on replays 1..m-1 (the kept batch is used either way).

**reg_frac = f** in (0, 1] (every mode but ddpm): the regulariser (attack and perturbed pass) runs on the
first ``n = ceil(f * B)`` samples of the batch only; the denoising term stays on all ``B``. The loss is
``mean_B ||eps_theta(x_t) - eps||^2 + mean_n lambda_t ||...||^2``: an unbiased, noisier estimate of the
same objective. Cost (forward-pass equivalents per image, :meth:`ATObjective.flop_units`): ``3`` for
ddpm, ``3 + (2k + 3) n / B`` with ``k`` ascent steps (adv, inv: 8 at f = 1; pgd: 3 + (2k + 3); rand: 6),
``3 + 3 n / B`` for free (per replay: images seen count every replay). Compiled (``StepEngine(fast=True)``),
``n < B`` costs one more compile: the model runs at batch ``B`` and at ``n``, two static shapes.

**Any model, any parameterisation.** The model may return a tensor, a tuple (first element) or an object
with ``.sample`` (diffusers). With ``prediction="v"`` or ``"x0"`` the model's output ``o`` is not eps:

- the denoising term is the one the model's own library trains, ``mean|| o(x_t) - target ||^2`` with
  target ``eps``, ``v = a eps - s x0`` or ``x0``, optionally weighted per timestep (``dm_weight``);
- the equivariance term is the *same function* as for an eps-model, evaluated on the implied noise
  estimate ``eps_hat(o) = alpha_t o + beta_t x_t``; it equals ``lambda_t alpha_t^2 mean|| o(x~_t) - o(x_t)
  - c_w w ||^2`` with ``(c_w, alpha_t^2) = (1, 1), (a, a^2), (0, a^2/s^2)`` for eps, v, x0 (derivation in
  :mod:`fastat.at.prediction`), so the fused loss runs on the model's outputs directly;
- the attack maximises the same eps-space ``J`` (the model's output converted before ``J``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastat.at import ops
from fastat.at import prediction as P
from fastat.at.attack import TARGETS, attack_objective, pgd_attack
from fastat.at.budget import Budget
from fastat.at.replay import Replay, check_replays
from fastat.at.schedule import NoiseSchedule, as_schedule
from fastat.kernels import per_sample

MODES = ("ddpm", "rand", "adv", "pgd", "inv", "free")
LAM_SCALES = ("const", "radius")
DM_WEIGHTS = ("none", "eps")


@dataclass
class ATOutput:
    """The scalar loss (with its graph) and detached 0-dim statistics (no host sync)."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor]


@dataclass
class ATObjective:
    """Equivariant AT loss with its noise sampling and attack.

    Args:
        schedule: the DDPM noise schedule: a :class:`NoiseSchedule`, or another codebase's scheduler
            (a diffusers scheduler, a denoising-diffusion-pytorch ``GaussianDiffusion``), read with
            :meth:`NoiseSchedule.from_scheduler`.
        mode: one of ``ddpm | rand | adv | pgd | inv | free`` (see module docstring).
        lam: weight of the equivariance regulariser (>= 0).
        lam_scale: ``const`` (lambda_t = lam) or ``radius`` (lambda_t = lam / r_elem(t)^2 with
            r_elem the per-element eps-space radius, so the regulariser is measured in budget units).
        budget: the radius schedule r(t), its space and norm.
        pgd_steps: ascent steps for ``pgd`` (``adv`` and ``inv`` always take 1).
        step_size: ascent step as a multiple of the radius; default 1.25 for one step, 2.5/k for k.
        attack_target: ``prediction`` (maximise the change of the prediction) or ``equivariance``
            (maximise the equivariance residual).
        detach_clean: treat eps_theta(x_t) inside the equivariance target as a constant.
        prediction: what the model outputs: ``eps``, ``v`` or ``x0`` (diffusers' and lucidrains' names
            are accepted too). None: the schedule's (when read from a scheduler that declares one), else
            ``eps``. A value that contradicts the scheduler's is an error.
        dm_weight: per-timestep weight of the denoising term. ``None`` / ``"none"``: plain MSE of the
            output against its target (diffusers' training scripts); ``"eps"``: ``alpha_t^2``, i.e. the
            MSE of the implied noise (denoising-diffusion-pytorch's default weighting); or a ``(T,)``
            tensor of weights (e.g. lucidrains' ``diffusion.loss_weight``, min-SNR weights).
        lam_s_min: regularise only at noise levels ``s_t >= lam_s_min`` (lambda_t = 0 below; 0: at
            every t). The attack still runs on every sample.
        replays: ``free``: optimizer steps per batch (m >= 1).
        reg_frac: the share of each batch that gets the regulariser, in (0, 1] (module docstring).
    """

    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    mode: str = "adv"
    lam: float = 0.3
    lam_scale: str = "const"
    budget: Budget = field(default_factory=Budget)
    pgd_steps: int = 3
    step_size: float | None = None
    attack_target: str = "prediction"
    detach_clean: bool = False
    prediction: str | None = None
    dm_weight: str | torch.Tensor | None = None
    lam_s_min: float = 0.0
    replays: int = 2
    reg_frac: float = 1.0

    def __post_init__(self) -> None:
        self.schedule = as_schedule(self.schedule)
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if self.lam_scale not in LAM_SCALES:
            raise ValueError(f"unknown lam_scale {self.lam_scale!r}; choose one of {', '.join(LAM_SCALES)}")
        if not (isinstance(self.lam_s_min, (int, float)) and 0 <= self.lam_s_min < 1):
            raise ValueError(f"lam_s_min must be a noise level in [0, 1), got {self.lam_s_min!r}")
        if not (isinstance(self.reg_frac, (int, float)) and 0 < self.reg_frac <= 1):
            raise ValueError(f"reg_frac must be in (0, 1], got {self.reg_frac!r}")
        check_replays(self.replays)  # in every mode: the config is checked alike
        self._replay = Replay(self.replays) if self.mode == "free" else None
        if not (isinstance(self.pgd_steps, int) and self.pgd_steps >= 1):
            raise ValueError(f"pgd_steps must be an integer >= 1, got {self.pgd_steps!r}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"step_size must be > 0, got {self.step_size!r}")
        if self.attack_target not in TARGETS:
            raise ValueError(
                f"unknown attack target {self.attack_target!r}; choose one of {', '.join(TARGETS)}"
            )
        self.prediction = P.resolve_prediction(self.prediction, self.schedule.prediction)
        self._dm_table: torch.Tensor | None = None
        self._dm_cache: dict[torch.device, torch.Tensor] = {}
        self._check_dm_weight()

    def _check_dm_weight(self) -> None:
        w = self.dm_weight
        if w is None or (isinstance(w, str) and w in DM_WEIGHTS):
            return
        if isinstance(w, str):
            raise ValueError(
                f"unknown dm_weight {w!r}; choose one of {', '.join(DM_WEIGHTS)} or a (T,) tensor"
            )
        try:
            table = torch.as_tensor(
                w.detach().cpu() if isinstance(w, torch.Tensor) else w, dtype=torch.float64
            )
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"dm_weight must be None, a name or a (T,) tensor, got {type(w).__name__}"
            ) from None
        if tuple(table.shape) != (self.schedule.T,):
            raise ValueError(f"a dm_weight table needs shape ({self.schedule.T},) (one weight per timestep), "
                             f"got {tuple(table.shape)}")  # fmt: skip
        if not (torch.isfinite(table).all() and (table >= 0).all()):
            raise ValueError("dm_weight must be finite and >= 0")
        self._dm_table = table

    @property
    def attack_steps(self) -> int:
        """Ascent passes per training step (0 for ``ddpm``, ``rand`` and ``free``, whose ascent reuses
        the training backward)."""
        return {"ddpm": 0, "rand": 0, "free": 0, "pgd": self.pgd_steps}.get(self.mode, 1)

    def reg_count(self, batch_size: int) -> int:
        """Samples of a batch of ``batch_size`` that get the regulariser: ``ceil(reg_frac * B)``."""
        return min(batch_size, max(1, math.ceil(self.reg_frac * batch_size - 1e-9)))

    def flop_units(self, batch_size: int | None = None) -> float:
        """Forward-pass equivalents per image of one step (one replay in ``free``; a backward counts 2):
        3 for ddpm, ``3 + (2k + 3) n / B`` with ``k`` ascent passes (``n / B = reg_frac`` without a batch
        size). ``free``'s input gradient comes with the training backward: counted as 0 (it adds the
        gradient of the first layer's input, a small part of one backward)."""
        if self.mode == "ddpm":
            return 3.0
        f = self.reg_frac if batch_size is None else self.reg_count(batch_size) / batch_size
        return 3.0 + (2 * self.attack_steps + 3) * f

    @property
    def replay(self) -> Replay | None:
        """``free``: the replay state (position, kept batch and perturbation); None for other modes."""
        return self._replay

    def state_dict(self) -> dict:
        """What a checkpoint must hold to continue the objective exactly: ``free``'s replay state
        (``{}`` for the other modes, which keep nothing between calls)."""
        return {"replay": self._replay.state_dict()} if self._replay is not None else {}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        if self._replay is not None and "replay" in state:
            self._replay.load_state_dict(state["replay"], device)

    @property
    def step_multiple(self) -> float:
        if self.step_size is not None:
            return self.step_size
        k = self.attack_steps
        return 1.25 if k <= 1 else 2.5 / k

    def lam_per_sample(self, radius: torch.Tensor, numel: int, s: torch.Tensor | None = None):
        """lambda_t per sample (a float when it is one number): ``lam``, over ``r_elem^2`` with
        ``lam_scale="radius"``, and 0 where ``s < lam_s_min``."""
        if self.lam_scale == "const":
            lam = float(self.lam)
        else:
            r_elem = radius / math.sqrt(numel) if self.budget.norm == "l2" else radius
            lam = self.lam / r_elem.square()
        if self.lam_s_min > 0 and s is not None:
            lam = (s >= self.lam_s_min).float() * lam
        return lam

    def prepare(self, device: torch.device | str) -> None:
        """Build every table a call reads on ``device`` (the schedule's and a ``dm_weight`` table's), so
        that the calls themselves copy nothing from the host (a host-to-device copy synchronises, and a
        CUDA graph cannot hold one). :class:`fastat.step.engine.StepEngine` calls it when it is built; without
        it the first call on a device builds them."""
        device = torch.device(device)
        self.schedule.tables(device)
        if self._dm_table is not None:
            self._dm_on(device)

    def _dm_on(self, device: torch.device) -> torch.Tensor:
        table = self._dm_cache.get(device)
        if table is None:  # one copy per device
            table = self._dm_cache[device] = self._dm_table.to(device=device, dtype=torch.float32)
        return table

    def dm_weight_at(self, t: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor | float:
        """Per-sample weight of the denoising term at timesteps ``t`` (1.0 when unweighted)."""
        if self._dm_table is not None:
            return self._dm_on(t.device)[t]
        if self.dm_weight == "eps":
            return P.regulariser_coeffs(self.prediction, a, s)[1]
        return 1.0

    def __call__(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], Any],
        x0: torch.Tensor | None,
        generator: torch.Generator | None = None,
        attack_model: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> ATOutput:
        """The AT loss of ``model`` on the clean batch ``x0`` (all randomness from ``generator``).

        ``model(x, t)`` may return a tensor, a tuple/list (first element) or an object with ``.sample``.
        ``attack_model``: the same function as ``model`` for the attack's forwards (default: ``model``);
        the fast step passes a compiled copy whose parameters are detached, so that the attack's
        backward computes the input gradient only. ``free``: ``x0=None`` replays the kept batch.
        """
        if x0 is None and self._replay is None:
            raise ValueError(
                "x0 must be a floating tensor of shape (B, ...) (None replays, in mode free only)"
            )
        if x0 is not None and (not isinstance(x0, torch.Tensor) or x0.dim() < 2):
            raise ValueError("x0 must be a floating tensor of shape (B, ...)")
        if x0 is not None and x0.shape[0] == 0:  # a shape, not a value: no host sync
            raise ValueError(f"x0 is an empty batch (shape {tuple(x0.shape)}); B must be >= 1")
        if x0 is not None and x0.dtype not in ops.FLOAT_DTYPES:
            raise TypeError(
                f"x0 must be float32, bfloat16 or float16 (the fused ops compute in float32), got {x0.dtype}"
            )
        with ops.trusted_values():  # radii and weights are built here: no host sync to check them
            return self._loss(model, model if attack_model is None else attack_model, x0, generator)

    def _loss(self, model, attack_model, x0, generator: torch.Generator | None) -> ATOutput:
        replay = self._replay
        if replay is not None:  # free: a fresh step keeps what it draws, a replay uses what was kept
            fresh = replay.begin(x0)
            x0 = replay.keep("x0", fresh, x0)
        dev, B = x0.device, x0.shape[0]
        gdev = generator.device if generator is not None else torch.device("cpu")
        t = self.schedule.sample_t(B, generator, device=dev)
        # One 63-bit seed per call from the generator (a device tensor: no host sync on CUDA); the
        # noise kernel draws eps and the random start w0 from it and writes x_t and x_t + s*w0.
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=gdev).to(dev)
        if replay is not None:  # the same seed gives the same eps (and w0) on every replay
            t, seed = replay.keep("t", fresh, t), replay.keep("seed", fresh, seed)
        a, s = self.schedule.coeffs(t)
        numel = math.prod(x0.shape[1:])
        radius = self.budget.radius(s, numel)
        x_t, x_adv, eps, w = ops.noise_inject(x0, a, s, radius if self.budget.norm == "linf" else 0.0, seed)
        # The model's output in its own parameterisation, and what it is trained to output.
        out = P.model_output(model(x_t, t)).to(eps.dtype)
        target = P.target(self.prediction, x0, eps, a, s)
        dm_weight = self.dm_weight_at(t, a, s)
        if self.mode == "ddpm":
            dm = ops.ddpm_loss(out, target, dm_weight)
            return ATOutput(dm, {"loss_dm": dm.detach(), "reg": torch.zeros_like(dm.detach())})

        # The regulariser runs on the first n samples (reg_frac); views, no copies.
        n = self.reg_count(B)
        head, tail = slice(0, n), slice(n, None)
        x_t_n, t_n, a_n, s_n, r_n = (_rows(v, head) for v in (x_t, t, a, s, radius))
        x_adv, w = _rows(x_adv, head), _rows(w, head)
        if self.budget.norm == "l2":  # uniform in the ball; the noise kernel draws box starts only
            w = self.budget.random_start(r_n, (n, *x0.shape[1:]), generator).to(dev, x0.dtype)
            x_adv = ops.q_sample(x_t_n, 1.0, s_n, w)
        eps_clean = self._eps(out[head], x_t_n, a_n, s_n)
        j_start, target_j = None, self.attack_target
        if replay is not None:
            w = replay.keep("w", fresh, w)
            x_adv = ops.q_sample(x_t_n, 1.0, s_n, w).detach().requires_grad_(True)
            x_adv.register_hook(self._ascent_hook(w, r_n, replay.buffer("w")))
            target_j = "equivariance"
        elif self.attack_steps:
            read = None
            if self.prediction != "eps":
                read = lambda raw, x: self._eps(P.model_output(raw), x, a_n, s_n)  # noqa: E731
            w, x_adv, j_start = pgd_attack(
                attack_model, x_t_n, t_n, s_n, eps_clean, w, r_n, self.step_multiple * r_n,
                self.attack_steps, self.budget.norm, self.attack_target, x_start=x_adv, output=read,
            )  # fmt: skip
        out_adv = P.model_output(model(x_adv, t_n)).to(eps.dtype)
        # The eps-space equivariance residual, written on the outputs: lam alpha^2 ||o~ - o - c_w w||^2.
        c_w, lam_factor = P.regulariser_coeffs(self.prediction, a_n, s_n, equivariant=self.mode != "inv")
        lam = self.lam_per_sample(r_n, numel, s_n) * lam_factor
        w_c = _scaled(w, c_w)
        if n == B:
            loss, dm = ops.at_loss_parts(
                out, out_adv, target, w_c, lam, detach_clean=self.detach_clean, dm_weight=dm_weight
            )
        else:  # (n/B) * [dm over n + (B/n) * reg over n] + ((B-n)/B) * dm over the rest: dm is a mean over B
            loss_n, dm_n = ops.at_loss_parts(
                out[head], out_adv, target[head], w_c, lam * (B / n), detach_clean=self.detach_clean,
                dm_weight=_rows(dm_weight, head),
            )  # fmt: skip
            dm_rest = ops.ddpm_loss(out[tail], target[tail], _rows(dm_weight, tail))
            loss = loss_n * (n / B) + dm_rest * ((B - n) / B)
            dm = dm_n * (n / B) + dm_rest.detach() * ((B - n) / B)

        with torch.no_grad():
            j_end = attack_objective(self._eps(out_adv, x_adv, a_n, s_n), eps_clean, w, target_j)
            stats = {
                "loss_dm": dm,
                "reg": loss.detach() - dm,
                "w_abs": w.abs().float().mean(),
                "radius": radius.mean(),
                "j": j_end.mean(),
            }
            if replay is not None:  # J(w_k) / J(w_0 of this batch, measured at its replay 0)
                j0 = replay.keep("j0", fresh, j_end.mean())
                stats["gain"] = j_end.mean() / j0.clamp_min(1e-30)
                replay.end()
            elif j_start is not None:
                stats["gain"] = j_end.mean() / j_start.mean().clamp_min(1e-30)
        return ATOutput(loss, stats)

    def _ascent_hook(self, w: torch.Tensor, radius: torch.Tensor, w_next: torch.Tensor):
        """``free``: the hook on the perturbed input ``x~`` that turns the training backward's gradient
        into the next replay's perturbation, written into the kept ``w_next`` (no host read: a captured
        graph records it with the backward)."""
        alpha = self.step_multiple * radius
        norm = self.budget.norm

        def ascend(grad: torch.Tensor) -> None:  # may run on autograd's device thread: trust it there too
            with torch.no_grad(), ops.trusted_values():
                g = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad)).to(w.dtype)
                w_next.copy_(ops.pgd_step(w, g, radius, alpha, norm))

        return ascend

    def _eps(self, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The noise estimate implied by the output ``out`` at input ``x`` (``out`` itself for eps)."""
        if self.prediction == "eps":
            return out
        return P.to_eps(self.prediction, out.float(), x.float(), a, s).to(out.dtype)


def _rows(v: torch.Tensor | float, rows: slice) -> torch.Tensor | float:
    """``v[rows]`` of a per-sample tensor (a view); a scalar as it is."""
    return v[rows] if isinstance(v, torch.Tensor) else v


def _scaled(w: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor:
    """``c * w`` with a per-sample ``c`` (float32 arithmetic, ``w``'s dtype); 1 and 0 without arithmetic."""
    if isinstance(c, float):
        if c == 1.0:
            return w
        if c == 0.0:
            return torch.zeros_like(w)
        return (w.float() * c).to(w.dtype)
    return (w.float() * per_sample(c, w)).to(w.dtype)
