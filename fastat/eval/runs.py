"""Several finished runs side by side: ``fastat eval runs RUN_A RUN_B ... [--out FILE]``.

    table = runs_table([evaluate_run(r, opts) for r in ("runs/ddpm", "runs/adv")])

Each run is evaluated with the same options (:func:`fastat.eval.evaluate.evaluate_run`); the table has a
row per run, the training images' own values (the references) in a row per dataset, and a "vs the first
run" column: how each measure moved against the first run (lower is better for all of them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastat.eval.format import json_safe

__all__ = ["MEASURES", "RUNS_MARK", "runs_json", "runs_table", "vs_first", "write_runs_json"]

# (metric key, column title, the training images' reference key); lower is better for each
MEASURES = (
    ("sigma_mean", "noise sigma mean (0-255)", "data_sigma_mean"),
    ("sigma_median", "noise sigma median", "data_sigma_median"),
    ("nn_cos_mean", "NN cosine", "ref_nn_cos_mean"),
    ("near_copy_share", "near-copy share", "ref_near_copy_share"),
    ("fid", "FID vs --ref", "data_fid"),
    ("kid", "KID vs --ref", "data_kid"),
    ("dist_mean", "dist to clean support", "data_dist_mean"),
    ("sw", "sliced W2", "sw_data"),
)
SHORT = {"sigma_mean": "sigma", "nn_cos_mean": "NN cos", "near_copy_share": "near-copy", "fid": "FID",
         "kid": "KID", "dist_mean": "dist", "sw": "SW"}  # fmt: skip
RUNS_MARK = "fastat eval runs"


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def vs_first(first: dict, other: dict) -> dict[str, float]:
    """Per measure in both metric dicts: the change of ``other`` against ``first`` (a relative change for
    sigma, FID, KID, distances; an absolute one for similarities and shares, which live in [0, 1])."""
    out = {}
    for key, _, _ in MEASURES:
        a, b = _num(first.get(key)), _num(other.get(key))
        if a is None or b is None or key == "sigma_median":
            continue
        if key in ("nn_cos_mean", "near_copy_share"):
            out[key] = b - a
        elif a != 0:
            out[key] = (b - a) / abs(a)
    return out


def _vs_cell(change: dict[str, float]) -> str:
    parts = []
    for key, v in change.items():
        parts.append(
            f"{SHORT[key]} {v:+.3f}"
            if key in ("nn_cos_mean", "near_copy_share")
            else f"{SHORT[key]} {v:+.0%}"
        )
    return ", ".join(parts)


def _cell(key: str, v) -> str:
    v = _num(v)
    if v is None:
        return ""
    if key.startswith("sigma") or key == "fid":
        return f"{v:.2f}"
    return f"{v:.3f}" if key == "near_copy_share" else f"{v:.4f}"


def runs_table(reports: list[dict]) -> str:
    """A markdown table of the reports of :func:`~fastat.eval.evaluate.evaluate_run`, first run first."""
    cols = [c for c in MEASURES if any(c[0] in r["metrics"] for r in reports)]
    head = "| run | mode | step | " + " | ".join(c[1] for c in cols) + " | vs the first run |"
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    seen = set()
    for r in reports:  # the references: once per dataset
        m = r["metrics"]
        if r["dataset"] in seen or not any(ref in m for _, _, ref in cols):
            continue
        seen.add(r["dataset"])
        lines.append(f"| *training images* ({r['dataset']}) | | | "
                     + " | ".join(_cell(k, m.get(ref)) for k, _, ref in cols) + " | |")  # fmt: skip
    ref = next((r["metrics"] for r in reports if "ref_sigma_mean" in r["metrics"]), None)
    if ref is not None:  # the held-out clean images' own noise level
        refs = {"sigma_mean": ref["ref_sigma_mean"], "sigma_median": ref["ref_sigma_median"]}
        lines.append(
            "| *--ref images* | | | " + " | ".join(_cell(k, refs.get(k)) for k, _, _ in cols) + " | |"
        )
    first = reports[0]["metrics"]
    for i, r in enumerate(reports):
        m = r["metrics"]
        vs = "—" if i == 0 else _vs_cell(vs_first(first, m))
        lines.append(f"| {r['run']} | {r['objective']['mode']} | {r['step']} | "
                     + " | ".join(_cell(k, m.get(k)) for k, _, _ in cols) + f" | {vs} |")  # fmt: skip
    notes = sorted({r["metrics"]["fid_note"] for r in reports if "fid_note" in r["metrics"]})
    s = reports[0]["settings"]
    how = f"{s['n']} samples per run ({s['sampler']} {s['steps']} steps, eta {s['eta']}, seed {s['seed']})."
    lines += ["", how + " Lower is better in every column. Training images: the first n as trained on "
              "(noise); the last min(n, N/5) against the rest (memorisation); FID/KID of the training images "
              "against --ref."]  # fmt: skip
    return "\n".join(lines + notes) + "\n"


def runs_json(reports: list[dict]) -> dict:
    first = reports[0]["metrics"]
    changes = [{}] + [vs_first(first, r["metrics"]) for r in reports[1:]]
    return {"kind": RUNS_MARK, "runs": reports, "vs_first": changes, "table": runs_table(reports)}


def write_runs_json(reports: list[dict], path: str | os.PathLike) -> Path:
    """``path`` <- :func:`runs_json`; a file that is not an earlier ``fastat eval runs`` output is not
    overwritten (ValueError)."""
    from fastat.train.checkpoint import atomic_write_text

    path = Path(path).expanduser()
    if path.exists():
        try:
            ours = json.loads(path.read_text()).get("kind") == RUNS_MARK
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ValueError(f"--out {path} exists and is not a 'fastat eval runs' file; choose another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(json_safe(runs_json(reports)), indent=2) + "\n")
    return path
