"""The comparison of SPEC section 4: DDPM vs adversarial training on corrupted known distributions.

    fastat eval compare                        # the default grid: <= 15 min on a 2-core CPU
    fastat eval compare --quick --out /tmp/c   # a < 1 min smoke run
    fastat eval compare --settings plane3d-s0.2 --modes ddpm adv "adv[lam=1.0]" "adv[r_min=0.1]"
    fastat eval compare --modes ddpm adv "free[replays=2]" "adv[reg_frac=0.25]" --budget-units 3200
    # ^ an equal FLOP budget: 400 steps of adv (8 units per image), 1067 of ddpm (3), 533 of free (6)

For every setting (a known dataset with its corruption) x variant (a training mode, optionally with
objective overrides) x seed, the trainer (:func:`fastat.train.run.train`) trains a small MLP on the same
corrupted data with the same number of steps (or, with ``budget_units``, the same FLOP budget: each
variant trains ``round(budget_units / flop_units)`` steps, ``flop_units`` being its forward-pass
equivalents per image and step, :meth:`fastat.ATObjective.flop_units`), then
:func:`fastat.eval.known_metrics` measures the EMA model. The seed sets the model's initialisation, the
loss noise and the batch order; the data (and their corruption) are the same for every run of a setting.
Results are aggregated as mean ± std over seeds, with the paired difference to ``ddpm`` (same seed), and
written as ``compare.json``, ``compare.md`` and plots (matplotlib, if installed). Finished runs
(``eval.json`` present with the same settings) are reused, so an interrupted comparison continues where
it stopped.

A variant is ``MODE`` or ``MODE[key=value,...]`` with keys of the ``objective`` config section, e.g.
``adv[lam=0.5,r_min=0.1]``; the variant string is its label in the table.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

__all__ = [
    "PRESETS",
    "SETTINGS",
    "CompareSpec",
    "Setting",
    "aggregate",
    "markdown_table",
    "parse_variant",
    "run_compare",
    "spec_with",
]


@dataclass(frozen=True)
class Setting:
    """A known dataset and how its training copies are corrupted (see :func:`fastat.data.corrupt`)."""

    name: str
    dataset: str
    corrupt_frac: float = 0.9
    corrupt_sigma: float = 0.1
    outliers: float = 0.0
    outlier_kind: str = "uniform"

    def describe(self) -> str:
        parts = []
        if self.corrupt_frac and self.corrupt_sigma:
            parts.append(f"{self.corrupt_frac:.0%} noisy at sigma {self.corrupt_sigma}")
        if self.outliers:
            parts.append(f"{self.outliers:.0%} {self.outlier_kind} outliers")
        return f"{self.dataset}, " + (" + ".join(parts) if parts else "clean")


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("plane3d-s0.1", "plane3d", 0.9, 0.1),
        Setting("plane3d-s0.2", "plane3d", 0.9, 0.2),
        Setting("plane3d-out", "plane3d", 0.0, 0.0, 0.1),
        Setting("plane3d-clean", "plane3d", 0.0, 0.0),
        Setting("gmm2d-s0.1", "gmm2d", 0.9, 0.1),
        Setting("gmm2d-s0.2", "gmm2d", 0.9, 0.2),
        Setting("gmm2d-out", "gmm2d", 0.0, 0.0, 0.1),
        Setting("subspace-s0.1", "subspace", 0.9, 0.1),
        Setting("subspace-s0.2", "subspace", 0.9, 0.2),
    )
}


@dataclass(frozen=True)
class CompareSpec:
    """The grid and the training/evaluation sizes. Every run of a comparison uses the same numbers."""

    settings: tuple[str, ...] = ("plane3d-s0.1", "plane3d-s0.2", "plane3d-out")
    modes: tuple[str, ...] = ("ddpm", "rand", "adv", "pgd")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 400
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 50
    ema_decay: float = 0.999
    n_train: int = 4096
    hidden: int = 128  # MLP (point sets)
    depth: int = 3
    image_size: int | None = None  # image sets (subspace): H = W (None: the dataset's own, 8)
    unet: dict = field(default_factory=dict)  # image sets: overrides of the UNet preset "tiny" (e.g. ch)
    lr_schedule: str = "constant"  # optim.schedule: constant | cosine | linear
    eval_n: int = 512
    sampler: str = "ddim"
    sample_steps: int = 50
    eta: float = 1.0
    attack: bool = True
    attack_n: int = 128
    attack_at: tuple[int, ...] = (50, 200)
    attack_radius: float = 0.1
    attack_steps: int = 5
    attack_target: str = "eps"
    objective: dict = field(default_factory=dict)  # overrides of the objective section for every run
    # equal FLOP budget: forward-pass equivalents per image slot (steps x flop_units); None: equal steps
    budget_units: float | None = None

    def run_overrides(self, setting: Setting, variant: str, seed: int, out: Path) -> dict:
        over = self._overrides(setting, variant, seed, out, self.steps)
        if self.budget_units is None:
            return over
        steps = max(1, round(self.budget_units / self.flop_units(over)))
        return self._overrides(setting, variant, seed, out, steps)

    def flop_units(self, over: dict) -> float:
        """Forward-pass equivalents per image and step of the run ``over`` describes (one replay in free)."""
        from fastat.train.config import TrainConfig

        return TrainConfig().with_overrides(over).build_objective().flop_units(self.batch_size)

    def _overrides(self, setting: Setting, variant: str, seed: int, out: Path, steps: int) -> dict:
        mode, extra = parse_variant(variant)
        over = {
            "data.dataset": setting.dataset,
            "data.n": self.n_train,
            "data.corrupt_frac": setting.corrupt_frac,
            "data.corrupt_sigma": setting.corrupt_sigma,
            "data.outliers": setting.outliers,
            "data.outlier_kind": setting.outlier_kind,
            "objective.mode": mode,
            "optim.lr": self.lr,
            "optim.warmup": self.warmup,
            "ema.decay": self.ema_decay,
            "run.steps": steps,
            "run.batch_size": self.batch_size,
            "run.seed": seed,
            "run.device": "cpu",
            "run.out": str(out),
            "run.save_every": 0,
            "run.sample_every": 0,
            "run.eval_n": 0,
            "run.log_every": max(1, steps // 4),
            "run.sample_n": 64,
            "run.sampler": self.sampler,
            "run.sample_steps": self.sample_steps,
            "run.tensorboard": False,
            "run.keep": 1,
        }
        if setting.dataset == "subspace":
            over.update({"model.name": "tiny", "model.kwargs": dict(self.unet)})
            if self.image_size is not None:
                over["data.image_size"] = self.image_size
        else:
            over.update({"model.name": "mlp", "model.kwargs": {"hidden": self.hidden, "depth": self.depth}})
        over["optim.schedule"] = self.lr_schedule
        over.update({f"objective.{k}": v for k, v in self.objective.items()})
        over.update({f"objective.{k}": v for k, v in extra.items()})
        return over


PRESETS: dict[str, CompareSpec] = {
    "default": CompareSpec(),
    "quick": CompareSpec(
        settings=("plane3d-s0.2",),
        modes=("ddpm", "adv"),
        seeds=(0, 1),
        steps=60,
        batch_size=128,
        warmup=10,
        n_train=1024,
        hidden=32,
        depth=2,
        eval_n=128,
        sample_steps=10,
        attack_n=32,
        attack_steps=2,
    ),
    # subspace images (3x8x8, an 8-dim support) with the tiny UNet: the recipe of the quickstart
    "images": CompareSpec(
        settings=("subspace-s0.1", "subspace-s0.2"),
        steps=1000,
        batch_size=32,
        lr=1e-3,
        warmup=20,
        lr_schedule="cosine",
        ema_decay=0.9999,
        image_size=8,
        eval_n=256,
        attack_n=64,
    ),
}

EVAL_VERSION = 3  # bump when the metrics change: finished runs are then re-evaluated, not retrained
RUN_RECORD = "compare-run.json"

_VARIANT = re.compile(r"^([a-z]+)(?:\[(.*)\])?$")


def parse_variant(variant: str) -> tuple[str, dict]:
    """``"adv[lam=0.5,r_min=0.1]"`` -> ``("adv", {"lam": 0.5, "r_min": 0.1})`` (values parsed as YAML)."""
    import yaml

    m = _VARIANT.match(variant.strip())
    if not m:
        raise ValueError(f"bad variant {variant!r}: expected MODE or MODE[key=value,...]")
    mode, body = m.group(1), m.group(2)
    extra = {}
    for item in filter(None, (body or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad variant {variant!r}: {item!r} is not key=value")
        extra[key.strip()] = yaml.safe_load(value.strip())
    return mode, extra


def _eval_settings(spec: CompareSpec) -> dict:
    return dict(
        n=spec.eval_n,
        sampler=spec.sampler,
        steps=spec.sample_steps,
        eta=spec.eta,
        attack=spec.attack,
        attack_n=spec.attack_n,
        attack_at=list(spec.attack_at),
        attack_radius=spec.attack_radius,
        attack_steps=spec.attack_steps,
        attack_target=spec.attack_target,
    )


def _job(args: tuple) -> dict:
    """Train and evaluate one run (in a worker process or in this one).

    A run folder whose ``compare-run.json`` has the same training overrides is reused: as it is when
    its evaluation settings (and :data:`EVAL_VERSION`) match too, else re-evaluated without retraining.
    """
    spec, setting, variant, seed, run_dir, threads = args
    if threads:
        torch.set_num_threads(threads)
    from fastat.eval.evaluate import evaluate_run, final_evaluation
    from fastat.train.checkpoint import atomic_write_text, latest_checkpoint
    from fastat.train.config import TrainConfig
    from fastat.train.run import train

    run_dir = Path(run_dir)
    over = spec.run_overrides(setting, variant, seed, run_dir)
    want = {**_eval_settings(spec), "version": EVAL_VERSION}
    prev = None
    try:
        prev = json.loads((run_dir / RUN_RECORD).read_text())
        if prev.get("overrides") != over or latest_checkpoint(run_dir) is None:
            prev = None
    except (OSError, json.JSONDecodeError):
        prev = None
    if prev is not None and prev.get("eval") == want:
        return prev["record"]
    if prev is None:
        if run_dir.exists():  # stale or incomplete: start over
            import shutil

            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        result = train(TrainConfig().with_overrides(over), progress=False, final_eval=final_evaluation)
        train_s, steps = time.perf_counter() - t0, result.step
    else:
        train_s, steps = prev["record"]["train_seconds"], over["run.steps"]
    units = spec.flop_units(over)
    t1 = time.perf_counter()
    kw = {k: (tuple(v) if k == "attack_at" else v) for k, v in want.items() if k != "version"}
    ev = evaluate_run(run_dir, seed=seed, device="cpu", **kw)
    record = {
        "setting": setting.name,
        "variant": variant,
        "seed": seed,
        "run": str(run_dir),
        "train_seconds": round(train_s, 2),
        "sec_per_step": train_s / max(steps, 1),
        "steps": steps,
        "flop_units": units,  # per image and step
        "flop_units_total": units * steps,  # per image slot of the batch: the budget
        "eval_seconds": round(time.perf_counter() - t1, 2),
        "metrics": ev["metrics"],
    }
    atomic_write_text(run_dir / RUN_RECORD, json.dumps({"overrides": over, "eval": want, "record": record}))
    return record


# -- aggregation -----------------------------------------------------------------------------------------

# (metric key, column title, lower is better); image sets add the denoiser's PSNR and memorisation
PSNR_T = 100  # the x0_hat PSNR column: t = 100 of T = 1000 (scaled to the run's T by known_metrics)
COLUMNS = (
    ("dist_mean", "dist to support, mean", True),
    ("dist_median", "dist, median", True),
    ("sw", "sliced W2", True),
    ("sw_proj", "SW along support", True),
    ("attack_dist_pgd_mean", "dist after PGD attack", True),
    (f"psnr_t{PSNR_T}", f"x0_hat PSNR t={PSNR_T}, dB", False),
    ("nn_cos_mean", "NN cosine to training data", True),
    ("near_copy_share", "near-copy share", True),
)


VERDICT_KEYS = ("dist_mean", "sw", "sw_proj", "attack_dist_pgd_mean", f"psnr_t{PSNR_T}", "nn_cos_mean")
VERDICT_LABELS = {
    "dist_mean": "dist",
    "sw": "SW",
    "sw_proj": "SW along",
    "attack_dist_pgd_mean": "attacked",
    f"psnr_t{PSNR_T}": "PSNR",
    "nn_cos_mean": "NN cos",
}
REFERENCE_KEYS = ("data_dist_mean", "data_dist_median", "sw_data", "sw_floor", "sw_proj_floor",
                  f"psnr_oracle_t{PSNR_T}", "ref_nn_cos_mean", "ref_near_copy_share")  # fmt: skip


def _reference_cell(key: str, ref: dict) -> str:
    """What the training data (and, for distances between distributions, two clean sets) score."""
    if key == "dist_mean" and "data_dist_mean" in ref:
        return f"{ref['data_dist_mean']:.4f}"
    if key == "dist_median" and "data_dist_median" in ref:
        return f"{ref['data_dist_median']:.4f}"
    if key == "sw" and "sw_data" in ref:
        return f"{ref['sw_data']:.4f} (floor {ref['sw_floor']:.4f})"
    if key == "sw_proj" and "sw_proj_floor" in ref:
        return f"(floor {ref['sw_proj_floor']:.4f})"
    if key == f"psnr_t{PSNR_T}" and f"psnr_oracle_t{PSNR_T}" in ref:
        return f"(exact posterior mean {ref[f'psnr_oracle_t{PSNR_T}']:.2f})"
    if key in ("nn_cos_mean", "near_copy_share") and f"ref_{key}" in ref:
        return f"(fresh clean data {ref[f'ref_{key}']:.4f})"
    return ""


def _mean_std(v: Sequence[float]) -> tuple[float, float]:
    n = len(v)
    m = sum(v) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0)


def aggregate(records: list[dict], spec: CompareSpec) -> dict:
    """``{setting: {variant: {metric: [mean, std], "vs_ddpm": {metric: [mean diff, std diff, verdict]}}}}``
    plus per-setting references (training data, sliced-W2 floor). Paired by seed against ``ddpm``."""
    out: dict = {}
    for s in spec.settings:
        recs = [r for r in records if r["setting"] == s]
        if not recs:
            continue
        ref = recs[0]["metrics"]
        block: dict = {"_reference": {k: ref[k] for k in REFERENCE_KEYS if k in ref}}
        base = {r["seed"]: r["metrics"] for r in recs if r["variant"] == "ddpm"}
        for v in spec.modes:
            rv = [r for r in recs if r["variant"] == v]
            if not rv:
                continue
            row: dict = {"seeds": len(rv)}
            for key in {c[0] for c in COLUMNS} | {"train_sec_per_step", "steps", "flop_units"}:
                if key == "train_sec_per_step":
                    vals = [r["sec_per_step"] for r in rv]
                elif key in ("steps", "flop_units"):
                    vals = [r[key] for r in rv if key in r]
                else:
                    vals = [r["metrics"][key] for r in rv if key in r["metrics"]]
                if vals:
                    row[key] = list(_mean_std(vals))
            if v != "ddpm" and base:
                cmp = {}
                for key, _, lower in COLUMNS:
                    diffs = [
                        r["metrics"][key] - base[r["seed"]][key]
                        for r in rv
                        if r["seed"] in base and key in r["metrics"] and key in base[r["seed"]]
                    ]
                    if len(diffs) >= 1:
                        m, sd = _mean_std(diffs)
                        se = sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("inf")
                        if abs(m) <= 2 * se:
                            verdict = "tie"
                        else:
                            verdict = "better" if (m < 0) == lower else "worse"
                        cmp[key] = [m, sd, verdict]
                row["vs_ddpm"] = cmp
            block[v] = row
        out[s] = block
    return out


def _fmt(ms, key: str = "") -> str:
    m, s = ms
    return f"{m:.2f} ± {s:.2f}" if key.startswith("psnr") else f"{m:.4f} ± {s:.4f}"


def markdown_table(summary: dict, spec: CompareSpec, seconds: float | None = None) -> str:
    """One table: a row per setting x variant, mean ± std over seeds; the verdict against ``ddpm``
    (paired by seed: 'better'/'worse' when the mean paired difference exceeds 2 standard errors)."""
    cols = [
        c
        for c in COLUMNS
        if any(c[0] in row for blk in summary.values() for v, row in blk.items() if v != "_reference")
    ]
    verdicts = [k for k in VERDICT_KEYS if any(k == c[0] for c in cols)]
    head = (
        "| setting | variant | "
        + " | ".join(c[1] for c in cols)
        + " | vs ddpm ("
        + " / ".join(VERDICT_LABELS[k] for k in verdicts)
        + ") | units/img | steps | s/step |"
    )
    lines = [head, "|" + "---|" * (len(cols) + 6)]
    for s, blk in summary.items():
        ref = blk["_reference"]
        refcells = [_reference_cell(c[0], ref) for c in cols]
        lines.append(f"| {s} | *training data* | " + " | ".join(refcells) + " | | | | |")
        for v, row in blk.items():
            if v == "_reference":
                continue
            cells = [_fmt(row[c[0]], c[0]) if c[0] in row else "" for c in cols]
            vs = row.get("vs_ddpm", {})
            verdict = " / ".join(vs[k][2] if k in vs else "" for k in verdicts) if vs else "—"
            sps = f"{row['train_sec_per_step'][0] * 1000:.0f} ms" if "train_sec_per_step" in row else ""
            units = f"{row['flop_units'][0]:.3g}" if "flop_units" in row else ""
            steps = f"{row['steps'][0]:.0f}" if "steps" in row else ""
            tail = f" | {verdict} | {units} | {steps} | {sps} |"
            lines.append(f"| {s} | {v} | " + " | ".join(cells) + tail)
    images = any(SETTINGS[s].dataset == "subspace" for s in summary if s in SETTINGS)
    points = any(SETTINGS[s].dataset != "subspace" for s in summary if s in SETTINGS)
    models = ([f"MLP {spec.hidden}x{spec.depth}"] if points else []) + (
        [f"UNet tiny {_unet_desc(spec)}"] if images else []
    )
    attack = (
        f"attack: PGD {spec.attack_steps} steps, L-inf radius {spec.attack_radius} at "
        f"t={list(spec.attack_at)}, {spec.attack_n} samples"
        if spec.attack
        else "no trajectory attack"
    )
    notes = [
        "",
        f"{len(spec.seeds)} seeds ({', '.join(map(str, spec.seeds))}); {_length(spec)}, "
        f"batch {spec.batch_size}, lr {spec.lr} ({spec.lr_schedule}, warmup {spec.warmup}), "
        f"{', '.join(models)}, EMA {spec.ema_decay}; {spec.eval_n} samples per run, "
        f"{spec.sampler} {spec.sample_steps} steps eta {spec.eta}; {attack}.",
        "Distances are exact (Euclidean to the clean support; images: RMS per pixel); 'training data' is "
        "what the corrupted data score; the sliced-W2 floor is two fresh clean sets of the same size. "
        "'vs ddpm': paired by seed, better/worse when the mean difference exceeds two standard errors, "
        "else tie. 'units/img': forward-pass equivalents per image and step (a backward counts 2; free: per "
        "replay).",
    ]
    if spec.objective:
        notes.append(f"Objective overrides for every run: {spec.objective}.")
    if seconds is not None:
        notes.append(f"Wall time: {seconds:.0f} s.")
    return "\n".join(lines + notes) + "\n"


# -- plots -------------------------------------------------------------------------------------------------


def _view(known) -> torch.Tensor:
    """A ``(dim, 2)`` frame for drawing points: identity in 2-D; for the plane, one in-plane axis and
    the normal (a side view, where the distance to the support is the height)."""
    if known.sample_shape == (2,):
        return torch.eye(2, dtype=torch.float64)
    if hasattr(known, "normal"):
        return torch.stack([known.basis[:, 0], known.normal], dim=1)
    return torch.eye(known.sample_shape[0], 2, dtype=torch.float64)


def plot_setting(
    setting: Setting, runs: dict[str, str], path: Path, *, n: int = 512, field_t: int = 50
) -> Path | None:
    """Samples (top) and the learned denoising field ``x0_hat(x, t) - x`` at ``field_t`` (bottom) of one
    seed's runs, one column per variant. Points only; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from fastat.eval.evaluate import load_run
    from fastat.eval.metrics import predict_x0
    from fastat.train.run import build_training_data
    from fastat.train.samples import generate

    first = next(iter(runs.values()))
    _, cfg, _ = load_run(first)
    td = build_training_data(cfg)
    known = td.known
    if known is None or known.kind != "points":
        return None
    V = _view(known)
    data2 = (td.data.double() @ V).numpy()
    noise = torch.randn((n, *known.sample_shape), generator=torch.Generator().manual_seed(7))
    lim = max(float(abs(data2).max()) * 1.1, 1.0)
    grid = torch.linspace(-lim, lim, 17, dtype=torch.float64)
    gy, gx = torch.meshgrid(grid, grid, indexing="ij")
    g2 = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    gpts = (g2 @ V.T).float()
    fig, axes = plt.subplots(2, len(runs), figsize=(3.2 * len(runs), 6.4), squeeze=False)
    for j, (variant, run) in enumerate(runs.items()):
        model, cfg, _ = load_run(run)
        schedule = cfg.build_objective().schedule
        x = generate(
            model,
            schedule,
            noise,
            sampler="ddim",
            steps=50,
            eta=1.0,
            generator=torch.Generator().manual_seed(8),
        )
        x2 = (x.double() @ V).numpy()
        ax = axes[0, j]
        ax.scatter(data2[:, 0], data2[:, 1], s=1, c="0.8", label="training data")
        ax.scatter(x2[:, 0], x2[:, 1], s=2, c="C0", label="samples")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_title(variant, fontsize=9)
        if j == 0:
            ax.legend(loc="upper right", fontsize=6, markerscale=3)
        with torch.no_grad():
            t = torch.full((gpts.shape[0],), field_t, dtype=torch.long)
            d = (predict_x0(model, schedule, gpts, t).double() - gpts.double()) @ V
        ax = axes[1, j]
        ax.scatter(data2[:, 0], data2[:, 1], s=1, c="0.85")
        ax.quiver(
            g2[:, 0].numpy(),
            g2[:, 1].numpy(),
            d[:, 0].numpy(),
            d[:, 1].numpy(),
            angles="xy",
            scale_units="xy",
            scale=2.0,
            width=0.004,
            color="C3",
        )
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_title(f"(x0_hat - x) / 2 at t={field_t}", fontsize=8)
    view = "side view (in-plane axis, normal)" if hasattr(known, "normal") else "x, y"
    fig.suptitle(f"{setting.name}: {setting.describe()} — {view}", fontsize=10)
    fig.tight_layout()
    from fastat.train.checkpoint import atomic_write

    try:
        return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=90))
    finally:
        plt.close(fig)


