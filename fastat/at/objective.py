"""The equivariant adversarial-training objective (SPEC section 1) for any denoiser ``model(x, t)``.

    objective = ATObjective(mode="adv")                    # an eps-model, fastat's schedule
    objective = ATObjective(schedule=ddpm_scheduler, prediction="v")   # a diffusers / lucidrains setup
    out = objective(model, x0, generator)                  # draws t, eps, w; attacks; returns the loss
    out.loss.backward()

    L_AT = mean||eps_theta(x_t) - eps||^2 + lambda_t mean||eps_theta(x_t + s_t w) - (eps_theta(x_t) + w)||^2

``w`` by mode: ``ddpm`` none (one forward), ``rand`` uniform in the budget, ``adv`` FGSM, ``pgd`` k
steps, ``inv`` as adv with the target ignoring w, ``free`` minibatch replay (the ascent reuses the
training backward). The loss is a few small callables (draw, regularised rows, perturbation, loss,
gain). ``reg_frac``, v/x0 models, ``free``'s derivation and the cost model: docs/DESIGN.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from fastat.at import ops
from fastat.at import prediction as P
from fastat.at.attack import TARGETS, attack_objective, pgd_attack
from fastat.at.budget import Budget
from fastat.at.draws import Drawn, Noised, labelled
from fastat.at.draws import rows as _rows
from fastat.at.draws import scaled as _scaled
from fastat.at.draws import share as _share
from fastat.at.replay import Replay, check_replays
from fastat.at.schedule import NoiseSchedule, as_schedule
from fastat.at.seeding import generator_device
from fastat.utils.checks import is_number, must, unknown

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
        mode: one of ``ddpm | rand | adv | pgd | inv | free`` (docs/DESIGN.md, "Attack").
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
        reg_frac: the share of each batch that gets the regulariser, in (0, 1] (docs/DESIGN.md, "Loss").
        p_uncond: class-conditional calls (``y`` given): the share of labels dropped to ``-1`` (the null
            label: the unconditional model of classifier-free guidance), drawn per sample.
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
    p_uncond: float = 0.1

    def __post_init__(self) -> None:
        # The rules of every setting live here (SettingError names it; the config adds key and flag).
        self.schedule = as_schedule(self.schedule)
        if self.mode not in MODES:
            raise unknown("mode", self.mode, MODES)
        if not (is_number(self.lam) and 0 <= self.lam <= 1e4):  # the regulariser is O(1): more drowns the loss
            raise must("lam", "a finite number in [0, 1e4]", self.lam)
        if self.lam_scale not in LAM_SCALES:
            raise unknown("lam_scale", self.lam_scale, LAM_SCALES)
        if not (is_number(self.lam_s_min) and 0 <= self.lam_s_min < 1):
            raise must("lam_s_min", "a noise level in [0, 1)", self.lam_s_min)
        if not (is_number(self.reg_frac) and 0 < self.reg_frac <= 1):
            raise must("reg_frac", "a fraction in (0, 1]", self.reg_frac)
        if not (is_number(self.p_uncond) and 0 <= self.p_uncond < 1):
            raise must("p_uncond", "a share in [0, 1)", self.p_uncond)
        check_replays(self.replays)  # in every mode: the config is checked alike
        self._replay = Replay(self.replays) if self.mode == "free" else None
        if isinstance(self.pgd_steps, bool) or not (isinstance(self.pgd_steps, int) and self.pgd_steps >= 1):
            raise must("pgd_steps", "an integer >= 1", self.pgd_steps)
        if self.step_size is not None and not (is_number(self.step_size) and self.step_size > 0):
            raise must("step_size", "a finite number > 0 (or None: the default)", self.step_size)
        if self.attack_target not in TARGETS:
            raise unknown("attack_target", self.attack_target, TARGETS, display="attack target")
        self.prediction = P.resolve_prediction(self.prediction, self.schedule.prediction)
        self._dm_table: torch.Tensor | None = None
        self._dm_cache: dict[torch.device, torch.Tensor] = {}
        self._drawn: Drawn | None = None  # micro-batches: the batch's draws, kept for calls 1..K-1
        self._acc: dict[str, torch.Tensor] = {}  # ... and its statistics so far
        self._check_dm_weight()

    def _check_dm_weight(self) -> None:
        w = self.dm_weight
        if w is None or (isinstance(w, str) and w in DM_WEIGHTS):
            return
        if isinstance(w, str):
            raise unknown("dm_weight", w, DM_WEIGHTS, also=" or a (T,) tensor")
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

    # -- what StepEngine asks (free keeps a batch across steps; the other modes keep nothing) --------

    @property
    def steps_per_batch(self) -> int:
        """Steps each batch is trained on: ``replays`` in ``free``, else 1."""
        return self._replay.m if self._replay is not None else 1

    def wants_batch(self) -> bool:
        """Whether the next call starts a new batch: always, but on ``free``'s replays 1..m-1 (the host's
        count of the steps the engine reported with :meth:`step_done`; no device read)."""
        return self._replay is None or self._replay.wants_batch()

    def step_done(self, replayed: Any = None) -> None:
        """Count a step on the host. ``replayed``: the step was a CUDA-graph replay, which runs no Python;
        pass the :meth:`host_state` taken after its capture, so that the objective's host side follows."""
        if self._replay is not None:
            self._replay.step_done(replayed)

    def host_state(self) -> Any:
        """What the last call left on the host (``free``: which batch shape's replay state is in use)."""
        return self._replay.key if self._replay is not None else None

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
        micro: tuple[int, int] | None = None,
        y: torch.Tensor | None = None,
    ) -> ATOutput:
        """The AT loss of ``model`` on the clean batch ``x0`` (all randomness from ``generator``).

        ``model(x, t)`` may return a tensor, a tuple/list (first element) or an object with ``.sample``.
        ``attack_model``: the same function as ``model`` for the attack's forwards (default: ``model``);
        the fast step passes a compiled copy whose parameters are detached, so that the attack's
        backward computes the input gradient only. ``free``: ``x0=None`` replays the kept batch.

        ``micro=(k, K)`` (gradient accumulation): the k-th of K micro-batches (rows ``k*B//K`` to
        ``(k+1)*B//K``) of the whole batch ``x0``, passed to every call. Call 0 draws the randomness of
        the whole batch (the draws of one call without ``micro``) and keeps it for calls 1..K-1; each
        returns its rows' share of the loss, so the K losses (and gradients) add up to the batch's. The
        batch's statistics come with the last call (``{}`` before it).

        ``y``: class labels ``(B,)`` (class-conditional training): a share ``p_uncond`` is dropped to the
        null label ``-1``; every model call (clean, attack, perturbed) gets the label of its sample.
        ``free``'s replays (``x0=None``) keep the labels of their batch's fresh step, after its dropout.
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
        k, K = (0, 1) if micro is None else micro
        if k == 0:
            self._drawn, self._acc = None, {}
        elif self._drawn is None:
            raise ValueError(f"micro-batch {k} of {K} before micro-batch 0 of its batch")
        with ops.trusted_values():  # radii and weights are built here: no host sync to check them
            if k == 0:
                self._drawn = self._draw(x0, generator, y)
            B = self._drawn.z.n
            if not (isinstance(K, int) and isinstance(k, int) and 0 <= k < K <= B):
                self._drawn = None
                raise ValueError(f"micro must be (k, K) with 0 <= k < K <= the batch size {B}, got {micro}")
            attack = model if attack_model is None else attack_model
            loss, part = self._loss(model, attack, self._drawn, slice(k * B // K, (k + 1) * B // K))
            return ATOutput(loss, self._gather(part, k == K - 1))

    def _draw(self, x0, generator, y=None) -> Drawn:
        """The whole batch's randomness and what it makes: the noised batch, its regularised head and
        the labels after label dropout (the unconditional branch of classifier-free guidance)."""
        keep = self._keeper(x0)
        z = self._noised(x0, generator, keep)
        head = None if self.mode == "ddpm" else self._head(z, generator)
        if head is not None and self._replay is not None:  # free: the kept w (the last replay's ascent)
            head = replace(head, w=keep("w", head.w))
        if y is not None or (self._replay is not None and self._replay.kept("y")):
            u = torch.rand((z.n,), generator=generator, device=generator_device(generator)).to(z.x0.device)  # drawn on replays too
            y = keep("y", torch.where(u < self.p_uncond, -1, y) if y is not None else None)
        return Drawn(z, head, keep, y)

    def _loss(self, model, attack_model, d: Drawn, rows: slice) -> tuple[torch.Tensor, dict]:
        """L_AT of the batch's ``rows`` (their share of the batch's), piece by piece (docs/DESIGN.md,
        "Loss"), with their additive statistics."""
        B, z = d.z.n, d.z.rows(rows)
        m = z.n
        if d.y is not None:  # class-conditional: every call with its samples' labels
            model, attack_model = labelled(model, d.y[rows]), labelled(attack_model, d.y[rows])
        out = P.model_output(model(z.x_t, z.t)).to(z.eps.dtype)  # the model's own parameterisation
        target = P.target(self.prediction, z.x0, z.eps, z.a, z.s)  # what it is trained to output
        dm_weight = self.dm_weight_at(z.t, z.a, z.s)
        nh = 0 if d.head is None else min(max(d.head.n - rows.start, 0), m)  # regularised rows here
        if nh == 0:  # ddpm, or rows past the regularised head: the denoising term only
            dm = _share(ops.ddpm_loss(out, target, dm_weight), m / B)
            part = {"loss_dm": dm.detach(), "reg": torch.zeros_like(dm.detach())}
            return dm, part if d.head is None else {**part, "radius": _share(z.radius.mean(), m / B)}
        hrows = slice(rows.start, rows.start + nh)  # these rows of the batch's head
        h = d.head.rows(hrows)
        eps_clean = self._eps(out[:nh], h.x_t, h.a, h.s)
        w, x_adv, j_start = self._perturbation(h, eps_clean, attack_model, hrows)
        out_adv = P.model_output(model(x_adv, h.t)).to(z.eps.dtype)
        loss, dm = self._at_loss(out, out_adv, target, dm_weight, w, h, B, d.head.n)
        with torch.no_grad():
            j_end = attack_objective(self._eps(out_adv, x_adv, h.a, h.s), eps_clean, w, self._j_target).mean()
            f = nh / d.head.n  # of the head's means
            part = {"loss_dm": dm, "reg": loss.detach() - dm, "w_abs": _share(w.abs().float().mean(), f),
                    "radius": _share(z.radius.mean(), m / B), "j": _share(j_end, f)}  # fmt: skip
            if j_start is not None:
                part["_j_start"] = _share(j_start.mean(), f)
        return loss, part

    def _gather(self, part: dict, last: bool) -> dict[str, torch.Tensor]:
        """Add a micro-batch's statistics to the batch's; after the last, the batch's (with ``gain``)."""
        acc = self._acc
        for key, v in part.items():
            acc[key] = v if key not in acc else acc[key] + v
        if not last:
            return {}
        d, self._drawn, self._acc = self._drawn, None, {}
        if "j" in acc:
            with torch.no_grad():
                acc.update(self._gain(acc["j"], acc.pop("_j_start", None), d.keep))
        return acc

    def _keeper(self, x0: torch.Tensor | None) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """``keep(name, value)``: ``free`` keeps what a batch's fresh step draws and hands the kept value
        to its replays (:class:`fastat.at.replay.Replay`); the other modes keep nothing."""
        if self._replay is None:
            return lambda name, value: value
        fresh = self._replay.begin(x0)  # 0-dim bool on the device: no host read
        return lambda name, value: self._replay.keep(name, fresh, value)

    def _noised(self, x0, generator, keep) -> Noised:
        """Draw ``t`` and the noise seed and noise the batch: ``x_t = a x0 + s eps`` and the box random
        start ``x_t + s w0`` (linf; 0 for l2, drawn in :meth:`_head`)."""
        x0 = keep("x0", x0)
        dev, B = x0.device, x0.shape[0]
        gdev = generator_device(generator)
        t = self.schedule.sample_t(B, generator, device=dev)
        # One 63-bit seed per call from the generator (a device tensor: no host sync on CUDA); the
        # noise kernel draws eps and the random start w0 from it and writes x_t and x_t + s*w0.
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=gdev).to(dev)
        t, seed = keep("t", t), keep("seed", seed)  # free: the same seed, the same eps (and w0) on a replay
        a, s = self.schedule.coeffs(t)
        radius = self.budget.radius(s, math.prod(x0.shape[1:]))
        x_t, x_adv, eps, w = ops.noise_inject(x0, a, s, radius if self.budget.norm == "linf" else 0.0, seed)
        return Noised(x0, t, a, s, radius, x_t, x_adv, eps, w)

    def _head(self, z: Noised, generator) -> Noised:
        """The first ``n = ceil(reg_frac * B)`` rows, which get the regulariser (views, no copies); l2 draws
        their random start uniformly in the ball (the noise kernel draws box starts only)."""
        h = z.rows(slice(0, self.reg_count(z.n)))
        if self.budget.norm != "l2":
            return h
        w = self.budget.random_start(h.radius, tuple(h.x0.shape), generator).to(z.x0.device, z.x0.dtype)
        return replace(h, w=w, x_adv=ops.q_sample(h.x_t, 1.0, h.s, w))

    def _perturbation(self, h: Noised, eps_clean, attack_model, hrows: slice):
        """``(w, x~ = x_t + s w, J at the attack's start or None)`` on the regularised rows ``hrows`` of the
        head ``h``: ``free``'s kept ``w``, the ascent of ``adv``/``inv``/``pgd``, or the random start."""
        if self._replay is not None:
            w = h.w
            x_adv = ops.q_sample(h.x_t, 1.0, h.s, w).detach().requires_grad_(True)
            x_adv.register_hook(self._ascent_hook(w, h.radius, self._replay.buffer("w")[hrows]))
            return w, x_adv, None
        if not self.attack_steps:
            return h.w, h.x_adv, None
        read = None
        if self.prediction != "eps":  # the attack maximises the eps-space J
            read = lambda raw, x: self._eps(P.model_output(raw), x, h.a, h.s)  # noqa: E731
        return pgd_attack(
            attack_model, h.x_t, h.t, h.s, eps_clean, h.w, h.radius, self.step_multiple * h.radius,
            self.attack_steps, self.budget.norm, self.attack_target, x_start=h.x_adv, output=read,
        )  # fmt: skip

    def _at_loss(self, out, out_adv, target, dm_weight, w, h: Noised, B: int, n: int):
        """``(L_AT, its denoising term)`` of ``out``'s rows, whose first ``h.n`` are in the head (``n`` of
        the batch's ``B`` rows), as their share of the batch's. The eps-space equivariance residual is
        written on the outputs, ``lam alpha^2 ||o~ - o - c_w w||^2`` (:func:`P.regulariser_coeffs`)."""
        c_w, lam_factor = P.regulariser_coeffs(self.prediction, h.a, h.s, equivariant=self.mode != "inv")
        lam = self.lam_per_sample(h.radius, math.prod(h.x0.shape[1:]), h.s) * lam_factor
        m, nh, w_c = out.shape[0], h.n, _scaled(w, c_w)
        if nh == B:
            return ops.at_loss_parts(
                out, out_adv, target, w_c, lam, detach_clean=self.detach_clean, dm_weight=dm_weight
            )
        # (nh/B) * [dm over nh + (B/n) * reg over nh] + ((m-nh)/B) * dm over the rest: means over B
        head, tail = slice(0, nh), slice(nh, None)
        loss_n, dm_n = ops.at_loss_parts(
            out[head], out_adv, target[head], w_c, lam * (B / n), detach_clean=self.detach_clean,
            dm_weight=_rows(dm_weight, head),
        )  # fmt: skip
        if nh == m:
            return loss_n * (nh / B), dm_n * (nh / B)
        dm_rest = ops.ddpm_loss(out[tail], target[tail], _rows(dm_weight, tail))
        rest = (m - nh) / B
        return loss_n * (nh / B) + dm_rest * rest, dm_n * (nh / B) + dm_rest.detach() * rest

    @property
    def _j_target(self) -> str:
        """The ``J`` the statistics report: ``free`` ascends on the training loss's regulariser."""
        return "equivariance" if self._replay is not None else self.attack_target

    def _gain(self, j_end: torch.Tensor, j_start: torch.Tensor | None, keep) -> dict[str, torch.Tensor]:
        """``gain = J(w_end) / J(w_start)``; ``free``: over ``J(w_0)`` measured at the batch's replay 0
        (so 1 on a fresh step), and the replay position moves on."""
        if self._replay is not None:
            j0 = keep("j0", j_end)
            self._replay.end()
            return {"gain": j_end / j0.clamp_min(1e-30)}
        return {} if j_start is None else {"gain": j_end / j_start.mean().clamp_min(1e-30)}

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

