"""fastat bench: FLOP accounting and the naive baseline (timings themselves belong to benchmarks/)."""

import json

import pytest
import torch
from torch import nn

from fastat.app import bench
from fastat.app.bench import (
    BenchSetting,
    compiled_graphs,
    format_result,
    model_forward_flops,
    naive_at_step,
    run_bench,
)
from fastat.at.budget import Budget
from fastat.at.objective import ATObjective
from fastat.at.schedule import NoiseSchedule
from fastat.models import build_model


def test_compiled_graphs_count_the_second_shape_of_reg_frac():
    """reg_frac < 1 runs the model at B and at n = ceil(f B): one more static compile."""
    cases = [("ddpm", 0.25, 1), ("adv", 1.0, 2), ("adv", 0.25, 3), ("pgd", 0.5, 3), ("free", 1.0, 1),
             ("free", 0.5, 2), ("rand", 0.5, 2), ("rand", 0.9, 1), ("adv", 0.99, 2)]  # fmt: skip
    for mode, f, want in cases:
        assert compiled_graphs(ATObjective(mode=mode, reg_frac=f), 8) == want, (mode, f)


def test_bench_of_free_counts_units_per_image_seen():
    """free with the regulariser on half the batch: 3 + 3 * 0.5 units per image seen; a new batch every 2
    steps; the naive rows run the paper's adv on the whole batch (8 units)."""
    setting = BenchSetting(model="tiny", image_size=8, batch_size=2, steps=2, warmup=1, device="cpu",
                           mode="free", reg_frac=0.5)  # fmt: skip
    r = run_bench(setting, fast=False, log=lambda s: None, runs=("fastat", "naive"))
    fa, nv = r["runs"]["fastat"], r["runs"]["naive"]
    assert fa["units_per_image"] == 4.5 and nv["units_per_image"] == 8 and r["naive_mode"] == "adv"
    assert fa["gflop_per_image"] == pytest.approx(r["fwd_gflops"] / 2 * 4.5)
    assert fa["fresh_img_per_s"] == pytest.approx(fa["img_per_s"] / 2)
    assert r["flop_floor_overhead"] == pytest.approx(1.5)
    text = format_result(r)
    assert "mode=free m=2 reg_frac=0.5" in text and "naive rows: the paper's adv" in text


def test_bench_times_the_accumulated_step(monkeypatch):
    """--grad-accum 2: fastat's timed step runs the objective on 2 micro-batches (the naive rows once on
    the whole batch), and the report says so."""
    calls: list = []
    call = ATObjective.__call__

    def counting(self, *args, **kw):
        calls.append(kw.get("micro"))
        return call(self, *args, **kw)

    monkeypatch.setattr(ATObjective, "__call__", counting)
    setting = BenchSetting(model="tiny", image_size=8, batch_size=4, steps=2, warmup=1, device="cpu",
                           grad_accum=2)  # fmt: skip
    r = run_bench(setting, fast=False, log=lambda s: None, runs=("fastat",))
    assert calls == [(0, 2), (1, 2)] * 3  # 1 warm-up + 2 timed steps
    assert r["setting"]["grad_accum"] == 2 and r["runs"]["fastat"]["median_ms"] > 0
    text = format_result(r)
    assert "B=4 fp32 mode=adv grad_accum=2" in text and "2 micro-batches of 2" in text
    with pytest.raises(ValueError, match="--grad-accum 3 must be >= 1 and divide --batch-size 4"):
        run_bench(BenchSetting(batch_size=4, grad_accum=3))


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
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    loss, norm = naive_at_step(m, opt, ema, x0, obj.schedule.tables(), obj, 1.0, no_autocast)
    assert torch.isfinite(loss) and torch.isfinite(norm) and norm > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(before, ema, strict=True))


def test_run_bench_reports_all_runs():
    r = run_bench(BenchSetting(model="tiny", image_size=8, batch_size=2, steps=2, warmup=1, device="cpu"),
                  fast=False, log=lambda s: None)  # fmt: skip
    assert set(r["runs"]) == {"naive", "fastat", "fastat_ddpm"}  # --no-fast: nothing compiled, naive included
    for run in r["runs"].values():
        assert run["median_ms"] > 0 and run["img_per_s"] > 0 and run["mfu"] is None and run["error"] is None
        assert run["first_step_s"] > 0 and run["warmup_steps"] == 1 and run["peak_mem_gib"] is None
    assert r["runs"]["fastat"]["engine"] == "eager" and r["runs"]["fastat"]["compile_s"] is None
    assert r["flop_floor_overhead"] == pytest.approx(8 / 3)
    assert r["speedup_vs_naive"] == pytest.approx(
        r["runs"]["naive"]["median_ms"] / r["runs"]["fastat"]["median_ms"]
    )
    assert r["speedup_vs_naive_compiled"] is None
    assert "speedup fastat/naive" in format_result(r)
    with pytest.raises(ValueError, match="unknown model preset"):
        run_bench(BenchSetting(model="huge"))


class _NaNModel(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m, self.sample_shape = m, m.sample_shape

    def forward(self, x, t):
        return self.m(x, t) * float("nan")


def test_non_finite_runs_report_no_time(monkeypatch):
    real = bench.build_model
    monkeypatch.setattr(bench, "build_model", lambda name, **kw: _NaNModel(real(name, **kw)))
    r = run_bench(BenchSetting(model="tiny", image_size=8, batch_size=2, steps=2, warmup=1, device="cpu"),
                  fast=False, log=lambda s: None)  # fmt: skip
    for run in r["runs"].values():
        assert run["median_ms"] is None and run["img_per_s"] is None
        assert run["error"] == "non-finite loss or gradients in 2 of 2 timed steps: no time reported"
    assert r["speedup_vs_naive"] is None and r["at_overhead"] is None
    text = format_result(r)
    assert "fastat: non-finite loss" in text and "speedup fastat/naive: -x" in text


def test_json_is_written_after_every_run(tmp_path, monkeypatch):
    seen = []
    real_write = bench.atomic_write_text

    def spy(path, text):
        seen.append([sorted(r["runs"]) for r in json.loads(text)])
        return real_write(path, text)

    monkeypatch.setattr(bench, "atomic_write_text", spy)
    out = tmp_path / "b.json"
    args = "--model tiny --image-size 8 --batch-size 2 --steps 1 --warmup 1 --device cpu --no-fast --json"
    code = bench.main([*args.split(), str(out)])
    assert code == 0 and seen[0] == [["naive"]] and seen[-1] == [["fastat", "fastat_ddpm", "naive"]]
    assert json.loads(out.read_text())[0]["runs"]["fastat_ddpm"]["engine"] == "eager"


def test_a_bench_with_no_run_left_prints_its_table():
    """--no-fast skips naive_compiled; a bench asked for it alone (gpu_check.sh's warm_c128 in SMOKE) has
    no row and no ratio, and still prints its table (it raised KeyError)."""
    setting = BenchSetting(model="tiny", image_size=8, batch_size=2, steps=1, warmup=1, device="cpu")
    r = run_bench(setting, fast=False, log=lambda s: None, runs=("naive_compiled",))
    assert r["runs"] == {} and "speedup fastat/naive: -x" in format_result(r)
