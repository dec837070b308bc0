"""Does an image folder teach what the built-in set teaches? The known subspace, exported as PNGs, trained on
through ``fastat train --dataset FOLDER`` and through ``fastat train`` (built-in), both measured exactly.

    python benchmarks/image_folder_check.py --out /tmp/folder-check                  # the quickstart recipe
    python benchmarks/image_folder_check.py --out /tmp/fc -- --steps 4000 --set optim.lr=2e-3

The clean samples of the built-in set (``data.seed`` 0, ``data.n`` of them, at ``--image-size``) are written
as 8-bit PNGs (pixels clamped to [-1, 1], rounded to 1/127.5); the folder run corrupts them on load with
the same fraction and sigma (its own fixed noise: the same statistics, other draws). Both runs then get
the same evaluation against the known subspace (:func:`fastat.eval.known_metrics`, the run's sampler and
eta, seed 0): the distance of the samples to the clean support beside that of each run's training data.
Arguments after ``--`` go to both ``fastat train`` commands.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastat.app.entry import main as fastat_main
from fastat.data import build_dataset, known_dataset
from fastat.eval.evaluate import MeasureSpec, known_metrics, load_run
from fastat.train.run import build_training_data
from fastat.train.samples import save_image_folder
from fastat.train.state import run_sampler


def export_subspace(folder: Path, *, n: int, size: int, seed: int = 0) -> Path:
    """The built-in ``subspace`` set's clean samples (``data.seed`` = ``seed``) as PNGs in ``folder``."""
    td = build_dataset("subspace", image_size=size, n=n, seed=seed)
    return save_image_folder(td.clean, folder)


def measure(run: Path, size: int, n: int) -> dict:
    """Known-subspace metrics of ``run``'s EMA model (the run's sampler and eta) and of its training data."""
    model, cfg, _ = load_run(run)
    td = build_training_data(cfg, progress=False)
    data = td.data if td.data is not None else torch.cat(list(td.train_view().blocks()))
    known = known_dataset("subspace", height=size, width=size)
    schedule = cfg.build_objective().schedule
    m = known_metrics(
        model, schedule, known, MeasureSpec(n=n, sampler=run_sampler(cfg, "image")), train_data=data
    )
    keys = ("dist_mean", "data_dist_mean", "sw", "sw_proj", "psnr_t50", "psnr_t100", "nn_cos_mean")
    return {k: round(m[k], 4) for k in keys if k in m}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--n", type=int, default=4096, help="images in the set (data.n)")
    p.add_argument("--eval-n", type=int, default=512)
    p.add_argument("train_args", nargs="*", help="after --: arguments for both fastat train commands")
    a = p.parse_args()
    folder = a.out / "subspace-png"
    if not folder.is_dir():
        export_subspace(folder, n=a.n, size=a.image_size)
    common = ["--image-size", str(a.image_size), "--no-progress", *a.train_args]
    result = {}
    for name, dataset in (("built-in", "subspace"), ("folder", str(folder))):
        run = a.out / name
        t0 = time.perf_counter()
        extra = ["--set", f"data.n={a.n}"] if dataset == "subspace" else []
        code = fastat_main(["train", "--dataset", dataset, "--out", str(run), *extra, *common])
        if code != 0:
            raise SystemExit(f"fastat train --dataset {dataset} failed ({code})")
        result[name] = {"train_s": round(time.perf_counter() - t0, 1), **measure(run, a.image_size, a.eval_n)}
    print(json.dumps(result, indent=2))
    (a.out / "folder-check.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
