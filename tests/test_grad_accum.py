"""Gradient accumulation (``run.grad_accum``): K micro-batches compute the step of the whole batch.

The objective draws the whole batch's randomness at micro-batch 0 and each micro-batch returns its
share of the loss, so the accumulated step equals the unaccumulated one to float rounding: the loss,
every statistic, the gradients and the weights after the step, on the built-in sets, in every mode.
The host-read check of the captured step with ``grad_accum=2`` is in ``host_read_cases.py``, the 2-rank
all-reduce count in ``dist_child.py`` (``adv-accum2``), resume in ``test_train.py``.
"""

from __future__ import annotations

import pytest
import torch

from fastat.at.budget import Budget
from fastat.at.objective import ATObjective
from fastat.at.schedule import NoiseSchedule
from fastat.data import build_dataset
from fastat.models import build_model
from fastat.step.engine import StepEngine

B = 16


def batches(name: str, steps: int) -> list[torch.Tensor]:
    td = build_dataset(name, n=B * steps, image_size=8, seed=0, progress=False)
    return list(td.data.split(B))


def make(name: str, mode: str, K: int, *, fast: bool = False, precision: str = "fp32", **opts):
    torch.manual_seed(0)
    model = (build_model("mlp", dim=2, hidden=32, depth=1, time_dim=16) if name == "gmm2d"
             else build_model("tiny", image_size=8))  # fmt: skip
    obj = ATObjective(schedule=NoiseSchedule(T=100), mode=mode, **opts)
    logs: list[str] = []
    # AdamW's eps = 1: the update is near-linear in the gradient (not its sign), so summed instead of
    # averaged micro-batch gradients would show in the weights too
    engine = StepEngine(model.train(), obj, generator=torch.Generator().manual_seed(1), lr=1e-2, eps=1.0,
                        clip=0.0, fast=fast, precision=precision, grad_accum=K, log=logs.append)  # fmt: skip
    return engine, logs


def train(engine: StepEngine, xs: list[torch.Tensor]) -> tuple[list[dict], list[torch.Tensor]]:
    """Steps on ``xs`` (None where ``free`` replays); the stats of each and the last step's gradients."""
    stats = []
    for x in xs:
        s = engine.step(x if engine.wants_batch else None, 1e-2)
        stats.append({k: v.clone() for k, v in s.items()})
    return stats, [p.grad.clone() for p in engine.model.parameters()]


def assert_same_step(a, b, atol=1e-6, rtol=1e-5):
    (stats_a, grads_a, model_a), (stats_b, grads_b, model_b) = a, b
    for sa, sb in zip(stats_a, stats_b, strict=True):
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], atol=atol, rtol=rtol, msg=k)
    assert any(g.abs().sum() > 0 for g in grads_a)  # the gradients compared are not all zero
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(gb, ga, atol=atol, rtol=rtol)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, atol=atol, rtol=rtol)


CASES = [  # (set, mode, objective options, K): every branch of the micro-batch loss
    ("gmm2d", "ddpm", {}, 2),
    ("gmm2d", "adv", {}, 4),
    ("gmm2d", "pgd", {"pgd_steps": 2, "budget": Budget(norm="l2"), "attack_target": "equivariance"}, 2),
    ("gmm2d", "rand", {"reg_frac": 0.3}, 4),  # head of 5 rows: micro-batches with 4, 1, 0, 0 of them
    ("gmm2d", "inv", {"lam_scale": "radius", "detach_clean": True}, 3),  # 16 rows as 5, 5, 6
    ("subspace", "adv", {"prediction": "v", "dm_weight": "eps"}, 2),
    ("subspace", "adv", {"reg_frac": 0.5, "lam_s_min": 0.3}, 4),
    ("subspace", "free", {"replays": 2}, 2),  # the replay's w comes from the micro-batches' hooks
    ("gmm2d", "free", {"replays": 3, "reg_frac": 0.4, "prediction": "x0"}, 4),
]


@pytest.mark.parametrize("name,mode,opts,K", CASES, ids=[f"{c[0]}-{c[1]}-K{c[3]}" for c in CASES])
def test_accumulated_step_equals_the_whole_batch_step(name, mode, opts, K):
    xs = batches(name, 3)
    whole, _ = make(name, mode, 1, **opts)
    accum, _ = make(name, mode, K, **opts)
    a, b = train(whole, xs), train(accum, xs)
    assert_same_step((*a, whole.model), (*b, accum.model))
    if mode == "free":
        assert float(b[0][1]["gain"]) != 1.0  # the replay used the ascended w


