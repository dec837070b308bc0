"""Evaluate a trained run: what ``fastat eval --run DIR`` prints and writes to ``DIR/eval.json``.

    report = evaluate_run("runs/exp", n=1000)           # loads the newest checkpoint's EMA weights
    print(format_report(report))

Known distributions (``gmm2d``, ``plane3d``, ``subspace``): exact distance of the samples to the clean
support, sliced Wasserstein distance to fresh clean samples (beside its floor: two fresh clean sets), mode
balance (``gmm2d``), PSNR of the implied denoiser at several ``t`` against the exact posterior mean
(``subspace``), memorisation (images), and optionally the trajectory attack. Real images: memorisation,
and FID / IS when torch-fidelity and the Inception weights are there (``fid=True``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fastat.at.schedule import NoiseSchedule
from fastat.eval.memorization import memorization
from fastat.eval.metrics import (
    denoiser_psnr,
    distance_summary,
    mode_balance,
    sliced_wasserstein,
    support_distance,
)
from fastat.eval.trajectory import trajectory_attack

__all__ = [
    "EVAL_FILE",
    "PSNR_TIMESTEPS",
    "evaluate_known",
    "evaluate_run",
    "format_report",
    "known_metrics",
    "load_run",
    "make_report",
]

EVAL_FILE = "eval.json"
PSNR_TIMESTEPS = (10, 50, 100, 250, 500)
_SEEDS = {"noise": 101, "sampler": 102, "fresh": 103, "floor": 104, "psnr": 105, "attack": 106}


def _seeded_noise(n: int, shape: Sequence[int], seed: int, what: str) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed * 1000 + _SEEDS[what]))


def _generate(model, schedule, noise, *, sampler, steps, eta, clip_x0, seed, device, spread=None):
    """Samples from ``noise``; with ``spread`` (:meth:`fastat.train.distributed.DistContext.spread`) each rank
    samples its rows (with its own sampler noise) and rank 0 gets them all, the others ``None``."""
    from fastat.at.seeding import derive_seed
    from fastat.train.samples import generate

    def part(rows: torch.Tensor, start: int) -> torch.Tensor:
        s = seed * 1000 + _SEEDS["sampler"]
        g = torch.Generator().manual_seed(derive_seed(s, f"rows@{start}") if start else s)
        return generate(model, schedule, rows, sampler=sampler, steps=steps, eta=eta, clip_x0=clip_x0,
                        generator=g, device=device)  # fmt: skip

    return part(noise, 0) if spread is None else spread(part, noise)


def _attack(model, schedule, shape, sampler, steps, eta, clip_x0, seed, device,
            attack_n, attack_at, attack_radius, attack_steps, attack_target):  # fmt: skip
    """The trajectory attack from the report's own seeded noise (shared by points and images)."""
    return trajectory_attack(
        model, schedule, _seeded_noise(attack_n, shape, seed, "attack"), attack_at=attack_at,
        radius=attack_radius, pgd_steps=attack_steps, target=attack_target, sampler=sampler, steps=steps,
        eta=eta, clip_x0=clip_x0, seed=seed * 1000 + _SEEDS["attack"], device=device,
    )  # fmt: skip


