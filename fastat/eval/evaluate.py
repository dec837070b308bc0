"""Evaluate a trained run: what ``fastat eval --run DIR`` prints and writes to ``DIR/eval.json``.

    report = evaluate_run("runs/exp", n=1000)           # loads the newest checkpoint's EMA weights
    print(format_report(report))

Known distributions (``gmm2d``, ``plane3d``, ``subspace``): exact distance of the samples to the clean
support, sliced Wasserstein distance to fresh clean samples (beside its floor: two fresh clean sets), mode
balance (``gmm2d``), x0_hat PSNR against the exact posterior mean (``subspace``), and optionally the
trajectory attack. Images (known or not): noise level and memorisation of the samples beside the
training images' own (:mod:`fastat.eval.images`), FID/KID against held-out clean images (``--ref``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from fastat.at.sampling import SamplerSpec
from fastat.at.schedule import NoiseSchedule
from fastat.eval.draws import FLOOR, FRESH, PSNR_TIMESTEPS, MeasureSpec, draw_samples, run_attack
from fastat.eval.fid import FIDSpec
from fastat.eval.format import format_report, json_safe
from fastat.eval.images import image_metrics
from fastat.eval.memorization import memorization
from fastat.eval.metrics import (
    denoiser_psnr,
    distance_summary,
    mode_balance,
    sliced_wasserstein,
    support_distance,
)
from fastat.eval.noise import noise_summary
from fastat.eval.trajectory import AttackSpec

__all__ = [
    "EVAL_FILE",
    "PSNR_TIMESTEPS",
    "EvalOptions",
    "MeasureSpec",
    "evaluate_known",
    "evaluate_run",
    "format_report",
    "known_metrics",
    "load_run",
    "make_report",
]

EVAL_FILE = "eval.json"


@dataclass(frozen=True)
class EvalOptions:
    """The options of :func:`evaluate_run` (``fastat eval``): ``n``, ``seed``; ``sampler``/``steps``/``eta``
    replace the run's own (None: keep it); ``ema``: the EMA weights (else the raw ones); ``attack``: the
    trajectory attack (None: none); ``fid``: FID/KID (None: none); ``progress``: a tqdm bar."""

    n: int = 1000
    seed: int = 0
    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None
    ema: bool = True
    attack: AttackSpec | None = None
    fid: FIDSpec | None = None
    progress: bool = False


def known_metrics(
    model: nn.Module,
    schedule: NoiseSchedule,
    known,
    spec: MeasureSpec | None = None,
    *,
    train_data: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    spread=None,
    progress: bool = False,
) -> dict[str, float]:
    """Exact metrics of ``model`` on the known distribution ``known`` (``spec``: how many samples, how,
    which seed; default ``MeasureSpec()``). ``spread``: the samples drawn by all ranks of a torchrun job,
    measured on rank 0 (``{}``
    elsewhere).

    - ``dist_mean|median|p90``: distance of the samples to the clean support (``data_dist_*``: of the
      training data, the level a model that copies its data reaches);
    - ``sw``: sliced W2 to fresh clean samples; ``sw_floor``: between two fresh clean sets; ``sw_data``:
      of the training data; ``sw_proj`` (``_floor``): the same after projecting onto the support;
    - ``gmm2d``: ``modes_covered``, ``mode_tv``; images: ``psnr_t*`` / ``psnr_oracle_t*``, the noise level
      ``sigma_*`` (``data_sigma_*``: of the training data) and memorisation against ``train_data``
      (``ref_*``: fresh clean samples, the no-memorisation level);
    - ``spec.attack``: the trajectory attack; ``attack_dist_{none,random,pgd}_*`` and the prediction changes.
    """
    spec = spec or MeasureSpec()
    n, seed = spec.n, spec.seed
    x = draw_samples(model, schedule, tuple(known.sample_shape), spec, device, spread, progress)
    if x is None:  # another rank measures
        return {}
    out: dict[str, float] = {"n": n}
    out.update(distance_summary(support_distance(known, x), "dist"))
    out["nonfinite"] = int((~torch.isfinite(x.reshape(n, -1))).any(dim=1).sum().item())
    fresh = known.sample(n, torch.Generator().manual_seed(seed * 1000 + FRESH))
    fresh2 = known.sample(n, torch.Generator().manual_seed(seed * 1000 + FLOOR))
    finite = torch.isfinite(x.reshape(n, -1)).all(dim=1)
    out["sw"] = sliced_wasserstein(x[finite], fresh) if finite.any() else float("inf")
    pf = known.project(fresh)
    out["sw_proj"] = sliced_wasserstein(known.project(x[finite]), pf) if finite.any() else float("inf")
    out["sw_proj_floor"] = sliced_wasserstein(known.project(fresh2), pf)
    out["sw_floor"] = sliced_wasserstein(fresh2, fresh)
    if train_data is not None:
        out.update(distance_summary(support_distance(known, train_data), "data_dist"))
        out["sw_data"] = sliced_wasserstein(train_data[:n].cpu(), fresh)
    if hasattr(known, "nearest_mode"):
        out.update(mode_balance(known, x[finite]))
    if known.kind == "image":
        psnr_ts = spec.psnr_ts
        if psnr_ts is None:  # PSNR_TIMESTEPS are for T = 1000: scale them to the run's schedule
            psnr_ts = sorted({min(schedule.T - 1, round(t * schedule.T / 1000)) for t in PSNR_TIMESTEPS})
        out.update(
            denoiser_psnr(model, schedule, fresh[:512], psnr_ts, known=known, seed=seed, device=device)
        )
        out.update(noise_summary(x[finite], "sigma"))
        if train_data is not None:
            out.update(noise_summary(train_data[:n].cpu(), "data_sigma"))
            out.update(memorization(x[finite], train_data, reference=fresh2, device=device))
    if spec.attack is not None:
        res = run_attack(model, schedule, tuple(known.sample_shape), spec, device)
        for name, xs in (("none", res.clean), ("random", res.random), ("pgd", res.attacked)):
            out.update(distance_summary(support_distance(known, xs), f"attack_dist_{name}"))
        out.update(res.summary())
    return out


def evaluate_known(
    model: nn.Module,
    schedule,
    known,
    data: torch.Tensor,
    clean: torch.Tensor,
    spec: MeasureSpec,
    *,
    device: torch.device | str = "cpu",
    spread=None,
) -> tuple[dict[str, float], dict[str, float]]:
    """The final evaluation on a known distribution: :func:`known_metrics` (what ``fastat eval --run``
    reports, from the same seeded noise), and its summary for metrics.jsonl: the mean exact distance to
    the clean support of the samples, the training data and its clean copy. ``spread``:
    :meth:`fastat.train.distributed.DistContext.spread` (``({}, {})`` on ranks other than 0)."""
    t0 = time.perf_counter()
    m = known_metrics(model, schedule, known, spec, train_data=data, device=device, spread=spread)
    if not m:
        return {}, {}
    summary = {
        "dist_samples": m["dist_mean"],
        "dist_data": m["data_dist_mean"],
        "dist_clean": known.distance_to_support(clean.cpu()).mean().item(),
        "n": spec.n,
        "seconds": time.perf_counter() - t0,
    }
    return summary, m


def final_evaluation(state, cfg, td, ctx) -> tuple[dict, dict]:
    """What the training loop measures at the end (its ``final_eval``): :func:`evaluate_known` of the
    EMA model on a known distribution (the samples spread over the ranks, the metrics on rank 0);
    ``({}, {})`` for real images and where ``run.eval_n`` is 0."""
    from fastat.train.state import run_sampler

    r = cfg.run
    if td.known is None or r.eval_n <= 0:
        return {}, {}
    model, schedule = state.ema_eps_model(), state.engine.objective.schedule
    spec = MeasureSpec(n=r.eval_n, seed=r.seed, sampler=run_sampler(cfg, td.kind))
    return evaluate_known(model, schedule, td.known, td.data, td.clean, spec, device=state.device,
                          spread=ctx.spread)  # fmt: skip


def load_run(
    run: str | os.PathLike, *, ema: bool = True, device: torch.device | str = "cpu", eps_model: bool = True
):
    """``(model, cfg, checkpoint)`` of a run folder (or checkpoint folder): the model with its EMA (or
    raw) weights, in eval mode on ``device`` (with ``eps_model``, a v- or x0-model is seen as an eps-model),
    and the run's :class:`~fastat.train.config.TrainConfig`."""
    from fastat.at.prediction import as_eps_model
    from fastat.models import build_model
    from fastat.train.checkpoint import CheckpointError, load_checkpoint, load_weights, require_finite
    from fastat.train.config import ConfigError, TrainConfig

    ckpt = load_checkpoint(run, weights=not ema)
    try:
        spec, cfg = ckpt.state["model"], TrainConfig.from_dict(ckpt.state["config"])
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{ckpt.path} lacks the run description needed to evaluate it ({e})") from None
    weights = ckpt.ema if ema else ckpt.model
    require_finite(weights, f"the {'EMA' if ema else 'raw'} weights of {ckpt.path} (the run diverged)")
    model = build_model(spec["name"], **spec["kwargs"])
    load_weights(model, weights, str(ckpt.path))
    if eps_model:
        model = as_eps_model(model, cfg.objective.prediction, cfg.build_objective().schedule)
    return model.to(device).eval(), cfg, ckpt


