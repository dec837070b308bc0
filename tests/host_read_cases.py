"""The step a CUDA graph captures makes no host read: run on the CPU, op by op, with the fused Triton
kernels under the interpreter. Run by ``tests/test_capture.py`` in a subprocess with
``TRITON_INTERPRET=1 FASTAT_FORCE_TRITON=1`` (both must be set before triton is imported).

The engine runs its one step body in every mode (the learning rate and EMA weight are 0-dim device
tensors there too), so the eager CPU step is what the graph captures, minus the compiled model: noise
kernel, model, attack gradient, PGD kernel, model, fused loss, backward, gradient norm and clipping,
fused AdamW with its ``found_inf``, EMA, skip counter.
"""

import os

import pytest
import torch

from fastat.app.bench import naive_at_step
from fastat.at import ops
from fastat.at.budget import Budget
from fastat.at.objective import ATObjective
from fastat.at.schedule import NoiseSchedule
from fastat.data import Batch, ImageTransform, IndexedCorruption, Labelled
from fastat.models import build_model
from fastat.step.capture import HostReadCheck
from fastat.step.engine import StepEngine

CASES = [  # (mode, objective options, precision, clip): every branch of the objective and the engine
    ("adv", {}, "fp32", 1.0),
    ("adv-uint8", {}, "fp32", 1.0),  # the loader's uint8 batches, prepared inside the step
    ("pgd", {"pgd_steps": 2, "budget": Budget(norm="l2"), "attack_target": "equivariance"}, "fp32", 1.0),
    ("inv", {"lam_scale": "radius", "detach_clean": True}, "fp32", 0.0),
    ("rand", {}, "bf16", 1.0),
    ("ddpm", {}, "fp32", 0.0),
    ("adv", {"prediction": "v", "dm_weight": torch.linspace(0.5, 1.5, 100)}, "fp32", 1.0),
    ("rand", {"prediction": "x0", "dm_weight": "eps"}, "fp32", 1.0),
    ("adv", {}, "fp16", 1.0),  # GradScaler: scale, unscale_, update
    # free: the replay state's where/keep, the ascent hook in the backward; with the regulariser on part
    # of the batch (reg_frac) and a t-dependent lambda (lam_s_min)
    ("free", {"replays": 2}, "fp32", 1.0),
    ("free-uint8", {"replays": 2, "reg_frac": 0.5, "budget": Budget(norm="l2"), "prediction": "v"}, "fp16", 1.0),  # noqa: E501
    ("adv", {"reg_frac": 0.5, "lam_s_min": 0.3, "prediction": "x0"}, "bf16", 0.0),
    # class-conditional: labels gathered on the device from the uint8 batch's index, dropped, kept by free
    ("free-uint8-labels", {"replays": 2, "p_uncond": 0.3}, "fp32", 1.0),
    ("adv-labels", {"p_uncond": 0.3}, "bf16", 1.0),
]


def test_kernels_run_through_triton():
    x = torch.randn(2, 3)
    assert os.environ.get("TRITON_INTERPRET") == "1" and ops.uses_triton(x)


def uint8_batches(labelled: bool = False):
    """(prepare_batch, good batch, batch that makes the step non-finite) as the image loaders hand them
    (``labelled``: with the set's class labels, as ``--class-cond`` on an image folder)."""
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 3, 8, 8), generator=g, dtype=torch.uint8)
    x = Batch(images, torch.tensor([3, 17]), torch.tensor([True, False]))
    corruption = IndexedCorruption.build(40, 0.5, 0.1, outliers=0.1, seed=1)
    transform = ImageTransform(corruption, labels=torch.arange(40) % 3 if labelled else None)

    def prepare(batch):  # the float batch, poisoned where the index says so (to test the skip)
        out = transform(batch)
        poison = batch.index.view(-1, 1, 1, 1) != 39
        return Labelled(out.x / poison, out.y) if labelled else out / poison

    return prepare, x, Batch(images, torch.tensor([3, 39]), x.flip)


@pytest.mark.parametrize(
    "mode,opts,precision,clip", CASES, ids=[f"{c[0]}-{c[1].get('prediction', 'eps')}-{c[2]}" for c in CASES]
)
def test_step_makes_no_host_read(mode, opts, precision, clip):
    check_step(mode, opts, precision, clip)