def known_metrics(
    model: nn.Module,
    schedule: NoiseSchedule,
    known,
    *,
    train_data: torch.Tensor | None = None,
    n: int = 1000,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    clip_x0: float | None = None,
    psnr_ts: Sequence[int] | None = None,
    psnr_n: int = 512,
    attack: bool = False,
    attack_n: int = 256,
    attack_at: Sequence[int] = (200, 500, 800),
    attack_radius: float = 0.05,
    attack_steps: int = 10,
    attack_target: str = "eps",
    spread=None,
) -> dict[str, float]:
    """Exact metrics of ``model`` on the known distribution ``known`` (all draws seeded from ``seed``).
    ``spread``: the samples drawn by all ranks of a torchrun job, measured on rank 0 (``{}`` elsewhere).

    - ``dist_mean|median|p90``: distance of ``n`` samples to the clean support (``data_dist_*``: of the
      training data, the level a model that copies its data reaches);
    - ``sw``: sliced W2 to ``n`` fresh clean samples; ``sw_floor``: between two fresh clean sets (what a
      perfect model scores at this ``n``); ``sw_data``: of the training data;
    - ``sw_proj``: sliced W2 between the samples *projected onto the support* (``known.project``) and
      the projected fresh clean samples (``sw_proj_floor``: the same for two fresh sets): how the
      samples are spread along the support, apart from how far off it they are (a model can be close
      to the support and still distort the distribution on it);
    - ``gmm2d``: ``modes_covered``, ``mode_tv``; images: ``psnr_t*`` / ``psnr_oracle_t*`` and
      memorisation against ``train_data`` (``ref_*``: fresh clean samples, the no-memorisation level);
    - ``attack``: the trajectory attack on ``attack_n`` samples; ``attack_dist_{none,random,pgd}_mean``
      and the prediction changes (see :mod:`fastat.eval.trajectory`).
    """
    shape = tuple(known.sample_shape)
    x = _generate(model, schedule, _seeded_noise(n, shape, seed, "noise"), sampler=sampler, steps=steps,
                  eta=eta, clip_x0=clip_x0, seed=seed, device=device, spread=spread)  # fmt: skip
    if x is None:  # another rank measures
        return {}
    out: dict[str, float] = {"n": n}
    out.update(distance_summary(support_distance(known, x), "dist"))
    out["nonfinite"] = int((~torch.isfinite(x.reshape(n, -1))).any(dim=1).sum().item())
    fresh = known.sample(n, torch.Generator().manual_seed(seed * 1000 + _SEEDS["fresh"]))
    fresh2 = known.sample(n, torch.Generator().manual_seed(seed * 1000 + _SEEDS["floor"]))
    finite = torch.isfinite(x.reshape(n, -1)).all(dim=1)
    out["sw"] = sliced_wasserstein(x[finite], fresh) if finite.any() else float("inf")
    pf = known.project(fresh)
    out["sw_proj"] = sliced_wasserstein(known.project(x[finite]), pf) if finite.any() else float("inf")
    out["sw_proj_floor"] = sliced_wasserstein(known.project(fresh2), pf)
    out["sw_floor"] = sliced_wasserstein(fresh2, fresh)
    if train_data is not None:
        sub = train_data[:n].cpu()
        out.update(distance_summary(support_distance(known, train_data), "data_dist"))
        out["sw_data"] = sliced_wasserstein(sub, fresh)
    if hasattr(known, "nearest_mode"):
        out.update(mode_balance(known, x[finite]))
    if known.kind == "image":
        clean = fresh[:psnr_n]
        if psnr_ts is None:  # PSNR_TIMESTEPS are for T = 1000: scale them to the run's schedule
            psnr_ts = sorted({min(schedule.T - 1, round(t * schedule.T / 1000)) for t in PSNR_TIMESTEPS})
        out.update(denoiser_psnr(model, schedule, clean, psnr_ts, known=known, seed=seed, device=device))
        if train_data is not None:
            out.update(memorization(x[finite], train_data, reference=fresh2, device=device))
    if attack:
        res = _attack(model, schedule, shape, sampler, steps, eta, clip_x0, seed, device,
                      attack_n, attack_at, attack_radius, attack_steps, attack_target)  # fmt: skip
        for name, xs in (("none", res.clean), ("random", res.random), ("pgd", res.attacked)):
            out.update(distance_summary(support_distance(known, xs), f"attack_dist_{name}"))
        out.update({k: v for k, v in res.summary().items()})
    return out


