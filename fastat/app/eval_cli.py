"""``fastat eval``: the command-line side of :mod:`fastat.eval` (hooked into :mod:`fastat.app.cli`).

fastat eval --run runs/exp                       # metrics of the newest checkpoint -> RUN/eval.json
fastat eval --run runs/exp --attack --n 2000     # + the trajectory attack
fastat eval --run runs/cifar --fid --inception-weights ~/weights-inception-2015-12-05-6726825d.pth
fastat eval --run runs/mine --ref held_out/       # + FID/KID against held-out clean images
fastat eval runs runs/ddpm runs/adv --out cmp.json  # several runs as one table, vs the first
fastat eval compare                              # DDPM vs AT on corrupted known sets (<= 15 min, CPU)
fastat eval compare --preset images              # the same on subspace images with a UNet (<= 30 min, CPU)
fastat eval compare --quick --out /tmp/cmp       # smoke run (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_eval_parser", "cmd_eval", "gain_line", "report_after_training"]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace(",", " ").split()]


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """The options ``eval`` and ``eval runs`` share: samples, sampler, device, weights, FID against --ref."""
    p.add_argument("--n", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: the run's sampler")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the run's sample_steps)")
    p.add_argument(
        "--eta", type=float, default=None, help="DDIM eta (0: deterministic; default: the run's sample_eta)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the sampling noise and the fresh clean samples"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-ema", action="store_true", help="use the raw (non-EMA) weights")
    p.add_argument(
        "--ref",
        metavar="DIR",
        help="held-out clean images: FID/KID of the samples and of the "
        "training images against them (skipped, with a note, without the Inception weights)",
    )
    p.add_argument(
        "--fid-weights",
        "--inception-weights",
        dest="inception_weights",
        metavar="PATH",
        help="Inception weights file for offline FID/KID (default: torch-fidelity's cache)",
    )
    p.add_argument(
        "--fid-cache", metavar="DIR", help="cache of reference statistics (default ~/.cache/fastat/fid)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 suits small models)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """Add ``eval`` (and ``eval compare``) to the ``fastat`` subcommands ``sub``."""
    e = sub.add_parser(
        "eval",
        help="evaluate a run, or run the DDPM vs AT comparison",
        description=(
            "With --run: sample the EMA model of a run's newest checkpoint and measure it. Known sets: exact "
            "distance to the clean support, sliced W2 to fresh clean samples, x0_hat PSNR (subspace). "
            "Images: the noise level (scikit-image) and memorisation of the samples beside the training "
            "images' own, FID/KID against held-out clean images with --ref DIR, FID/IS against the training "
            "set with --fid. "
            "Writes RUN/eval.json. 'fastat eval runs A B ...' tabulates several runs against the first; "
            "'fastat eval compare' trains ddpm/rand/adv/pgd on corrupted known sets and tabulates them."
        ),
    )
    e.add_argument("--run", metavar="DIR", help="run folder (or one of its checkpoint folders)")
    _sampling_args(e)
    e.add_argument(
        "--attack", action="store_true", help="also run the trajectory attack (PGD on x_t while sampling)"
    )
    e.add_argument("--attack-n", type=int, default=256, help="samples for the attack (default 256)")
    e.add_argument(
        "--attack-at",
        type=_ints,
        default=[200, 500, 800],
        metavar="T,T,...",
        help="timesteps to attack (moved to the nearest the sampler visits; default 200,500,800)",
    )
    e.add_argument(
        "--attack-radius", type=float, default=0.05, help="L-inf bound on the perturbation, data units"
    )
    e.add_argument(
        "--attack-steps", type=int, default=10, help="PGD steps per attacked timestep (default 10)"
    )
    e.add_argument(
        "--attack-target",
        choices=("eps", "x0"),
        default="eps",
        help="what PGD maximises: the change of eps (default) or of x0_hat",
    )
    e.add_argument(
        "--fid", action="store_true", help="FID/IS against the clean training images (needs torch-fidelity)"
    )
    e.set_defaults(func=cmd_eval, eval_command=None)

    esub = e.add_subparsers(dest="eval_command", metavar="{compare,runs}")
    r = esub.add_parser(
        "runs",
        help="several finished runs as one table, each against the first",
        description=(
            "Evaluate each run with the same options (noise level, memorisation, with --ref FID/KID; "
            "known sets: distance to the support) and print one table with the training images' own "
            "values and a 'vs the first run' column. Each RUN/eval.json is written; --out FILE: the JSON."
        ),
    )
    r.add_argument("runs", nargs="+", metavar="RUN", help="run folders; the first is the baseline")
    _sampling_args(r)
    r.add_argument("--out", metavar="FILE", help="write the table and the reports as JSON")
    c = esub.add_parser(
        "compare",
        help="train ddpm/rand/adv/pgd on corrupted known sets and compare",
        description=(
            "For each setting x variant x seed: train a small MLP with the trainer, evaluate its EMA model, "
            "then "
            "write OUT/compare.json, OUT/compare.md (mean ± std over seeds, paired verdict vs ddpm) "
            "and plots. "
            "Finished runs are reused. A variant is MODE or MODE[key=value,...] with objective keys, e.g. "
            "'adv[lam=0.5,r_min=0.1]'."
        ),
    )
    c.add_argument(
        "--preset",
        choices=("default", "images", "multimodal", "quick"),
        default=None,
        help="default: points (plane3d, an MLP); images: subspace images, sigma 0.1 and 0.2 (a UNet); "
        "multimodal: the subspaces and scales image sets, the same recipe; quick: a smoke run",
    )
    c.add_argument("--quick", action="store_true", help="the same as --preset quick (< 1 min)")
    c.add_argument("--out", default=None, help="output folder (default runs/compare[-PRESET])")
    c.add_argument(
        "--settings",
        nargs="+",
        default=None,
        help="settings (default: the preset's; --list shows them all)",
    )
    c.add_argument("--modes", nargs="+", default=None, help="variants (default: ddpm rand adv pgd)")
    c.add_argument("--seeds", type=_ints, default=None, metavar="S,S,...", help="seeds (default 0,1,2)")
    c.add_argument("--steps", type=int, default=None, help="training steps per run")
    c.add_argument(
        "--budget-units",
        type=float,
        default=None,
        metavar="U",
        help="equal FLOP budget: each variant trains round(U / its units per image and step) steps "
        "(e.g. 3200 = 400 steps of adv, 8 units); default: every variant trains --steps",
    )
    c.add_argument("--eval-n", type=int, default=None, help="samples per evaluation")
    c.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="objective override for every run, e.g. --set lam=0.5 --set r_min=0.1",
    )
    c.add_argument("--no-attack", action="store_true", help="skip the trajectory attack")
    c.add_argument("--no-plots", action="store_true", help="no plots")
    c.add_argument("--workers", type=int, default=1, help="runs trained at once (processes; default 1)")
    c.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    c.add_argument("--list", action="store_true", help="list the known settings and exit")
    return e


def cmd_eval(args: argparse.Namespace) -> int:
    if args.eval_command == "compare":
        return _cmd_compare(args)
    if args.eval_command == "runs":
        return _cmd_runs(args)
    from fastat.train.distributed import DistContext

    # under torchrun every rank samples its share; rank 0 measures, writes and prints
    with DistContext.from_env() as ctx:
        with ctx.together("the options"):
            _check_eval_args(args)
        return _eval_run(args, ctx)


def _check_eval_args(args: argparse.Namespace) -> None:
    from fastat.train.config import ConfigError

    if not args.run:
        raise ConfigError("fastat eval needs --run DIR (or the subcommand 'compare' or 'runs')")
    _check_sampling_args(args)
    for name in ("attack_n", "attack_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.attack_radius > 0:
        raise ConfigError(f"--attack-radius must be > 0, got {args.attack_radius}")


def _check_sampling_args(args: argparse.Namespace) -> None:
    from fastat.train.config import ConfigError, check_seed

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise ConfigError(f"--eta must be in [0, 1], got {args.eta}")
    check_seed(args.seed, "--seed")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def _options(args: argparse.Namespace, attack=None, fid_train: bool = False):
    from fastat.eval.evaluate import EvalOptions
    from fastat.eval.fid import FIDSpec

    fid = None
    if fid_train or args.ref:
        fid = FIDSpec(train=fid_train, ref=args.ref, weights=args.inception_weights, cache=args.fid_cache)
    return EvalOptions(n=args.n, seed=args.seed, sampler=args.sampler, steps=args.steps, eta=args.eta,
                       ema=not args.no_ema, attack=attack, fid=fid, progress=True)  # fmt: skip


def _eval_run(args: argparse.Namespace, ctx) -> int:
    from fastat.eval.evaluate import EVAL_FILE, evaluate_run
    from fastat.eval.fid import FIDUnavailable
    from fastat.eval.format import format_report, json_safe
    from fastat.eval.trajectory import AttackSpec
    from fastat.train.config import ConfigError

    attack = None
    if args.attack:
        attack = AttackSpec(n=args.attack_n, at=tuple(args.attack_at), radius=args.attack_radius,
                            steps=args.attack_steps, target=args.attack_target)  # fmt: skip
    try:
        report = evaluate_run(args.run, _options(args, attack, args.fid), device=args.device, ctx=ctx)
    except FIDUnavailable as e:
        raise ConfigError(str(e)) from None
    if report is None:  # another rank measured
        return 0
    if args.json:
        print(json.dumps(json_safe(report), indent=2))
    else:
        print(format_report(report))
        print(f"wrote {Path(report['run']) / EVAL_FILE} ({report['seconds']:.0f} s)")
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from fastat.eval.evaluate import evaluate_run
    from fastat.eval.format import json_safe
    from fastat.eval.runs import runs_json, runs_table, write_runs_json

    _check_sampling_args(args)
    opts = _options(args)
    reports = []
    for i, run in enumerate(args.runs):
        print(f"[{i + 1}/{len(args.runs)}] evaluating {run}", file=sys.stderr, flush=True)
        reports.append(evaluate_run(run, opts, device=args.device))
    if args.json:
        print(json.dumps(json_safe(runs_json(reports)), indent=2))
    else:
        print(runs_table(reports), end="")
    if args.out:
        print(f"wrote {write_runs_json(reports, args.out)}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import yaml

    from fastat.eval.compare import PRESETS, SETTINGS, run_compare, spec_with
    from fastat.train.config import ConfigError

    if args.list:
        for s in SETTINGS.values():
            print(f"{s.name:<16} {s.describe()}")
        return 0
    if args.quick and args.preset not in (None, "quick"):
        raise ConfigError(f"--quick is --preset quick; it cannot go with --preset {args.preset}")
    preset = "quick" if args.quick else args.preset or "default"
    base = PRESETS[preset]
    objective = dict(base.objective)
    for item in args.set:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("objective.")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        objective[key] = yaml.safe_load(value)
    for name in ("steps", "eval_n", "workers", "threads", "budget_units"):
        v = getattr(args, name)
        if v is not None and not v >= 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    spec = spec_with(
        base,
        settings=args.settings,
        modes=args.modes,
        seeds=args.seeds,
        steps=args.steps,
        eval_n=args.eval_n,
        budget_units=args.budget_units,
        objective=objective,
        attack=False if args.no_attack else None,
    )
    if not spec.seeds:
        raise ConfigError("--seeds needs at least one seed")
    out = Path(args.out or ("runs/compare" if preset == "default" else f"runs/compare-{preset}"))
    try:
        result = run_compare(
            spec,
            out,
            workers=args.workers,
            threads=args.threads,
            plots=not args.no_plots,
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(result.table, end="")
    print(
        f"wrote {out / 'compare.json'}, {out / 'compare.md'}"
        + ("" if args.no_plots else f", {out / 'plots'}/")
    )
    return 0


def report_after_training(result, cfg) -> dict | None:
    """What ``fastat train`` prints at the end of a run on a built-in (known) set: the report of
    :func:`fastat.eval.evaluate_run` with ``run.eval_n`` samples and the run's sampler; also writes
    ``RUN/eval.json``. Returns the report (None when the run has no known distribution or eval_n < 2).
    The training loop has already measured the final EMA weights (``result.eval_metrics``): the report
    is made from those, not by sampling again."""
    from fastat.data import KNOWN
    from fastat.eval.evaluate import EVAL_FILE, evaluate_run, make_report
    from fastat.eval.format import format_report
    from fastat.train.run import run_eta

    if cfg.data.dataset not in KNOWN or cfg.run.eval_n < 2:
        return None
    metrics = getattr(result, "eval_metrics", None)
    if metrics:
        r = cfg.run
        steps = r.sample_steps if r.sampler == "ddim" else cfg.objective.T
        settings = {"n": r.eval_n, "sampler": r.sampler, "steps": steps, "eta": run_eta(cfg),
                    "seed": r.seed, "weights": "ema", "device": result.device}  # fmt: skip
        report = make_report(result.run_dir, result.checkpoint, result.step, cfg.data.dataset,
                             result.data_kind, cfg, settings, metrics,
                             seconds=result.eval["seconds"])  # fmt: skip
    else:
        report = evaluate_run(result.run_dir, n=cfg.run.eval_n, seed=cfg.run.seed, device=result.device)
    print(format_report(report))
    print(f"wrote {Path(report['run']) / EVAL_FILE}")
    return report


def gain_line(result, cfg) -> str | None:
    """The last line ``fastat train`` prints on a built-in set: how far the samples are from the clean
    support against the noisy training data, and the command that trains the other side of the
    comparison (DDPM for an AT run, ``adv`` for a DDPM run) on the same data, seed and settings.
    ``None`` when the run has no final evaluation."""
    ev = getattr(result, "eval", None) or {}
    if "dist_samples" not in ev or "dist_data" not in ev:
        return None
    mode, dist, data = cfg.objective.mode, ev["dist_samples"], ev["dist_data"]
    run = Path(result.run_dir)
    other = "adv" if mode == "ddpm" else "ddpm"
    cmd = f"fastat train --config {run / 'config.yaml'} --mode {other} --out {run}-{other}"
    if data > 0:
        change = (dist - data) / data
        how = f"{abs(change):.0%} {'closer to' if change < 0 else 'farther from'} the clean support than"
    else:
        how = "from the clean support; clean training data:"
    verdict = f"{mode}: samples {dist:.4f} (RMS/pixel), {how} the training data ({data:.4f})"
    see = "the DDPM baseline on the same data" if mode != "ddpm" else "adversarial training on the same data"
    return f"{verdict}; {see}: {cmd}"