ACCUM_CASES = [  # grad_accum = 2: the micro-batch loop, its draws kept across it, one optimizer step
    ("adv", {}, "fp16", 1.0),
    ("pgd", {"pgd_steps": 2, "budget": Budget(norm="l2")}, "bf16", 1.0),
    ("free-uint8", {"replays": 2, "reg_frac": 0.5}, "fp32", 1.0),
]


@pytest.mark.parametrize("mode,opts,precision,clip", ACCUM_CASES, ids=[f"{c[0]}-{c[2]}" for c in ACCUM_CASES])
def test_accumulated_step_makes_no_host_read(mode, opts, precision, clip):
    check_step(mode, opts, precision, clip, grad_accum=2)


def check_step(mode, opts, precision, clip, grad_accum=1):
    torch.manual_seed(0)
    labelled = mode.endswith("labels")
    model = build_model("tiny", image_size=8, num_classes=3 if labelled else 0).train()
    obj = ATObjective(schedule=NoiseSchedule(T=100), mode=mode.split("-")[0], **opts)
    gen = torch.Generator().manual_seed(1)
    prepare = None
    if "uint8" in mode:
        prepare, x, bad = uint8_batches(labelled)
    else:
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        if labelled:
            x, bad = Labelled(x, torch.tensor([2, 0])), Labelled(bad, torch.tensor([1, 1]))
    engine = StepEngine(model, obj, generator=gen, lr=1e-3, clip=clip, precision=precision, log=print,
                        prepare_batch=prepare, grad_accum=grad_accum)  # fmt: skip
    engine.step(x, 1e-3)  # lazy optimizer state (a graph is captured after warm-up steps too)
    feed = [x, bad, x] if obj.mode != "free" else [None, bad, None, x]  # free: None replays the kept batch
    with HostReadCheck() as check:
        stats = [engine.step(b, 1e-3 * (i + 1)) for i, b in enumerate(feed)]
    assert not check.reads, "host reads in the step body:\n" + check.report()
    # the check watched real work: a finite step, a skipped one (free: and its replay), a finite one
    skipped = [0.0, 1.0, 0.0] if obj.mode != "free" else [0.0, 1.0, 1.0, 0.0]
    assert [float(s["skipped"]) for s in stats] == skipped
    assert all(torch.isfinite(s["loss"]) for s in (stats[0], stats[-1]))


def test_check_sees_the_host_reads_it_is_meant_to_catch():
    ema, params = [torch.zeros(3)], [torch.ones(3)]
    with HostReadCheck() as check:
        torch._foreach_lerp_(ema, params, torch.tensor(0.1))  # the Scalar overload reads the weight
        bool(params[0].sum() > 0)
        params[0].nonzero()
        torch.equal(ema[0], params[0])
    ops_seen = {op.rsplit(".", 1)[0] for op, _, _ in check.reads}
    assert {"aten._local_scalar_dense", "aten.nonzero", "aten.equal", "aten.lift_fresh"} <= ops_seen, ops_seen
    assert any("host_read_cases.py" in where for _, _, where in check.reads)


def test_check_sees_host_to_device_copies():
    """A CPU tensor copied into a tensor on another device is flagged ("meta" stands in for CUDA here); a
    copy between tensors on one device is not."""
    host = torch.arange(3.0)
    with HostReadCheck() as check:
        dev = host.to("meta")  # _to_copy from the host
        dev.copy_(host)  # copy_ from the host
        dev.copy_(dev * 2)  # on the device: fine
        host.to(torch.float64).copy_(host)  # on the host: fine
        torch.empty(3, device="meta").to(torch.float16)  # on the device: fine
    flagged = [(op, what) for op, what, _ in check.reads]
    assert flagged == [("aten._to_copy.default", "a host-to-device copy of host memory"),
                       ("aten.copy_.default", "a host-to-device copy of host memory")], flagged  # fmt: skip


def test_report_naive_step_host_reads(capsys):
    """The naive loop (fastat bench's baseline) is not meant to be capturable: reported, never failed."""
    torch.manual_seed(0)
    model = build_model("tiny", image_size=8).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = [p.detach().clone() for p in model.parameters()]
    obj = ATObjective(schedule=NoiseSchedule(T=100), mode="adv")
    x = torch.randn(2, 3, 8, 8)
    tables = obj.schedule.tables()
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    naive_at_step(model, opt, ema, x, tables, obj, 1.0, no_autocast)
    with HostReadCheck() as check:
        naive_at_step(model, opt, ema, x, tables, obj, 1.0, no_autocast)
    with capsys.disabled():
        print(f"\nnaive AT step: {len(check.reads)} host reads\n{check.report()}")