def evaluate_run(
    run: str | os.PathLike,
    options: EvalOptions | None = None,
    *,
    device: torch.device | str = "auto",
    write: bool = True,
    ctx=None,
    **changes,
) -> dict | None:
    """Evaluate the newest checkpoint of ``run`` and (``write``) save ``RUN/eval.json``.

    ``options`` (:class:`EvalOptions`; ``changes`` replace its fields, e.g. ``n=64``). The sampler
    defaults to the run's own. The training data are rebuilt from the run's config (the known sets and
    their corruption are seeded, so they are the very samples the run trained on). Under ``torchrun``
    (``ctx``, a :class:`fastat.train.distributed.DistContext`) every rank samples its share; rank 0
    measures and returns the report, the other ranks ``None``. Returns ``{"run", "checkpoint", "step",
    "dataset", "kind", "objective", "settings", "metrics", "seconds"}``.
    """
    from fastat.data import KNOWN
    from fastat.train.distributed import DistContext
    from fastat.train.run import build_training_data, resolve_device
    from fastat.train.state import run_sampler

    opt = replace(options or EvalOptions(), **changes)
    t0 = time.perf_counter()
    ctx = ctx or DistContext()
    with ctx.together("loading the run"):  # a bad run or option: one message, not one per rank
        dev = resolve_device(device, ctx) if isinstance(device, str) else torch.device(device)
        model, cfg, ckpt = load_run(run, ema=opt.ema, device=dev)
        if opt.fid is not None and opt.fid.train and cfg.data.dataset in KNOWN:
            raise ValueError(
                f"--fid is for real image sets; {ckpt.path} was trained on the known set "
                f"{cfg.data.dataset!r}, whose report is exact (distance to the support, sliced W2)"
            )
        schedule = cfg.build_objective().schedule
        if opt.n < 2:
            raise ValueError(f"--n must be >= 2, got {opt.n}")
        td = build_training_data(cfg, progress=ctx.is_main)
        own = run_sampler(cfg, td.kind)  # images clamp x0_hat to [-1, 1], as the run's own sample grids
        eta = own.eta if opt.eta is None else opt.eta
        sampler = SamplerSpec(opt.sampler or own.sampler, opt.steps or own.steps, eta, own.clip_x0)
        sampler.check(schedule.T)
        if opt.fid is not None:
            opt.fid.check()
    spec = MeasureSpec(n=opt.n, seed=opt.seed, sampler=sampler, attack=opt.attack)
    progress = opt.progress and ctx.is_main
    if td.known is not None:
        metrics = known_metrics(model, schedule, td.known, spec, train_data=td.data, device=dev,
                                spread=ctx.spread, progress=progress)  # fmt: skip
        if metrics and opt.fid is not None and opt.fid.ref is not None:
            metrics["fid_note"] = "FID/KID skipped: a built-in set's report is exact (no --ref needed)"
    else:
        metrics = image_metrics(model, schedule, td, spec, opt.fid, device=dev, spread=ctx.spread,
                                progress=progress)  # fmt: skip
    if not ctx.is_main:  # rank 0 measured the samples
        return None
    if td.known is not None:
        metrics.update(attack_eff(model, cfg, td.known, opt.seed, dev))
    settings = {"n": opt.n, "sampler": sampler.sampler, "steps": sampler.visited(schedule.T),
                "eta": sampler.eta, "seed": opt.seed, "weights": "ema" if opt.ema else "raw",
                "device": str(dev)}  # fmt: skip
    if opt.attack is not None:
        settings.update(opt.attack.settings())
    if opt.fid is not None and opt.fid.ref is not None:
        settings["ref"] = str(opt.fid.ref)
    return make_report(ckpt.run_dir, ckpt.path, ckpt.step, td.name, td.kind, cfg, settings, metrics,
                       time.perf_counter() - t0, write=write)  # fmt: skip


