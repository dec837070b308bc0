"""The training step, eager or fast, behind one interface.

    engine = StepEngine(model, objective, generator=g, lr=2e-4, fast=True)
    stats = engine.step(x0 if engine.wants_batch else None, lr)   # device tensors, no host sync

A step: objective (noise -> model -> attack -> model -> fused loss) -> backward -> gradient norm and
clipping -> fused AdamW -> EMA. Every mode runs the same body (:meth:`StepEngine._body`), the one a CUDA
graph captures; a non-finite loss or gradient norm skips the update on the device (``found_inf``).
``fast=True`` compiles the model and, on CUDA, captures the step; on failure it falls back and says why.
The engine asks the objective what it needs (``wants_batch``, ``step_done``, ``host_state``,
``state_dict``; all optional): it knows no mode. Precision, data parallel, capture and the skip are
explained in docs/DESIGN.md ("Step engine"). ``grad_accum = K`` runs the objective on K micro-batches
(``micro=(k, K)``), one backward each, then the all-reduce, unscale and AdamW once per step. A
:class:`fastat.data.Labelled` batch (class-conditional training) hands its labels ``y`` to the objective.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from fastat.at.objective import ATObjective
from fastat.data.loader import Labelled
from fastat.step.capture import CaptureFailed, CudaGraphs, capture_safely
from fastat.step.ema import EMA
from fastat.utils.compile_cache import guard_autograd_cache

__all__ = ["PRECISIONS", "DetachedParams", "StepEngine"]

PRECISIONS = ("fp32", "bf16", "fp16")


class DetachedParams(nn.Module):
    """``model`` with its parameters detached: the same function, but a backward through it computes
    input gradients only. A module (not a closure) so the attack still finds batch-norm layers."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, *cond) -> torch.Tensor:
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        return torch.func.functional_call(self.model, params, (x, t, *cond))


