"""The measurements behind the image recipe (RESULTS.md, "AT's gain on images"): train one configuration
through :func:`fastat.train.run.train` and measure it against the known subspace.

    python benchmarks/image_recipe.py NAME '{"objective.mode": "adv", "run.steps": 1000}' --log results.jsonl
    python benchmarks/image_recipe.py NAME '{}' --gain          # + the denoiser's off/on-support gain j(t)

One JSON line per run goes to ``--log``: the overrides (over the defaults), the wall time with the load
average at start and end, the distance of 128 DDIM-50 samples to the clean support with ``eta`` 0 and 1
(the exact distance, RMS per pixel) beside the training data's, sliced W2 (all of it and along the
support), and x0_hat PSNR at t = 50. ``--gain`` adds the realised gain of the EMA denoiser's x0_hat on
small off- and on-support perturbations of noisy training samples, ``j(t) = a_t |P dx0_hat| / |P d|``:
1 keeps a perturbation (the data's noise included), 0 removes it; DDPM's optimum on this data is
``j_off(t) = a^2 s2 / (a^2 s2 + s_t^2)`` with ``s2`` = 0.9 sigma^2 the noisy copies' variance.
Set ``OMP_NUM_THREADS`` and ``--threads`` deliberately on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from fastat.eval.evaluate import load_run
from fastat.eval.metrics import denoiser_psnr, sliced_wasserstein
from fastat.train.config import TrainConfig
from fastat.train.run import build_training_data, train
from fastat.train.samples import generate

GAIN_TS = (0, 5, 20, 50, 100, 200, 400)


def sample_metrics(run: Path, n: int = 128) -> dict:
    """Distances of ``n`` DDIM-50 samples (eta 0 and 1) to the clean support, sliced W2, PSNR."""
    model, cfg, _ = load_run(run)
    td = build_training_data(cfg, progress=False)
    known, schedule = td.known, cfg.build_objective().schedule
    noise = torch.randn(n, *known.sample_shape, generator=torch.Generator().manual_seed(1))
    fresh = known.sample(n, torch.Generator().manual_seed(5))
    out = {"data_dist": known.distance_to_support(td.data).mean().item()}
    for eta in (0.0, 1.0):
        x = generate(model, schedule, noise, sampler="ddim", steps=50, eta=eta, clip_x0=1.0,
                     generator=torch.Generator().manual_seed(2))  # fmt: skip
        out[f"dist_eta{eta:g}"] = known.distance_to_support(x).mean().item()
        out[f"sw_eta{eta:g}"] = sliced_wasserstein(x, fresh)
        out[f"sw_proj_eta{eta:g}"] = sliced_wasserstein(known.project(x), known.project(fresh))
    out.update(denoiser_psnr(model, schedule, fresh, [50], known=known))
    return {k: round(v, 4) for k, v in out.items()}


@torch.no_grad()
def denoiser_gain(run: Path, n: int = 256, size: float = 0.05) -> dict:
    """``j_off(t)``, ``j_on(t)``: see the module docstring."""
    model, cfg, _ = load_run(run)
    td = build_training_data(cfg, progress=False)
    known, schedule = td.known, cfg.build_objective().schedule
    x0, g = td.data[:n], torch.Generator().manual_seed(0)
    n = len(x0)
    basis = known.basis.float()

    def parts(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = v.reshape(len(v), -1)
        on = (f @ basis) @ basis.T
        return f - on, on

    out: dict = {"j_off": {}, "j_on": {}}
    for t in GAIN_TS:
        tt = torch.full((n,), t)
        a, s = (c.view(-1, 1, 1, 1) for c in schedule.coeffs(tt))
        xt = a * x0 + s * torch.randn(x0.shape, generator=g)
        base = (xt - s * model(xt, tt)) / a
        for which, k in (("j_off", 0), ("j_on", 1)):
            d = parts(torch.randn(x0.shape, generator=g))[k]
            d = (size * d / d.pow(2).mean(1, keepdim=True).sqrt()).reshape(x0.shape)
            moved = (xt + d - s * model(xt + d, tt)) / a - base
            moved = parts(moved)[k].norm(dim=1) / parts(d)[k].norm(dim=1)
            out[which][t] = round((moved.mean() * a.mean()).item(), 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("overrides", help="JSON object of dotted config keys (over the defaults)")
    p.add_argument("--out", type=Path, default=Path("runs/image-recipe"))
    p.add_argument("--log", type=Path, default=Path("benchmarks/results/image-recipe.jsonl"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gain", action="store_true", help="also measure the denoiser's gain j(t)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    over = json.loads(a.overrides)
    run = a.out / a.name
    if run.exists():
        raise SystemExit(f"{run} exists: choose another NAME or --out")
    base = {"run.out": str(run), "run.device": "cpu", "run.tensorboard": False, "run.save_every": 0,
            "run.sample_every": 0}  # fmt: skip
    load0, t0 = os.getloadavg(), time.perf_counter()
    result = train(TrainConfig().with_overrides({**base, **over}), progress=False)
    rec = {"name": a.name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": a.threads,
           "overrides": over,
           "train_s": round(result.seconds, 1), "wall_s": round(time.perf_counter() - t0, 1),
           "load_start": [round(v, 2) for v in load0], "load_end": [round(v, 2) for v in os.getloadavg()],
           **sample_metrics(run)}  # fmt: skip
    if a.gain:
        rec.update(denoiser_gain(run))
    print(json.dumps(rec))
    a.log.parent.mkdir(parents=True, exist_ok=True)
    with open(a.log, "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