def test_fp16_accumulated_step_scales_each_micro_batch_alike():
    """One step (a second one would compare the FGSM signs of near-zero float16 gradients). The
    gradients are as near the float32 step's as the unaccumulated float16 step's are (float16 rounds the
    per-sample sums inside each backward, so the two float16 steps differ by that rounding)."""
    xs = batches("subspace", 1)
    ref, _ = make("subspace", "adv", 1)
    whole, _ = make("subspace", "adv", 1, precision="fp16")
    accum, _ = make("subspace", "adv", 2, precision="fp16")
    r, a, b = train(ref, xs), train(whole, xs), train(accum, xs)
    assert float(b[0][0]["loss_scale"]) == float(a[0][0]["loss_scale"]) == 65536.0
    assert accum.scaler.state_dict() == whole.scaler.state_dict()
    for k in ("loss", "loss_dm", "reg", "j"):
        torch.testing.assert_close(b[0][0][k], a[0][0][k], atol=1e-6, rtol=1e-5, msg=k)
    for g_ref, g_whole, g_acc in zip(r[1], a[1], b[1], strict=True):
        err_whole, err_acc = (g_whole - g_ref).abs().max(), (g_acc - g_ref).abs().max()
        assert err_acc <= 2 * err_whole + 1e-6 * g_ref.abs().max(), (err_acc, err_whole)


@pytest.mark.slow
def test_compiled_accumulated_step_equals_the_eager_whole_batch_step():
    xs = batches("gmm2d", 2)
    eager, _ = make("gmm2d", "adv", 1)
    fast, logs = make("gmm2d", "adv", 2, fast=True)
    a, b = train(eager, xs), train(fast, xs)
    assert fast.mode == "compiled" and not logs, logs  # compiled, no fallback
    assert_same_step((*a, eager.model), (*b, fast.model), atol=1e-5, rtol=1e-4)


def test_micro_batches_draw_once_per_batch():
    """One draw of the generator per step whatever K (the next batch starts from the same state)."""
    xs = batches("gmm2d", 2)
    states = []
    for K in (1, 4):
        engine, _ = make("gmm2d", "adv", K)
        train(engine, xs)
        states.append(engine.generator.get_state())
    assert torch.equal(states[0], states[1])


def test_bad_grad_accum_is_refused():
    model = build_model("mlp", dim=2, hidden=8, depth=1, time_dim=8)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="grad_accum must be an integer >= 1"):
            StepEngine(model, ATObjective(), generator=torch.Generator(), lr=1e-3, grad_accum=bad)
    engine, _ = make("gmm2d", "adv", 4)
    with pytest.raises(ValueError, match=r"0 <= k < K <= the batch size 2"):
        engine.step(torch.randn(2, 2), 1e-3)
    obj = ATObjective(schedule=NoiseSchedule(T=100))
    with pytest.raises(ValueError, match="micro-batch 1 of 2 before micro-batch 0"):
        obj(lambda x, t: x, torch.randn(4, 2), micro=(1, 2))


def test_cli_grad_accum_flag_and_one_line_errors(capsys):
    from train_helpers import POINTS, assert_one_line_error, run_cli

    code, out, _ = run_cli(capsys, "train", *POINTS, "--batch-size", "8", "--grad-accum", "4", "--dry-run")
    assert code == 0 and "grad_accum: 4" in out
    code, _, err = run_cli(capsys, "train", *POINTS, "--batch-size", "8", "--grad-accum", "3", "--dry-run")
    assert_one_line_error(code, err, "run.batch_size (--batch-size) 8 must be divisible by run.grad_accum")
    code, _, err = run_cli(capsys, "train", *POINTS, "--set", "run.grad_accum=0", "--dry-run")
    assert_one_line_error(code, err, "run.grad_accum (--grad-accum)")


def test_each_rank_splits_its_share_into_micro_batches():
    from fastat.train.config import ConfigError, check_grad_accum

    check_grad_accum(32, 4, world_size=2)
    with pytest.raises(ConfigError, match=r"24 \(12 per rank of 2\) must be divisible by .* 8"):
        check_grad_accum(24, 8, world_size=2)


def test_the_memory_estimate_counts_one_micro_batch_of_activations():
    """The memory check (fastat.train.memory) admits a batch that fits as K micro-batches: the kept
    activations are one micro-batch's, the batch tensors still the whole batch's."""
    from fastat.train.config import TrainConfig
    from fastat.train.memory import estimate_step

    cfg = TrainConfig().with_overrides({"data.dataset": "gmm2d", "run.batch_size": 32, "model.name": "mlp"})
    one = estimate_step(cfg, torch.device("cpu"))
    four = estimate_step(cfg.with_overrides({"run.grad_accum": 4}), torch.device("cpu"))
    assert four["activations"] * 4 == one["activations"] > 0
    assert four["batch"] == one["batch"] and four["weights"] == one["weights"]
