"""The training step, eager or fast, behind one interface.

    engine = StepEngine(model, objective, generator=g, lr=2e-4, fast=True)
    stats = engine.step(x0, lr)          # device tensors; engine.optimizer / engine.ema for checkpoints

A step is: ATObjective (noise kernel -> model -> attack gradient -> PGD kernel -> model -> fused loss)
-> backward -> gradient clipping -> AdamW -> EMA (``torch._foreach_lerp_``).

``fast=False`` runs it eagerly: the reference. ``fast=True`` computes the same function faster:

- the model is ``torch.compile``d; the attack's forwards go through a second compiled copy whose
  parameters are detached, so its backward computes the input gradient only (one compiled backward
  would otherwise compute, and drop, every weight gradient too);
- on CUDA the whole step is captured once in a CUDA graph and replayed: the batch is copied into a
  static input buffer, the learning rate and the EMA weight live in device tensors (filled before each
  replay: no recompile, no re-capture), AdamW is fused and capturable, and the random generators are
  registered with the graph so that every replay draws new numbers. The first ``warmup_steps`` steps
  run eagerly on a side stream (compilation, autotuning, lazy allocations), then the step is captured.
  If compilation or capture fails, the engine falls back to the eager step and says why.

On CPU ``fast=True`` means compiled, without graphs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import nn

from fastat.ema import EMA
from fastat.objective import ATObjective

__all__ = ["DetachedParams", "StepEngine"]


class DetachedParams(nn.Module):
    """``model`` with its parameters detached: the same function, but a backward through it computes
    input gradients only. A module (not a closure) so the attack still finds batch-norm layers."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        return torch.func.functional_call(self.model, params, (x, t))


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
        precision: str = "fp32",  # "fp32" | "bf16" (autocast)
        fast: bool = False,
        compile_mode: str | None = None,  # torch.compile mode (None: the default)
        warmup_steps: int = 3,  # eager steps before the CUDA graph is captured
        log: Callable[[str], None] = print,
    ) -> None:
        self.model, self.objective, self.generator = model, objective, generator
        self.device = next(model.parameters()).device
        self.clip, self.precision, self.fast = clip, precision, fast
        self.log = log
        cuda = self.device.type == "cuda"
        self.use_graph = fast and cuda
        self.warmup_steps = warmup_steps
        # A tensor learning rate can change between replays of a captured step.
        self._lr = torch.tensor(float(lr), device=self.device) if self.use_graph else None
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=self._lr if self._lr is not None else lr, betas=tuple(betas), eps=eps,
            weight_decay=weight_decay, fused=cuda, capturable=self.use_graph,
        )  # fmt: skip
        self.ema = EMA(model, ema_decay, ema_warmup)
        self._ema_w = torch.zeros((), device=self.device) if self.use_graph else None
        self.forward, self.attack_forward = model, model
        if fast:
            try:
                self.forward = torch.compile(model, mode=compile_mode)
                self.attack_forward = torch.compile(DetachedParams(model), mode=compile_mode)
            except Exception as e:  # noqa: BLE001 - any failure to compile means: run eagerly
                self._fallback(f"torch.compile failed ({type(e).__name__}: {e})")
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_x0: torch.Tensor | None = None
        self._static_stats: dict[str, torch.Tensor] | None = None
        self._side = torch.cuda.Stream(self.device) if self.use_graph else None
        self.steps_done = 0
        self.capture_seconds: float | None = None

    # -- public ---------------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """``eager``, ``compiled`` or ``compiled+graph`` (what the next steps run)."""
        if not self.fast:
            return "eager"
        return "compiled+graph" if self.use_graph else "compiled"

    def step(self, x0: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
        """One optimisation step on the batch ``x0`` at learning rate ``lr``: detached device stats."""
        self.steps_done += 1
        if self.use_graph and self._graph is None and self.steps_done > self.warmup_steps:
            self._capture(x0)
        if self._graph is not None:
            self._static_x0.copy_(x0)
            self._lr.fill_(lr)
            self._ema_w.fill_(1.0 - self.ema.current_decay())
            self._graph.replay()
            self.ema.num_updates += 1
            return self._static_stats
        self._set_lr(lr)
        ctx = torch.cuda.stream(self._side) if self._side is not None else contextlib.nullcontext()
        if self._side is not None:
            self._side.wait_stream(torch.cuda.current_stream(self.device))
        with ctx:
            self.optimizer.zero_grad(set_to_none=True)
            if self.fast and self.steps_done == 1:
                stats = self._first_compiled_step(x0)
            else:
                stats = self._body(x0, 1.0 - self.ema.current_decay())
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        self.ema.num_updates += 1
        return stats

    def load_optimizer_state(self, state: dict) -> None:
        """Load an optimizer state dict (from either kind of engine) and keep the learning rate a device
        tensor where a captured graph reads it (``load_state_dict`` replaces the param groups' values)."""
        self.optimizer.load_state_dict(state)
        if self._lr is not None:
            lr = self.optimizer.param_groups[0]["lr"]
            self._lr = torch.tensor(float(lr), device=self.device)
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr

    # -- internals ------------------------------------------------------------------------------------

    def _set_lr(self, lr: float) -> None:
        if self._lr is not None:
            self._lr.fill_(lr)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def _autocast(self):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        # A captured graph must not use autocast's weight cache (it would hold stale casts).
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not self.use_graph)

    def _body(self, x0: torch.Tensor, ema_weight: float | torch.Tensor) -> dict[str, torch.Tensor]:
        """The step itself (gradients must be None on entry); what a CUDA graph captures."""
        with self._autocast():
            out = self.objective(self.forward, x0, self.generator, attack_model=self.attack_forward)
        out.loss.backward()
        stats = {"loss": out.loss.detach(), **out.stats}
        if self.clip > 0:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
        self.optimizer.step()
        self.ema.lerp_(self.model, ema_weight)
        return stats

    def _first_compiled_step(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compilation happens on the first call: if it fails, say why and redo the step eagerly
        (weights are only touched by the optimizer step at the end, so nothing was half-applied)."""
        snapshot = self.generator.get_state()
        try:
            return self._body(x0, 1.0 - self.ema.current_decay())
        except Exception as e:  # noqa: BLE001 - the eager retry raises again if the step itself is wrong
            self._fallback(f"the compiled step failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            self.optimizer.zero_grad(set_to_none=True)
            self.generator.set_state(snapshot)
            return self._body(x0, 1.0 - self.ema.current_decay())

    def _capture(self, x0: torch.Tensor) -> None:
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        self._static_x0 = x0.detach().clone()
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates .grad inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            if self.generator.device.type == "cuda":
                graph.register_generator_state(self.generator)
            with torch.cuda.graph(graph):
                self._static_stats = self._body(self._static_x0, self._ema_w)
        except Exception as e:  # noqa: BLE001 - capture can fail in many ways; the eager step still works
            self.optimizer.zero_grad(set_to_none=True)
            self._static_stats = self._static_x0 = None
            self._fallback(f"CUDA-graph capture failed ({type(e).__name__}: {str(e).splitlines()[0]})",
                           keep_compiled=True)  # fmt: skip
            return
        self._graph = graph
        self.capture_seconds = time.perf_counter() - t0

    def _fallback(self, why: str, keep_compiled: bool = False) -> None:
        self.log(f"fastat: {why}; falling back to the {'compiled' if keep_compiled else 'eager'} step")
        self.use_graph = False
        self._side = None
        if not keep_compiled:
            self.fast = False
            self.forward = self.attack_forward = self.model
