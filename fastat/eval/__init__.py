"""Measuring what adversarial training buys (SPEC section 4): ``fastat eval``.

    from fastat.eval import evaluate_run, sliced_wasserstein, frechet_distance, trajectory_attack
    report = evaluate_run("runs/exp")                     # exact metrics of a run on a known set

Modules: :mod:`~fastat.eval.metrics` (exact and distributional metrics, Fréchet distance),
:mod:`~fastat.eval.memorization` (nearest-neighbour similarity to the training set),
:mod:`~fastat.eval.noise` (noise level of images), :mod:`~fastat.eval.trajectory` (attacks on the
sampling trajectory), :mod:`~fastat.eval.fid` (FID / KID / IS through torch-fidelity, optional),
:mod:`~fastat.eval.draws` and :mod:`~fastat.eval.images` (what a report measures),
:mod:`~fastat.eval.evaluate` (a run folder -> report), :mod:`~fastat.eval.runs` (several runs side by
side) and :mod:`~fastat.eval.compare` (the DDPM vs AT comparison on corrupted known distributions).
"""

from fastat.at.sampling import SamplerSpec
from fastat.eval.draws import MeasureSpec
from fastat.eval.evaluate import EVAL_FILE, EvalOptions, evaluate_run, format_report, known_metrics, load_run
from fastat.eval.fid import FIDSpec
from fastat.eval.memorization import NEAR_COPY_THRESHOLD, memorization, nearest_neighbors
from fastat.eval.metrics import (
    denoiser_psnr,
    distance_summary,
    feature_stats,
    frechet_distance,
    mode_balance,
    oracle_x0_subspace,
    predict_x0,
    psnr,
    sliced_wasserstein,
    support_distance,
)
from fastat.eval.noise import noise_sigma, noise_summary
from fastat.eval.trajectory import (
    AttackSpec,
    TrajectoryAttackResult,
    sample_with_perturbation,
    trajectory_attack,
)

__all__ = [
    "EVAL_FILE",
    "NEAR_COPY_THRESHOLD",
    "AttackSpec",
    "EvalOptions",
    "FIDSpec",
    "MeasureSpec",
    "SamplerSpec",
    "TrajectoryAttackResult",
    "denoiser_psnr",
    "distance_summary",
    "evaluate_run",
    "feature_stats",
    "format_report",
    "frechet_distance",
    "known_metrics",
    "load_run",
    "memorization",
    "mode_balance",
    "nearest_neighbors",
    "noise_sigma",
    "noise_summary",
    "oracle_x0_subspace",
    "predict_x0",
    "psnr",
    "sample_with_perturbation",
    "sliced_wasserstein",
    "support_distance",
    "trajectory_attack",
]
