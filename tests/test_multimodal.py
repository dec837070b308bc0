"""The multimodal known image sets (``subspaces``, ``scales``) and the ``attack_eff`` diagnostic."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastat.at.diagnostics import attack_efficiency
from fastat.at.objective import ATObjective
from fastat.data import build_dataset, known_dataset


@pytest.mark.parametrize("name", ["subspaces", "scales"])
def test_clean_samples_lie_on_the_union_and_labels_are_their_component(name):
    d = known_dataset(name)
    x, labels = d.sample_with_labels(3000, torch.Generator().manual_seed(1))
    assert x.shape == (3000, 3, 8, 8) and x.dtype == torch.float32
    assert d.distance_to_support(x).max() < 1e-5
    assert torch.equal(d.component(x), labels)
    freq = torch.bincount(labels, minlength=3).double() / 3000
    assert torch.allclose(freq, d.weights, atol=0.03)  # unequal weights 0.5 / 0.3 / 0.2 (3 sigma ~ 0.027)


def test_distance_is_the_minimum_over_the_components():
    d = known_dataset("subspaces")
    x, labels = d.sample_with_labels(64, torch.Generator().manual_seed(2))
    flat = x.reshape(64, -1).double()
    noise = torch.randn(flat.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.1
    per = []
    for j in range(3):  # the residual to each component's affine subspace, written out
        c = flat + noise - d.means[j]
        per.append((c - (c @ d.bases[j]) @ d.bases[j].T).norm(dim=1) / math.sqrt(d.dim))
    want = torch.stack(per, 1).min(1).values
    got = d.distance_to_support((flat + noise).reshape(x.shape).float())
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(torch.stack(per, 1)[:, 0], want)  # not just the first component
    p = d.project((flat + noise).reshape(x.shape))
    assert d.distance_to_support(p).max() < 1e-5


def test_scales_components_differ_in_scale():
    d = known_dataset("scales")
    x, labels = d.sample_with_labels(6000, torch.Generator().manual_seed(4))
    flat = x.reshape(len(x), -1).double()
    for j, want in enumerate((0.05, 0.15, 0.35)):
        pix = (flat[labels == j] - d.means[j]).std()
        assert pix.item() == pytest.approx(want, rel=0.1)


def test_build_dataset_sizes_and_corrupts_the_multimodal_sets():
    td = build_dataset("subspaces", n=256, seed=0, noise_p=0.9, noise_sigma=0.2, image_size=16)
    assert td.sample_shape == (3, 16, 16) and td.kind == "image"
    dist = td.known.distance_to_support(td.data)
    assert dist[td.noisy_mask].mean() > 0.15 and dist[~td.noisy_mask].max() < 1e-5


class _Constant(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


class _Summing(torch.nn.Module):
    """eps(x) = c * sum(x) in every element: the residual grows with (sum w)^2, which the attack's
    sign step maximises (all signs equal) and random signs do not."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x, t):
        return self.c * x.sum(dim=(1, 2, 3), keepdim=True).expand_as(x)


def test_attack_eff_is_one_when_no_direction_is_harder():
    x0 = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    stats = attack_efficiency(_Constant(), ATObjective(mode="adv"), x0, torch.Generator().manual_seed(1))
    assert stats["attack_eff"].item() == pytest.approx(1.0, abs=1e-6)
    assert set(stats) >= {"attack_eff_b0", "attack_eff_b3", "res_attack", "res_random"}


def test_attack_eff_is_large_when_the_attack_finds_the_hard_direction():
    x0 = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    stats = attack_efficiency(_Summing(10.0), ATObjective(mode="adv"), x0, torch.Generator().manual_seed(1))
    assert stats["attack_eff"].item() > 5
    for b in range(4):
        assert stats[f"attack_eff_b{b}"].item() > 1


def test_training_logs_attack_eff_and_can_turn_it_off(tmp_path):
    from fastat.app.cli import main

    base = ["train", "--dataset", "subspaces", "--steps", "4", "--batch-size", "8", "--no-progress",
            "--set", "run.log_every=2", "--set", "run.eval_n=0", "--set", "model.kwargs.ch=8"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "on")]) == 0
    recs = [json.loads(r) for r in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 2 and all(math.isfinite(r["attack_eff"]) and r["attack_eff"] > 0 for r in train)
    assert main([*base, "--out", str(tmp_path / "off"), "--set", "run.attack_eff=false"]) == 0
    recs = [json.loads(r) for r in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert all("attack_eff" not in r for r in recs)
    # the diagnostic draws from its own generator and runs in eval mode: the training is the same
    on = [r["loss"] for r in (json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines())
          if r["kind"] == "train"]  # fmt: skip
    assert on == [r["loss"] for r in recs if r["kind"] == "train"]


def test_fastat_eval_reports_attack_eff_on_a_multimodal_run(tmp_path, capsys):
    from fastat.app.cli import main

    run = tmp_path / "r"
    assert main(["train", "--dataset", "scales", "--steps", "3", "--batch-size", "8", "--no-progress",
                 "--set", "run.eval_n=0", "--set", "model.kwargs.ch=8", "--out", str(run)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--n", "16", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "attack_eff: attack / random w residual" in out
    report = json.loads((run / "eval.json").read_text())
    assert report["dataset"] == "scales" and report["metrics"]["attack_eff"] > 0
    assert {f"attack_eff_b{b}" for b in range(4)} <= set(report["metrics"])
