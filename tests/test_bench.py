"""fastat bench: FLOP accounting and the naive baseline (timings themselves belong to benchmarks/)."""

import pytest
import torch
from torch import nn

from fastat.bench import BenchSetting, format_result, forward_equivalents, model_forward_flops, naive_at_step, run_bench
from fastat.budget import Budget
from fastat.models import build_model
from fastat.objective import ATObjective
from fastat.schedule import NoiseSchedule


def test_forward_equivalents_match_the_flop_count_of_spec():
    assert forward_equivalents(ATObjective(mode="ddpm")) == 3
    assert forward_equivalents(ATObjective(mode="adv")) == 8  # SPEC: 3 + 2 + 3
    assert forward_equivalents(ATObjective(mode="pgd", pgd_steps=3)) == 12
    assert forward_equivalents(ATObjective(mode="rand")) == 6


def test_model_forward_flops_counts_matmuls():
    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(7, 5)

        def forward(self, x, t):
            return self.l(x)

    assert model_forward_flops(Lin(), torch.randn(3, 7), torch.zeros(3, dtype=torch.long)) == 2 * 3 * 7 * 5


@pytest.mark.parametrize("mode", ["adv", "pgd", "inv", "ddpm"])
def test_naive_step_trains(mode):
    torch.manual_seed(0)
    m = build_model("tiny", image_size=8)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    ema = [p.detach().clone() for p in m.parameters()]
    before = [p.detach().clone() for p in m.parameters()]
    obj = ATObjective(schedule=NoiseSchedule(), mode=mode, pgd_steps=2, budget=Budget())
    x0 = torch.randn(2, 3, 8, 8)
    loss = naive_at_step(m, opt, ema, x0, obj.schedule.tables(), obj, 1.0, lambda: torch.autocast("cpu", enabled=False))
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before, ema))


def test_run_bench_reports_all_runs():
    r = run_bench(BenchSetting(model="tiny", image_size=8, batch_size=2, steps=2, warmup=1, device="cpu"),
                  fast=False, log=lambda s: None)  # fmt: skip
    assert set(r["runs"]) == {"naive", "fastat", "fastat_ddpm"}
    for run in r["runs"].values():
        assert run["median_ms"] > 0 and run["img_per_s"] > 0 and run["mfu"] is None
    assert r["runs"]["fastat"]["engine"] == "eager"
    assert r["flop_floor_overhead"] == pytest.approx(8 / 3)
    assert "speedup fastat/naive" in format_result(r)
    with pytest.raises(ValueError, match="unknown model preset"):
        run_bench(BenchSetting(model="huge"))
