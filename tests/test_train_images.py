"""Real image sets in the trainer: the engine's ``prepare_batch`` hook (uint8 batches converted inside
the step, no host reads), ``fastat train --dataset`` on prepared sets / folders / both placements, and
exact mid-epoch resume for each placement."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastat.at.budget import Budget
from fastat.at.objective import ATObjective
from fastat.at.schedule import NoiseSchedule
from fastat.data import Batch, ImageTransform, IndexedCorruption
from fastat.step.engine import StepEngine

HOST_READS = ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal")


class Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


class ConvEps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * (1 + t.view(-1, 1, 1, 1).float() / 1000)


def _engine(prepare_batch=None, device="cpu", fast=False, seed=0):
    torch.manual_seed(seed)
    model = ConvEps().to(device)
    obj = ATObjective(schedule=NoiseSchedule(T=100), mode="adv", budget=Budget(r_min=0.1, r_scale=0.2))
    gen = torch.Generator(device).manual_seed(seed + 1)
    kw = dict(lr=1e-3, ema_decay=0.9, fast=fast, prepare_batch=prepare_batch)
    return StepEngine(model, obj, generator=gen, **kw)


def _batches(n, device="cpu", b=6):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        images = torch.randint(0, 256, (b, 3, 8, 8), generator=g, dtype=torch.uint8)
        out.append(Batch(images, torch.randint(0, 40, (b,), generator=g), torch.rand(b, generator=g) < 0.5))
    return [Batch(*(t.to(device) for t in x)) for x in out]


def test_prepare_batch_is_the_first_thing_the_step_does():
    transform = ImageTransform(IndexedCorruption.build(40, 0.5, 0.1, seed=1))
    xs = _batches(3)
    hooked, plain = _engine(transform), _engine()
    for i, x in enumerate(xs):
        a = hooked.step(x, lr=1e-3 * (i + 1))
        b = plain.step(transform(x), lr=1e-3 * (i + 1))
        assert torch.equal(a["loss"], b["loss"])
    for p, q in zip(hooked.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_image_transform_has_no_host_reads():
    transform = ImageTransform(IndexedCorruption.build(40, 0.5, 0.1, outliers=0.2, seed=1))
    with Recorder() as rec:
        transform(_batches(1)[0])
    assert rec.ops and not [op for op in rec.ops if op.split(".")[0] in HOST_READS], rec.ops


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_step_with_uint8_batches_matches_eager():
    transform = ImageTransform(IndexedCorruption.build(40, 0.5, 0.1, seed=1), device="cuda")
    xs = _batches(8, "cuda")
    eager, graphed = _engine(transform, "cuda"), _engine(transform, "cuda", fast=True)
    for i, x in enumerate(xs):
        a, b = eager.step(x, lr=1e-3), graphed.step(x, lr=1e-3)
        torch.testing.assert_close(b["loss"], a["loss"], atol=1e-4, rtol=1e-3, msg=f"step {i}")
    assert graphed.mode == "compiled+graph" and graphed._graph is not None
    assert graphed._static_x0.images.dtype == torch.uint8  # the static input keeps the loader's dtype


# -- fastat train on real image sets ---------------------------------------------------------------------

IMG = 8
TINY = ["--set", "model.kwargs={ch: 8, groups: 4}", "--batch-size", "8", "--log-every", "2", "--no-progress",
        "--set", "run.sample_n=4", "--set", "run.sample_steps=3", "--sample-every", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def prepared_set(tmp_path_factory):
    """40 random 10x12 PNGs prepared at 8 px by the CLI: 5 batches of 8 per epoch."""
    import numpy as np
    from PIL import Image

    from fastat.app.cli import main

    root = tmp_path_factory.mktemp("imgs")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(src / f"{i:03d}.png")
    args = ["prepare", str(src), "--image-size", str(IMG), "--out", str(root / "set"), "--no-progress"]
    assert main(args) == 0
    return src, root / "set"


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("first,second", [("stream", "device"), ("device", "stream")])
def test_resume_mid_epoch_is_bit_identical_across_placements(
    prepared_set, tmp_path, capsys, one_thread, first, second
):
    """8 steps straight (device) == 4 steps in one placement + 4 resumed in the other: the batches
    (order, flips, corruption noise) are a function of (seed, epoch, position), not of the placement."""
    from train_helpers import run_cli

    from fastat.train.checkpoint import load_checkpoint

    _, ds = prepared_set
    asked = ["--corrupt-frac", "0.5", "--set", "data.flip=true"]  # noise and flips: the batches differ more
    common = ["train", "--dataset", ds, *TINY, "--save-every", "4", *asked]
    straight, split = tmp_path / "straight", tmp_path / "split"
    code, _, err = run_cli(capsys, *common, "--steps", "8", "--out", straight, "--data-placement", "device")
    assert code == 0 and "placement device: requested" in err, err
    assert run_cli(capsys, *common, "--steps", "4", "--out", split, "--data-placement", first)[0] == 0
    resume = ["--resume", "auto", "--steps", "8", "--no-progress", "--data-placement", second]
    code, _, err = run_cli(capsys, "train", "--out", split, *resume)
    assert code == 0 and f"placement {second}" in err, err
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a.state["loader"]["epoch"] == 1 and a.state["loader"]["samples"] == 24
    for which in ("model", "ema"):
        for k, v in getattr(a, which).items():
            assert torch.equal(v, getattr(b, which)[k]), (which, k)


def test_train_on_a_folder_prepares_once_and_checks_sizes(prepared_set, tmp_path, capsys, one_thread):
    from train_helpers import assert_one_line_error, run_cli

    src, ds = prepared_set
    args = ["train", "--dataset", src, "--image-size", IMG, *TINY, "--steps", "2"]
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "a")
    assert code == 0 and "preparing" in err and "placement device: the set" in err
    assert "fits the budget" in err
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "b", "--data-placement", "stream")
    assert code == 0 and "preparing" not in err and "placement stream: requested" in err, err
    code, _, err = run_cli(capsys, "train", "--dataset", ds, "--image-size", 16, "--out", tmp_path / "c")
    assert_one_line_error(code, err, "holds 8x8 images, not 16x16")
    code, _, err = run_cli(capsys, "train", "--dataset", ds, "--data-placement", "gpu", "--out", tmp_path)
    assert_one_line_error(code, err, "data.placement", "auto, device, stream")
    assert not (tmp_path / "c").exists() and not (tmp_path / "checkpoints").exists()


def test_memorization_reads_a_uint8_set_in_blocks(prepared_set):
    from fastat.data import build_dataset
    from fastat.eval.memorization import memorization

    _, ds = prepared_set
    td = build_dataset(ds, noise_p=0.5, noise_sigma=0.2)
    view = td.train_view()
    whole = view[0 : len(view)]  # the float tensor it stands for (small here)
    samples = whole[:6] + 0.05 * torch.randn(6, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    a = memorization(samples, view, batch=7)
    b = memorization(samples, whole, batch=7)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-9 for k in a)
    assert a["near_copy_share"] == 1.0  # the samples are near-copies of training images


def test_fid_reference_statistics_from_a_uint8_set_in_blocks(prepared_set, tmp_path):
    from fastat.data import build_dataset
    from fastat.eval.fid import reference_stats

    _, ds = prepared_set
    view = build_dataset(ds).clean_view()
    whole = view[0 : len(view)]

    def extractor(x):  # a fixed feature map standing in for Inception
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1).double()

    a = reference_stats("blocks", lambda: view, extractor, cache_dir=tmp_path / "a", n=40)
    b = reference_stats("whole", whole, extractor, cache_dir=tmp_path / "b", n=40)
    torch.testing.assert_close(torch.as_tensor(a.mu), torch.as_tensor(b.mu), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.as_tensor(a.sigma), torch.as_tensor(b.sigma), atol=1e-12, rtol=0)
