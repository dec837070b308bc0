"""The text and JSON forms of a report: :func:`format_report` (what ``fastat eval`` prints) and
:func:`json_safe` (what eval.json and compare.json hold: no NaN/inf tokens)."""

from __future__ import annotations

from fastat.eval.noise import SIGMA_MISSING

__all__ = ["format_report", "json_safe"]


def json_safe(obj):
    """JSON without NaN/inf tokens: non-finite floats become strings."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
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
    if "sigma_mean" in m:
        ref = ""
        if "data_sigma_mean" in m:
            ref = f"  | training images {m['data_sigma_mean']:.2f}, {m['data_sigma_median']:.2f}"
        if "ref_sigma_mean" in m:
            ref += f"  | --ref images {m['ref_sigma_mean']:.2f}, {m['ref_sigma_median']:.2f}"
        lines.append(f"  {'noise level sigma (0-255), mean, median':<46} {m['sigma_mean']:.2f}, "
                     f"{m['sigma_median']:.2f}{ref}")  # fmt: skip
    elif report["kind"] == "image":
        lines.append(f"  {SIGMA_MISSING}")
    if "nn_cos_mean" in m:
        ref = ""
        if "ref_nn_cos_mean" in m:
            what = "fresh clean data" if "sw" in m else "held-out training images"
            ref = f"  | {what}: {m['ref_nn_cos_mean']:.3f}, {m['ref_near_copy_share']:.3f}"
        lines.append(
            f"  {'memorisation: NN cosine, near-copy share':<46} {m['nn_cos_mean']:.3f}, "
            f"{m['near_copy_share']:.3f} (>= {m['near_copy_threshold']}){ref}"
        )
    if "kid" in m:
        label = f"FID / KID vs --ref ({m['ref_images']} images)"
        lines.append(f"  {label:<46} {m['fid']:.2f} / {m['kid']:.4f}  | training images "
                     f"{m['data_fid']:.2f} / {m['data_kid']:.4f}")  # fmt: skip
    if "is" in m:
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
    if "attack_eff" in m:
        buckets = ", ".join(f"{m[k]:.2f}" for k in sorted(k for k in m if k.startswith("attack_eff_b")))
        lines.append(f"  {'attack_eff: attack / random w residual':<46} {m['attack_eff']:.3f}  "
                     f"(by noise level, low to high: {buckets}; > 1: harder than chance)")  # fmt: skip
    if "fid_note" in m:
        lines.append(f"  {m['fid_note']}")
    if m.get("nonfinite"):
        lines.append(f"  WARNING: {m['nonfinite']} samples are not finite")
    return "\n".join(lines)
