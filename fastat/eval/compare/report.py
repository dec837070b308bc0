"""Aggregation of the comparison's runs (mean ± std over seeds, the paired verdict against ``ddpm``) and
its markdown table. Typed: :class:`SettingSummary` holds the training data's reference values apart from
the variants' :class:`VariantSummary` rows; ``to_json`` gives what compare.json holds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from fastat.eval.compare.run import RunRecord
from fastat.eval.compare.spec import SETTINGS, CompareSpec, length_desc, unet_desc

__all__ = ["COLUMNS", "Paired", "SettingSummary", "VariantSummary", "aggregate", "markdown_table"]

# (metric key, column title, lower is better); image sets add the denoiser's PSNR, noise and memorisation
PSNR_T = 100  # the x0_hat PSNR column: t = 100 of T = 1000 (scaled to the run's T by known_metrics)
COLUMNS = (
    ("dist_mean", "dist to support, mean", True),
    ("dist_median", "dist, median", True),
    ("sw", "sliced W2", True),
    ("sw_proj", "SW along support", True),
    ("attack_dist_pgd_mean", "dist after PGD attack", True),
    (f"psnr_t{PSNR_T}", f"x0_hat PSNR t={PSNR_T}, dB", False),
    ("sigma_mean", "noise sigma (0-255)", True),
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
                  f"psnr_oracle_t{PSNR_T}", "data_sigma_mean", "ref_nn_cos_mean",
                  "ref_near_copy_share")  # fmt: skip
COSTS = ("train_sec_per_step", "steps", "flop_units")


@dataclass(frozen=True)
class Paired:
    """The mean and std over seeds of a variant's difference to ``ddpm`` (same seed), and the verdict:
    better/worse when the mean exceeds two standard errors, else tie."""

    mean: float
    std: float
    verdict: str


@dataclass(frozen=True)
class VariantSummary:
    """A variant's row: ``stats`` metric -> (mean, std) over its ``seeds`` (costs included), and the paired
    comparison with ``ddpm`` (None for ddpm itself or without it)."""

    seeds: int
    stats: dict[str, tuple[float, float]]
    vs_ddpm: dict[str, Paired] | None = None

    def to_json(self) -> dict:
        out: dict = {"seeds": self.seeds, **{k: list(v) for k, v in self.stats.items()}}
        if self.vs_ddpm is not None:
            out["vs_ddpm"] = {k: [p.mean, p.std, p.verdict] for k, p in self.vs_ddpm.items()}
        return out


@dataclass(frozen=True)
class SettingSummary:
    """One setting: what its training data score (``reference``) and each variant's row."""

    reference: dict[str, float] = field(default_factory=dict)
    variants: dict[str, VariantSummary] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "reference": dict(self.reference),
            "variants": {v: r.to_json() for v, r in self.variants.items()},
        }


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
    if key == "sigma_mean" and "data_sigma_mean" in ref:
        return f"{ref['data_sigma_mean']:.2f}"
    if key in ("nn_cos_mean", "near_copy_share") and f"ref_{key}" in ref:
        return f"(fresh clean data {ref[f'ref_{key}']:.4f})"
    return ""


def mean_std(v: Sequence[float]) -> tuple[float, float]:
    n = len(v)
    m = sum(v) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0)


def _paired(rv: list[RunRecord], base: dict[int, dict]) -> dict[str, Paired]:
    cmp = {}
    for key, _, lower in COLUMNS:
        diffs = [r.metrics[key] - base[r.seed][key] for r in rv
                 if r.seed in base and key in r.metrics and key in base[r.seed]]  # fmt: skip
        if diffs:
            m, sd = mean_std(diffs)
            se = sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("inf")
            verdict = "tie" if abs(m) <= 2 * se else ("better" if (m < 0) == lower else "worse")
            cmp[key] = Paired(m, sd, verdict)
    return cmp