def attack_eff(eps_model, cfg, known, seed: int, device, n: int = 256) -> dict[str, float]:
    """:func:`fastat.at.diagnostics.attack_efficiency` of the run's attack on ``n`` fresh clean samples
    (``eps_model`` outputs eps, so the objective reads it as eps)."""
    from fastat.at.diagnostics import attack_efficiency

    objective = replace(cfg.build_objective(), prediction="eps")
    x0 = known.sample(n, torch.Generator().manual_seed(seed * 1000 + 107)).to(device)
    gen = torch.Generator(device=device).manual_seed(seed * 1000 + 108)
    return {k: float(v) for k, v in attack_efficiency(eps_model, objective, x0, gen).items()}


def make_report(
    run_dir, checkpoint, step, dataset, kind, cfg, settings, metrics, seconds, write=True
) -> dict:
    """The report dict of :func:`evaluate_run` (and of ``fastat train``'s final evaluation); ``write``
    saves it as ``RUN/eval.json``."""
    report = {
        "run": str(run_dir),
        "checkpoint": str(checkpoint),
        "step": step,
        "dataset": dataset,
        "kind": kind,
        "objective": {"mode": cfg.objective.mode, "lam": cfg.objective.lam},
        "settings": settings,
        "metrics": metrics,
        "seconds": round(seconds, 2),
    }
    if write:
        from fastat.train.checkpoint import atomic_write_text

        atomic_write_text(Path(run_dir) / EVAL_FILE, json.dumps(json_safe(report), indent=2) + "\n")
    return report


def read_report(run: str | os.PathLike) -> dict | None:
    """``RUN/eval.json`` as written by :func:`make_report` (None when absent or unreadable)."""
    try:
        return json.loads((Path(run) / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return None
