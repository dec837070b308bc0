"""benchmarks/cost_summary.py: the share of adv's distance reduction, paired by seed, and the goal check."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cost_summary  # noqa: E402


def _rec(variant: str, seed: int, dist: float, units: float) -> dict:
    metrics = {"dist_mean": dist, "sw": 0.05 + 0.01 * seed, "attack_dist_pgd_mean": 2 * dist}
    return {"setting": "s", "variant": variant, "seed": seed, "flop_units": units, "steps": 100,
            "metrics": metrics}  # fmt: skip


def test_share_and_goal(tmp_path, capsys):
    # ddpm 0.30 / 0.20, adv 0.10 / 0.10: reductions 0.2 / 0.1; cheap 0.13 / 0.12 (0.17 / 0.08: 83%)
    recs = [_rec("ddpm", 0, 0.30, 3), _rec("ddpm", 1, 0.20, 3), _rec("adv", 0, 0.10, 8),
            _rec("adv", 1, 0.10, 8), _rec("cheap", 0, 0.13, 4.25), _rec("cheap", 1, 0.12, 4.25),
            _rec("dear", 0, 0.10, 6),
            _rec("dear", 1, 0.10, 6), _rec("weak", 0, 0.16, 4), _rec("weak", 1, 0.13, 4)]  # fmt: skip
    lines, meets = cost_summary.summarise({"records": recs}, goal_cost=1.5, goal_share=0.8)
    assert meets == {"ddpm": False, "adv": False, "cheap": True, "dear": False, "weak": False}
    cheap = next(x for x in lines if "| cheap |" in x)
    # dist -50% vs ddpm's mean 0.25 (0.125); share 0.25 / 0.3 = 83%, per seed 80% and 85%
    assert "| 4.25 | 1.42 | 100 | -50% |" in cheap and "| 83% (80-85%) |" in cheap
    weak = next(x for x in lines if "| weak |" in x)
    assert "| 70% (70-70%) |" in weak
    path = tmp_path / "compare.json"
    path.write_text(json.dumps({"records": recs}))
    assert cost_summary.main([str(path)]) == 0
    assert "goal (<= 1.5x DDPM per step, >= 80% of adv's distance reduction in every setting): cheap" in (
        capsys.readouterr().out
    )
    bare = [{k: v for k, v in r.items() if k != "flop_units"} for r in recs]
    path.write_text(json.dumps({"records": bare}))
    assert cost_summary.main([str(path)]) == 2
    assert cost_summary.main([str(tmp_path / "missing.json")]) == 2
    assert "cost_summary: error: cannot read" in capsys.readouterr().err
