"""benchmarks/attack_study.py: issue 20's table, paired by seed against ddpm."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import attack_study  # noqa: E402


def _run(root: Path, variant: str, seed: int, dist: float, sw: float, eff: float) -> None:
    d = root / "runs" / "subspaces-s0.2" / f"{variant}-seed{seed}"
    d.mkdir(parents=True)
    rec = {"setting": "subspaces-s0.2", "variant": variant, "seed": seed,
           "metrics": {"dist_mean": dist, "sw": sw, "sw_proj": sw}}  # fmt: skip
    (d / "compare-run.json").write_text(json.dumps({"record": rec}))
    lines = [{"kind": "train", "step": 1, "attack_eff": 9.0, "attack_eff_b0": 9.0},
             {"kind": "train", "step": 2, "attack_eff": eff, "attack_eff_b0": eff}]  # fmt: skip
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))


def test_the_table_pairs_by_seed_and_reads_the_last_attack_eff(tmp_path, capsys):
    for seed, base in ((0, 0.2), (1, 0.1)):
        _run(tmp_path, "ddpm", seed, base, 0.05, 1.0)
        _run(tmp_path, "adv", seed, base * 0.8, 0.06, 0.5)
    assert attack_study.main([str(tmp_path), "--json", str(tmp_path / "rows.json")]) == 0
    out = capsys.readouterr().out
    (adv,) = [ln for ln in out.splitlines() if "`adv`" in ln]
    assert "-20% (2/2 lower)" in adv and "+20% (0/2 lower)" in adv and "0.50 (0.50)" in adv
    assert len(json.loads((tmp_path / "rows.json").read_text())["rows"]) == 4
    assert attack_study.main([str(tmp_path / "nothing")]) == 2