def grad_norm_(params: list[nn.Parameter], clip: float) -> torch.Tensor:
    """Total L2 norm of the gradients (a 0-dim device tensor); with ``clip > 0`` the gradients are also
    scaled down to at most that norm. No host sync, even for a non-finite norm."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


def _reset_scaler_step(scaler: torch.amp.GradScaler) -> None:
    """Forget what ``scaler`` recorded for the current step (an ``unscale_``'s found-inf), as its ``update``
    does at the end, without touching the scale or the growth tracker (torch has no public call)."""
    from torch.amp.grad_scaler import _refresh_per_optimizer_state

    scaler._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)


class StepEngine:
    """Owns the optimizer, the EMA and (fast path) the compiled model and the captured graph."""

    def __init__(
        self,
        model: nn.Module,  # eps-model on its device, in train mode
        objective: ATObjective,  # noise, attack and loss
        *,
        generator: torch.Generator,  # the objective's randomness, on the model's device
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip: float = 1.0,  # gradient-norm clipping (0: off)
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        precision: str = "fp32",  # "fp32" | "bf16" (autocast) | "fp16" (autocast + GradScaler)
        fast: bool = False,  # torch.compile the model
        graph: bool | None = None,  # capture the step in a CUDA graph (None: when fast on CUDA)
        compile_mode: str | None = None,  # torch.compile mode (None: the default; with the graph on,
        # "reduce-overhead" / "max-autotune" lose their Inductor CUDA graphs: see _compile_mode)
        warmup_steps: int = 3,  # uncaptured steps before the CUDA graph is captured (>= 1)
        log: Callable[[str], None] = print,
        prepare_batch: Callable | None = None,  # loader batch -> float x0, at the start of the step
        reduce_grads: Callable[[torch.Tensor], torch.Tensor] | None = None,  # data parallel: see below
        ranks=None,  # data parallel: the DistContext (all_true, broadcast_) the ranks agree through
        grad_accum: int = 1,  # micro-batches per step (gradient accumulation): see _body
    ) -> None:
        if not (isinstance(grad_accum, int) and not isinstance(grad_accum, bool) and grad_accum >= 1):
            raise ValueError(f"grad_accum must be an integer >= 1, got {grad_accum!r}")
        self.grad_accum = grad_accum
        self.model, self.objective, self.generator = model, objective, generator
        self.prepare_batch, self.reduce_grads, self.ranks = prepare_batch, reduce_grads, ranks
        self.device = next(model.parameters()).device
        if hasattr(objective, "prepare"):  # its tables on the device now: the step copies nothing in
            objective.prepare(self.device)
        # What the step asks the objective beyond calling it (any callable works; ATObjective has all):
        # whether the next step wants a batch, and the host's record of each step (see step_done).
        self._wants_batch = getattr(objective, "wants_batch", lambda: True)
        self._step_done = getattr(objective, "step_done", lambda replayed=None: None)
        self._host_state = getattr(objective, "host_state", lambda: None)
        self.clip, self.precision, self.fast = clip, precision, fast
        self.log = log
        cuda = self.device.type == "cuda"
        self.use_graph = (fast and cuda) if graph is None else bool(graph)
        if self.use_graph and warmup_steps < 1:
            raise ValueError("warmup_steps must be >= 1 before a CUDA graph is captured")
        self.warmup_steps = warmup_steps
        self._graphs = CudaGraphs(self.device) if self.use_graph else None
        # Step inputs that live on the device, filled before each step (a captured graph reads them).
        self._lr = torch.full((), float(lr), device=self.device)
        self._ema_w = torch.zeros((), device=self.device)
        self.skip_streak = torch.zeros((), dtype=torch.int64, device=self.device)
        # fused: one kernel, and the found_inf argument that skips a non-finite step on the device
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=self._lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            fused=True, capturable=self.use_graph,
        )  # fmt: skip
        self.ema = EMA(model, ema_decay, ema_warmup)
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        # fp16: dynamic loss scaling; its scale and growth tracker are device tensors updated in place
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.forward, self.attack_forward = model, model
        self._agree_compile = fast  # the ranks agree after the first step that every one compiled
        if fast:
            compile_mode = self._compile_mode(compile_mode)
            if (why := guard_autograd_cache(precision)) is not None:  # torch < 2.14 under autocast
                self.log(why)
            try:
                self.forward = torch.compile(model, mode=compile_mode, dynamic=False)
                self.attack_forward = torch.compile(DetachedParams(model), mode=compile_mode, dynamic=False)
            except Exception as e:  # noqa: BLE001 - any failure to compile means: run eagerly
                self._fallback(f"torch.compile failed ({type(e).__name__}: {e})")
        self._graph = None
        self._graph_host = None  # the objective's host_state() after the capture (a replay runs no Python)
        self._static_x0 = None  # the captured step's input: x0's structure, dtypes and shapes
        self._static_stats: dict[str, torch.Tensor] | None = None
        self._odd_batch_logged = False
        self._batch_fits = False  # whether the batch in use fits the captured graph (x0=None reuses it)
        self.steps_done = 0
        self.compile_seconds: float | None = None  # the first compiled step, compilation included
        self.capture_seconds: float | None = None

    # -- public ---------------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """``eager``, ``compiled``, ``compiled+graph`` or ``eager+graph`` (what the next steps run)."""
        base = "compiled" if self.fast else "eager"
        return base + "+graph" if self.use_graph else base

    @property
    def steps_per_batch(self) -> int:
        """Steps each batch is trained on: the objective's (``free``: its replays), else 1."""
        return getattr(self.objective, "steps_per_batch", 1)

    @property
    def wants_batch(self) -> bool:
        """Whether the next step starts a new batch; if not, pass ``None`` (the objective reuses the batch
        it kept on the device) or the same batch again. Asked of the objective: no device read."""
        return self._wants_batch()

    def objective_state_dict(self) -> dict:
        """The objective's state for a checkpoint (``{}`` when it keeps nothing between steps)."""
        return self.objective.state_dict() if hasattr(self.objective, "state_dict") else {}

    def load_objective_state(self, state: dict) -> None:
        """Continue the objective from a checkpoint (``free``: mid-batch too)."""
        if hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(state, self.device)

    @property
    def captured(self) -> bool:
        """Whether the step is captured (the next steps of the captured shape replay the graph)."""
        return self._graph is not None

    def step(self, x0, lr: float) -> dict[str, torch.Tensor]:
        """One optimisation step on the batch ``x0`` at learning rate ``lr``: detached device stats
        (``loss``, ``grad_norm``, ``skipped`` and the objective's). Once captured, every step returns the
        same tensors, rewritten by each replay: copy what you keep. ``x0=None`` on a step that does not
        want a batch (:attr:`wants_batch`) reuses the kept one."""
        if x0 is None and self.wants_batch:
            raise ValueError("x0 is None, but this step starts a new batch (see engine.wants_batch)")
        self.steps_done += 1
        self._lr.fill_(lr)
        self._ema_w.fill_(1.0 - self.ema.current_decay())
        if self.use_graph and self._graph is None and self.steps_done > self.warmup_steps and x0 is not None:
            self._capture(x0)  # a step without a batch waits for the next one (on every rank alike)
            if not self._everywhere(self._graph is not None) and self._graph is not None:
                self._drop_graph("the CUDA graph was not captured on every rank")
            replayed = None  # the capture ran the objective's Python: its host side is up to date
        else:
            replayed = self._graph_host
        if x0 is not None:
            self._batch_fits = self._graph is not None and self._fits_graph(x0)
        if self._graph is not None and self._batch_fits:
            if x0 is not None:
                tree_map(lambda dst, src: dst.copy_(src), self._static_x0, x0)
            self._graph.replay()
            self._done(replayed=replayed)
            return self._static_stats
        side = self._graphs is not None and self._graph is None  # warm-up before capture
        precheck = side and self.steps_done == self.warmup_steps
        with self._graphs.side_stream() if side else contextlib.nullcontext():
            with self._graphs.sync_check() if precheck else contextlib.nullcontext([]) as syncs:
                first_compiled = self.fast and self.compile_seconds is None
                stats = self._first_compiled_step(x0) if first_compiled else self._body(x0)
        agree_compile, self._agree_compile = self._agree_compile, False
        if agree_compile and self.ranks is not None and not self.ranks.all_true(self.fast):
            self._resync("the compiled step failed on another rank")
        if precheck and not self._everywhere(not syncs):
            where = syncs[0] if syncs else "on another rank"
            self._fallback(f"the step synchronises with the host ({where}); not capturing it",
                           keep_compiled=True)  # fmt: skip
        self._done()
        return stats

    def load_optimizer_state(self, state: dict) -> None:
        """Load an optimizer state dict (from either kind of engine), keeping the learning rate in the
        engine's device tensor (``load_state_dict`` replaces the param groups' values) and the engine's
        ``fused`` and ``capturable`` (a state saved on the CPU or uncaptured would turn capture off)."""
        flags = {k: self.optimizer.defaults[k] for k in ("fused", "capturable")}
        groups = [{**g, **flags} for g in state["param_groups"]]
        self.optimizer.load_state_dict({**state, "param_groups": groups})
        self._lr.fill_(float(self.optimizer.param_groups[0]["lr"]))
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr

    # -- internals ------------------------------------------------------------------------------------

    def _done(self, replayed=None) -> None:
        """The host's record of a step that ran: the EMA's warm-up count and the objective's (a graph
        replay runs no Python: ``replayed`` is the objective's host state after the capture)."""
        self.ema.num_updates += 1
        self._step_done(replayed)

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        # A captured graph must not use autocast's weight cache (it would hold stale casts).
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=not self.use_graph)

    def _compile_mode(self, mode: str | None) -> str | None:
        """``mode``, but with the engine's CUDA graph on, the modes that turn on Inductor's own CUDA graphs
        (which cannot run inside the engine's capture: it would fail and the step fall back) are mapped to
        the same mode without them: ``reduce-overhead`` to the default, ``max-autotune`` to
        ``max-autotune-no-cudagraphs``. Said once in the log."""
        mapped = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}
        if not self.use_graph or mode not in mapped:
            return mode
        instead = mapped[mode] or "the default mode"
        self.log(f"fastat: compile_mode {mode!r} turns on Inductor's CUDA graphs, which cannot run inside "
                 f"the engine's captured step; compiling with {instead} instead")  # fmt: skip
        return mapped[mode]

    def _body(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step itself; what a CUDA graph captures (the backward then allocates the gradients in the
        graph's memory pool)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.prepare_batch is not None and x0 is not None:
            x0 = self.prepare_batch(x0)
        labels = {}
        if isinstance(x0, Labelled):  # class-conditional: the labels go to every model call
            x0, labels = x0.x, {"y": x0.y}
        scale, K, loss = {}, self.grad_accum, None
        for k in range(K):  # grad_accum: the batch's K micro-batches, their gradients summed in .grad
            micro = labels if K == 1 else {"micro": (k, K), **labels}  # whole-batch draws at k = 0
            with self._autocast():
                out = self.objective(self.forward, x0, self.generator, attack_model=self.attack_forward,
                                     **micro)  # fmt: skip
            loss = out.loss.detach() if loss is None else loss + out.loss.detach()
            if self.scaler is None:
                out.loss.backward()
            else:  # fp16: scaled backward, then the true gradients back (non-finite ones show in the norm)
                self.scaler.scale(out.loss).backward()
        if self.scaler is not None:
            scale["loss_scale"] = self.scaler._get_scale_async().clone()  # the device tensor: no host read
        # once per step, after the last micro-batch: the all-reduce, the unscale, the optimizer step
        if self.reduce_grads is not None:  # data parallel: gradients (and loss) averaged over the ranks;
            loss = self.reduce_grads(loss)  # still scaled, so every rank's scaler sees the same overflow
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = grad_norm_(list(self.model.parameters()), self.clip)
        found_inf = torch.logical_not(torch.isfinite(loss) & torch.isfinite(norm)).float()
        self.optimizer.found_inf = found_inf  # read by fused AdamW: 1.0 skips the whole update
        self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()  # in place: backs off after an overflow, grows after good steps
        self.ema.lerp_(self.model, self._ema_w * (1.0 - found_inf))
        self.skip_streak.add_(1).mul_(found_inf.to(torch.int64))
        return {"loss": loss, **out.stats, "grad_norm": norm, "skipped": found_inf, **scale}

    def _first_compiled_step(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compilation happens on the first call: if it fails, say why and redo the step eagerly
        (weights are only touched by the optimizer step at the end, so nothing was half-applied)."""
        snapshot, kept = self.generator.get_state(), self.objective_state_dict()
        t0 = time.perf_counter()
        try:
            stats = self._body(x0)
        except Exception as e:  # noqa: BLE001 - the eager retry raises again if the step itself is wrong
            self._fallback(f"the compiled step failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            self.generator.set_state(snapshot)
            if self.scaler is not None:  # fp16: forget an unscale_ of the failed step (it would raise again)
                _reset_scaler_step(self.scaler)
            if kept:  # what the objective keeps between steps, as it was (it counts the step in _done)
                self.load_objective_state(kept)
            return self._body(x0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_seconds = time.perf_counter() - t0
        return stats

    def _fits_graph(self, x0) -> bool:
        (got, spec), (want, spec_s) = tree_flatten(x0), tree_flatten(self._static_x0)
        same = spec == spec_s and all(
            (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
            for a, b in zip(got, want, strict=True)
        )
        if same:
            return True
        if not self._odd_batch_logged:
            self._odd_batch_logged = True
            self.log(f"fastat: a batch of shape {tuple(got[0].shape)} does not fit the captured step "
                     f"({tuple(want[0].shape)}); such batches run uncaptured")  # fmt: skip
        return False

    def _capture(self, x0: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self._graphs.synchronize()
        self._static_x0 = tree_map(lambda t: t.detach().clone(), x0)
        try:
            self._graph, self._static_stats = capture_safely(
                self._graphs, lambda: self._body(self._static_x0), [self.generator]
            )
        except CaptureFailed as e:  # generators restored; CaptureError (they could not be) propagates
            self.optimizer.zero_grad(set_to_none=True)
            self._static_stats = self._static_x0 = None
            self._fallback(f"CUDA-graph capture failed ({e})", keep_compiled=True)
            return
        self._graph_host = self._host_state()
        self.capture_seconds = time.perf_counter() - t0

    def _everywhere(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (data parallel: a collective, so every rank asks at the
        same step), so that all ranks run the same kind of step."""
        return bool(flag) if self.ranks is None else self.ranks.all_true(flag)

    def _drop_graph(self, why: str) -> None:
        self._graph = self._static_stats = self._static_x0 = None
        self._fallback(why, keep_compiled=True)

    def _resync(self, why: str) -> None:
        """Some ranks ran their first step compiled and others eagerly (same function, other rounding):
        all go eager, with rank 0's weights, EMA and optimizer state."""
        if self.fast:
            self._fallback(why)
        self.ranks.broadcast_(self.model, self.ema.module, self.optimizer)

    def _fallback(self, why: str, keep_compiled: bool = False) -> None:
        kind = "compiled" if keep_compiled and self.fast else "eager"
        self.log(f"fastat: {why}; falling back to the {kind} step")
        self.use_graph = False
        self._graphs = None
        if not keep_compiled:
            self.fast = False
            self.forward = self.attack_forward = self.model