def evaluate_known(
    model: nn.Module,
    schedule,
    known,
    data: torch.Tensor,
    clean: torch.Tensor,
    *,
    n: int,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    clip_x0: float | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    spread=None,
) -> tuple[dict[str, float], dict[str, float]]:
    """The final evaluation on a known distribution: :func:`known_metrics` of ``n`` samples
    (what ``fastat eval --run`` reports, from the same seeded noise), and its summary for metrics.jsonl:
    the mean exact distance to the clean support of the samples, the training data and its clean copy.
    ``spread``: :meth:`fastat.train.distributed.DistContext.spread` (``({}, {})`` on ranks other than 0)."""
    t0 = time.perf_counter()
    m = known_metrics(model, schedule, known, train_data=data, n=n, sampler=sampler, steps=steps, eta=eta,
                      seed=seed, device=device, clip_x0=clip_x0, spread=spread)  # fmt: skip
    if not m:
        return {}, {}
    summary = {
        "dist_samples": m["dist_mean"],
        "dist_data": m["data_dist_mean"],
        "dist_clean": known.distance_to_support(clean.cpu()).mean().item(),
        "n": n,
        "seconds": time.perf_counter() - t0,
    }
    return summary, m


def final_evaluation(state, cfg, td, ctx) -> tuple[dict, dict]:
    """What the training loop measures at the end (its ``final_eval``): :func:`evaluate_known` of the
    EMA model on a known distribution (the samples spread over the ranks, the metrics on rank 0);
    ``({}, {})`` for real images and where ``run.eval_n`` is 0."""
    from fastat.train.run import clip_for, run_eta

    r = cfg.run
    if td.known is None or r.eval_n <= 0:
        return {}, {}
    model, schedule = state.ema_eps_model(), state.engine.objective.schedule
    return evaluate_known(model, schedule, td.known, td.data, td.clean, n=r.eval_n, sampler=r.sampler,
                          steps=r.sample_steps, eta=run_eta(cfg), clip_x0=clip_for(td.kind),
                          seed=r.seed, device=state.device, spread=ctx.spread)  # fmt: skip


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
    *,
    n: int = 1000,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int = 0,
    device: torch.device | str = "auto",
    ema: bool = True,
    attack: bool = False,
    attack_n: int = 256,
    attack_at: Sequence[int] = (200, 500, 800),
    attack_radius: float = 0.05,
    attack_steps: int = 10,
    attack_target: str = "eps",
    fid: bool = False,
    inception_weights: str | os.PathLike | None = None,
    fid_cache: str | os.PathLike | None = None,
    write: bool = True,
    ctx=None,
) -> dict | None:
    """Evaluate the newest checkpoint of ``run`` and (``write``) save ``RUN/eval.json``.

    Under ``torchrun`` (``ctx``, a :class:`fastat.train.distributed.DistContext`) every rank samples its share
    of the ``n`` samples; rank 0 measures them and returns the report, the other ranks ``None``.

    ``sampler``/``steps``/``eta`` default to the run's own (``run.sampler``, ``run.sample_steps``,
    ``run.sample_eta``). The training
    data are rebuilt from the run's config (the known sets and their corruption are seeded, so they are
    the very samples the run trained on). Returns ``{"run", "checkpoint", "step", "dataset", "settings",
    "metrics", "seconds"}``.
    """
    from fastat.data import KNOWN
    from fastat.train.distributed import DistContext
    from fastat.train.run import build_training_data, clip_for, resolve_device, run_eta

    t0 = time.perf_counter()
    ctx = ctx or DistContext()
    with ctx.together("loading the run"):  # a bad run or option: one message, not one per rank
        dev = resolve_device(device, ctx) if isinstance(device, str) else torch.device(device)
        model, cfg, ckpt = load_run(run, ema=ema, device=dev)
        if fid and cfg.data.dataset in KNOWN:
            raise ValueError(
                f"--fid is for real image sets; {ckpt.path} was trained on the known set "
                f"{cfg.data.dataset!r}, whose report is exact (distance to the support, sliced W2)"
            )
        schedule = cfg.build_objective().schedule
        sampler = sampler or cfg.run.sampler
        steps = steps or cfg.run.sample_steps
        eta = run_eta(cfg) if eta is None else eta
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {sampler!r}; choose ddim or ddpm")
        if sampler == "ddim" and not 1 <= steps <= schedule.T:
            raise ValueError(f"--steps must be in [1, T={schedule.T}], got {steps}")
        if n < 2:
            raise ValueError(f"--n must be >= 2, got {n}")
        td = build_training_data(cfg, progress=ctx.is_main)
    settings = {
        "n": n,
        "sampler": sampler,
        "steps": steps if sampler == "ddim" else schedule.T,
        "eta": eta,
        "seed": seed,
        "weights": "ema" if ema else "raw",
        "device": str(dev),
    }
    attack_kw = dict(
        attack_n=attack_n,
        attack_at=attack_at,
        attack_radius=attack_radius,
        attack_steps=attack_steps,
        attack_target=attack_target,
    )
    if td.known is not None:
        metrics = known_metrics(
            model,
            schedule,
            td.known,
            clip_x0=clip_for(td.kind),  # as the run's own sample grids: images clamp x0_hat to [-1, 1]
            train_data=td.data,
            n=n,
            sampler=sampler,
            steps=steps,
            eta=eta,
            seed=seed,
            device=dev,
            attack=attack,
            spread=ctx.spread,
            **attack_kw,
        )
    else:
        metrics = _image_metrics(
            model,
            schedule,
            td,
            n=n,
            sampler=sampler,
            steps=steps,
            eta=eta,
            seed=seed,
            device=dev,
            clip_x0=clip_for(td.kind),
            attack=attack,
            fid=fid,
            inception_weights=inception_weights,
            fid_cache=fid_cache,
            spread=ctx.spread,
            **attack_kw,
        )
    if not ctx.is_main:  # rank 0 measured the samples
        return None
    if attack:
        settings.update(
            attack_n=attack_n,
            attack_at=list(attack_at),
            attack_radius=attack_radius,
            attack_steps=attack_steps,
            attack_target=attack_target,
        )
    return make_report(ckpt.run_dir, ckpt.path, ckpt.step, td.name, td.kind, cfg, settings, metrics,
                       time.perf_counter() - t0, write=write)  # fmt: skip


