"""The fast (compiled) step of a diffusers UNet2DModel against the eager step: compile time and agreement.

    python benchmarks/diffusers_fast_path.py            # a tiny UNet2DModel, 8x8 images, v-prediction, adv

Builds the same UNet2DModel twice (same seed) through ``build_model("diffusers", ...)`` and runs
``--steps`` StepEngine steps eagerly and compiled (``fast=True``: torch.compile of the model and of the
attack's detached-parameter copy; on CUDA also the captured graph) on the same batches and seeds. Prints
one JSON line: the seconds of each run (the compiled one includes compilation), the engine's mode and the
largest difference of the step losses and of the final weights. Needs diffusers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fastat.at.objective import ATObjective
from fastat.at.schedule import NoiseSchedule
from fastat.models import build_model
from fastat.models.diffusers_unet import TINY_CONFIG as UNET
from fastat.step.engine import StepEngine


def run(fast: bool, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model("diffusers", sample_size=8, in_channels=3, out_channels=3, **UNET).to(device)
    obj = ATObjective(schedule=NoiseSchedule(T=1000), mode="adv", prediction="v")
    engine = StepEngine(model, obj, generator=torch.Generator(device).manual_seed(1), lr=1e-3, fast=fast)
    xs = torch.randn(steps, 4, 3, 8, 8, generator=torch.Generator().manual_seed(2)).clamp(-1, 1).to(device)
    t0 = time.perf_counter()
    losses = [float(engine.step(x, 1e-3)["loss"]) for x in xs]
    return {"seconds": time.perf_counter() - t0, "mode": engine.mode, "losses": losses,
            "weights": [p.detach().cpu() for p in model.parameters()]}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    eager, fast = run(False, args.steps, device), run(True, args.steps, device)
    out = {
        "device": str(device), "torch": torch.__version__, "steps": args.steps,
        "eager_seconds": round(eager["seconds"], 2), "fast_seconds": round(fast["seconds"], 2),
        "fast_mode": fast["mode"], "eager_losses": eager["losses"], "fast_losses": fast["losses"],
        "max_loss_diff": max(abs(a - b) for a, b in zip(eager["losses"], fast["losses"], strict=True)),
        "max_weight_diff": max(
            float((a - b).abs().max()) for a, b in zip(eager["weights"], fast["weights"], strict=True)
        ),
    }  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