def aggregate(records: list[RunRecord], spec: CompareSpec) -> dict[str, SettingSummary]:
    """Per setting: the references of its training data (sliced-W2 floor included) and, per variant, the
    mean ± std over seeds with the difference to ``ddpm`` paired by seed."""
    out: dict[str, SettingSummary] = {}
    for s in spec.settings:
        recs = [r for r in records if r.setting == s]
        if not recs:
            continue
        ref = {k: recs[0].metrics[k] for k in REFERENCE_KEYS if k in recs[0].metrics}
        base = {r.seed: r.metrics for r in recs if r.variant == "ddpm"}
        rows: dict[str, VariantSummary] = {}
        for v in spec.modes:
            rv = [r for r in recs if r.variant == v]
            if not rv:
                continue
            stats: dict[str, tuple[float, float]] = {}
            for key in {c[0] for c in COLUMNS} | set(COSTS):
                if key == "train_sec_per_step":
                    vals = [r.sec_per_step for r in rv]
                elif key in ("steps", "flop_units"):
                    vals = [getattr(r, key) for r in rv if getattr(r, key) is not None]
                else:
                    vals = [r.metrics[key] for r in rv if key in r.metrics]
                if vals:
                    stats[key] = mean_std(vals)
            rows[v] = VariantSummary(len(rv), stats, _paired(rv, base) if v != "ddpm" and base else None)
        out[s] = SettingSummary(ref, rows)
    return out


def _fmt(ms, key: str = "") -> str:
    m, s = ms
    if key.startswith("psnr") or key.startswith("sigma"):
        return f"{m:.2f} ± {s:.2f}"
    return f"{m:.4f} ± {s:.4f}"


def markdown_table(
    summary: dict[str, SettingSummary], spec: CompareSpec, seconds: float | None = None
) -> str:
    """One table: a row per setting x variant, mean ± std over seeds; the verdict against ``ddpm``
    (paired by seed: 'better'/'worse' when the mean paired difference exceeds 2 standard errors)."""
    cols = [
        c
        for c in COLUMNS
        if any(c[0] in row.stats for blk in summary.values() for row in blk.variants.values())
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
        refcells = [_reference_cell(c[0], blk.reference) for c in cols]
        lines.append(f"| {s} | *training data* | " + " | ".join(refcells) + " | | | | |")
        for v, row in blk.variants.items():
            st = row.stats
            cells = [_fmt(st[c[0]], c[0]) if c[0] in st else "" for c in cols]
            vs = row.vs_ddpm
            verdict = " / ".join(vs[k].verdict if k in vs else "" for k in verdicts) if vs else "—"
            sps = f"{st['train_sec_per_step'][0] * 1000:.0f} ms" if "train_sec_per_step" in st else ""
            units = f"{st['flop_units'][0]:.3g}" if "flop_units" in st else ""
            steps = f"{st['steps'][0]:.0f}" if "steps" in st else ""
            lines.append(
                f"| {s} | {v} | " + " | ".join(cells) + f" | {verdict} | {units} | {steps} | {sps} |"
            )
    return "\n".join(lines + _notes(summary, spec, seconds)) + "\n"


def _notes(summary: dict[str, SettingSummary], spec: CompareSpec, seconds: float | None) -> list[str]:
    images = any(SETTINGS[s].images for s in summary if s in SETTINGS)
    points = any(not SETTINGS[s].images for s in summary if s in SETTINGS)
    models = ([f"MLP {spec.hidden}x{spec.depth}"] if points else []) + (
        [f"UNet tiny {unet_desc(spec)}"] if images else []
    )
    attack = (
        f"attack: PGD {spec.attack_steps} steps, L-inf radius {spec.attack_radius} at "
        f"t={list(spec.attack_at)}, {spec.attack_n} samples"
        if spec.attack
        else "no trajectory attack"
    )
    notes = [
        "",
        f"{len(spec.seeds)} seeds ({', '.join(map(str, spec.seeds))}); {length_desc(spec)}, "
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
    return notes