def make_report(run_dir, checkpoint, step, dataset, kind, cfg, settings, metrics, seconds, write=True) -> dict:
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

        atomic_write_text(Path(run_dir) / EVAL_FILE, json.dumps(_finite(report), indent=2) + "\n")
    return report


def _image_metrics(
    model,
    schedule,
    td,
    *,
    n,
    sampler,
    steps,
    eta,
    seed,
    device,
    clip_x0,
    attack,
    attack_n,
    attack_at,
    attack_radius,
    attack_steps,
    attack_target,
    fid,
    inception_weights,
    fid_cache,
    spread=None,
) -> dict:
    shape = tuple(td.sample_shape)
    x = _generate(model, schedule, _seeded_noise(n, shape, seed, "noise"), sampler=sampler, steps=steps,
                  eta=eta, clip_x0=clip_x0, seed=seed, device=device, spread=spread)  # fmt: skip
    if x is None:  # another rank measures
        return {}
    out: dict = {"n": n}
    held_out = None  # real images have no fresh clean samples; the training set's clean copies are the data
    out.update(memorization(x, td.train_view(), reference=held_out, device=device))
    extractor = ref = None
    if fid:
        from fastat.eval.fid import InceptionFeatures, reference_stats

        extractor = InceptionFeatures(inception_weights, device=device)
        key = f"{td.name}-{'x'.join(map(str, shape))}-n{len(td)}-clean"
        ref = reference_stats(key, td.clean_view, extractor, cache_dir=fid_cache, n=len(td))
        from fastat.eval.fid import fid_is

        out.update(fid_is(x, ref, extractor))
    if attack:
        res = _attack(model, schedule, shape, sampler, steps, eta, clip_x0, seed, device,
                      attack_n, attack_at, attack_radius, attack_steps, attack_target)  # fmt: skip
        out.update(res.summary())
        if extractor is not None:
            from fastat.eval.fid import fid_is

            for name, xs in (("none", res.clean), ("pgd", res.attacked)):
                out.update(
                    {
                        f"attack_{name}_{k}": v
                        for k, v in fid_is(xs, ref, extractor).items()
                        if k in ("fid", "is")
                    }
                )
    return out