def plot_summary(summary: dict, spec: CompareSpec, path: Path) -> Path | None:
    """Bar chart of the mean distance to the support (± std over seeds) per setting and variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    settings = list(summary)
    variants = [v for v in spec.modes if any(v in summary[s] for s in settings)]
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.8 * len(settings) * 2), 3.6))
    w = 0.8 / max(len(variants), 1)
    for ax, key, title in (
        (axes[0], "dist_mean", "distance to clean support (mean)"),
        (axes[1], "sw", "sliced W2 to clean"),
    ):
        for i, v in enumerate(variants):
            m = [
                summary[s][v][key][0] if v in summary[s] and key in summary[s][v] else float("nan")
                for s in settings
            ]
            e = [summary[s][v][key][1] if v in summary[s] and key in summary[s][v] else 0.0 for s in settings]
            ax.bar([k + i * w for k in range(len(settings))], m, w, yerr=e, label=v, capsize=2)
        ref_key = "data_dist_mean" if key == "dist_mean" else "sw_floor"
        for k, s in enumerate(settings):
            r = summary[s]["_reference"].get(ref_key)
            if r is not None:
                ax.hlines(r, k - w / 2, k + 0.8 - w / 2, colors="k", linestyles="dashed", linewidth=1)
        ax.set_xticks([k + 0.4 - w / 2 for k in range(len(settings))], settings, fontsize=8)
        ax.set_title(
            title + (" (dashed: training data)" if key == "dist_mean" else " (dashed: floor)"), fontsize=9
        )
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    from fastat.train.checkpoint import atomic_write

    try:
        return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=90))
    finally:
        plt.close(fig)


# -- the driver ----------------------------------------------------------------------------------------------


def run_compare(
    spec: CompareSpec,
    out: str | os.PathLike,
    *,
    workers: int = 1,
    threads: int = 1,
    plots: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the grid of ``spec`` into ``out`` and write ``compare.json``, ``compare.md`` and plots.

    ``workers`` > 1 trains that many runs at once in separate processes; ``threads``: torch threads per
    run (1 is fastest for these small models on a shared CPU: more threads spin against each other).
    Returns ``{"spec", "records", "summary", "seconds", "table"}``.
    """
    for s in spec.settings:
        if s not in SETTINGS:
            raise ValueError(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    if "ddpm" not in spec.modes:
        log("note: no 'ddpm' variant in --modes: the table has no baseline to compare against")
    for v in spec.modes:
        parse_variant(v)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (spec, SETTINGS[s], v, seed, str(out / "runs" / s / f"{_slug(v)}-seed{seed}"), threads)
        for s in spec.settings
        for v in spec.modes
        for seed in spec.seeds
    ]
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    records: list[dict] = []

    def done(rec: dict) -> None:
        records.append(rec)
        m = rec["metrics"]
        log(
            f"[{len(records)}/{len(jobs)}] {rec['setting']} {rec['variant']} seed {rec['seed']}: "
            f"dist {m['dist_mean']:.4f} (median {m['dist_median']:.4f}), SW {m['sw']:.4f}, "
            f"train {rec['train_seconds']:.0f} s, eval {rec['eval_seconds']:.0f} s"
        )

    try:
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
                futs = [ex.submit(_job, j) for j in jobs]
                for f in as_completed(futs):
                    done(f.result())
        else:
            for j in jobs:
                done(_job(j))
    finally:
        torch.set_num_threads(old_threads)
    records.sort(key=lambda r: (spec.settings.index(r["setting"]), spec.modes.index(r["variant"]), r["seed"]))
    summary = aggregate(records, spec)
    seconds = time.perf_counter() - t0
    table = markdown_table(summary, spec, seconds)
    result = {
        "spec": _spec_dict(spec),
        "records": records,
        "summary": summary,
        "seconds": round(seconds, 1),
        "table": table,
    }
    from fastat.eval.evaluate import _finite
    from fastat.train.checkpoint import atomic_write_text

    atomic_write_text(out / "compare.json", json.dumps(_finite(result), indent=2) + "\n")
    atomic_write_text(out / "compare.md", table)
    if plots:
        pdir = out / "plots"
        pdir.mkdir(exist_ok=True)
        written = [plot_summary(summary, spec, pdir / "summary.png")]
        for s in spec.settings:
            runs = {
                r["variant"]: r["run"] for r in records if r["setting"] == s and r["seed"] == spec.seeds[0]
            }
            written.append(plot_setting(SETTINGS[s], runs, pdir / f"{s}.png"))
        if not any(written):
            log("plots skipped: matplotlib is not installed (pip install matplotlib)")
    result["plot_seconds"] = round(time.perf_counter() - t0 - seconds, 1)
    return result


def _unet_desc(spec: CompareSpec) -> str:
    size = spec.image_size or 8
    kw = ", ".join(f"{k}={v}" for k, v in sorted(spec.unet.items()))
    return f"{size}x{size}" + (f" ({kw})" if kw else "")


def _length(spec: CompareSpec) -> str:
    if spec.budget_units is None:
        return f"{spec.steps} steps"
    return (f"an equal FLOP budget of {spec.budget_units:g} forward-pass equivalents per image slot "
            f"(steps x units/img)")  # fmt: skip


def _slug(variant: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", variant).strip("_")


def _spec_dict(spec: CompareSpec) -> dict:
    d = asdict(spec)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def spec_with(base: CompareSpec, **changes) -> CompareSpec:
    """``base`` with the non-None ``changes`` applied (tuples for the list fields)."""
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in changes.items() if v is not None}
    return replace(base, **kw)