def _finite(obj):
    """JSON without NaN/inf tokens: non-finite floats become strings."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return str(obj)
    return obj


_LABELS = {
    "dist": "distance to the clean support (samples)",
    "data_dist": "distance to the clean support (training data)",
    "attack_dist_none": "attack: distance, no perturbation",
    "attack_dist_random": "attack: distance, random perturbation",
    "attack_dist_pgd": "attack: distance, PGD perturbation",
}


def format_report(report: dict) -> str:
    """A few aligned lines for people."""
    m, s = report["metrics"], report["settings"]
    lines = [
        f"run {report['run']} step {report['step']} ({report['dataset']}, "
        f"mode {report['objective']['mode']}); "
        f"{s['n']} samples, {s['sampler']} {s['steps']} steps, eta {s['eta']}, {s['weights']} weights"
    ]
    unit = "RMS/pixel" if report["kind"] == "image" else "Euclidean"
    for pre, label in _LABELS.items():
        if f"{pre}_mean" in m:
            lines.append(
                f"  {label:<46} mean {m[f'{pre}_mean']:.4f}  median {m[f'{pre}_median']:.4f}  "
                f"p90 {m[f'{pre}_p90']:.4f}  ({unit})"
            )
    if "sw" in m:
        extra = f"  training data {m['sw_data']:.4f}" if "sw_data" in m else ""
        lines.append(
            f"  {'sliced W2 to fresh clean samples':<46} {m['sw']:.4f}  (floor {m['sw_floor']:.4f}){extra}"
        )
    if "sw_proj" in m:
        lines.append(
            f"  {'sliced W2 along the support (projected)':<46} {m['sw_proj']:.4f}  "
            f"(floor {m['sw_proj_floor']:.4f})"
        )
    if "modes_covered" in m:
        lines.append(f"  {'modes covered / TV from uniform':<46} {m['modes_covered']}  /  {m['mode_tv']:.3f}")
    psnr = [k for k in m if k.startswith("psnr_t")]
    if psnr:
        parts = []
        for k in psnr:
            t = k[len("psnr_t") :]
            oracle = m.get(f"psnr_oracle_t{t}")
            parts.append(f"t={t}: {m[k]:.1f}" + (f" (oracle {oracle:.1f})" if oracle is not None else ""))
        lines.append(f"  {'x0_hat PSNR, dB':<46} " + ", ".join(parts))
    if "nn_cos_mean" in m:
        ref = ""
        if "ref_nn_cos_mean" in m:
            ref = f"  | fresh clean data: {m['ref_nn_cos_mean']:.3f}, {m['ref_near_copy_share']:.3f}"
        lines.append(
            f"  {'memorisation: NN cosine, near-copy share':<46} {m['nn_cos_mean']:.3f}, "
            f"{m['near_copy_share']:.3f} (>= {m['near_copy_threshold']}){ref}"
        )
    if "fid" in m:
        lines.append(f"  {'FID / IS':<46} {m['fid']:.2f} / {m['is']:.2f} ± {m['is_std']:.2f}")
    for pre, label in (
        ("change", "attack: eps change ||d eps||^2"),
        ("x0change", "attack: x0_hat change ||d x0||^2"),
    ):
        keys = sorted((k for k in m if k.startswith(f"{pre}_pgd_t")), key=lambda k: -int(k.split("_t")[-1]))
        if keys:
            parts = [
                f"t={k.split('_t')[-1]}: {m[k]:.4g} vs random {m[k.replace('_pgd_', '_random_')]:.4g}"
                for k in keys
            ]
            lines.append(f"  {label:<46} " + ", ".join(parts))
    if "shift_pgd" in m:
        lines.append(
            f"  {'attack: sample shift (RMS), PGD vs random':<46} {m['shift_pgd']:.4f} vs "
            f"{m['shift_random']:.4f} (radius {m['attack_radius']}, target {m.get('attack_target', 'eps')})"
        )
    if m.get("nonfinite"):
        lines.append(f"  WARNING: {m['nonfinite']} samples are not finite")
    return "\n".join(lines)
