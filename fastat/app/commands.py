"""The bodies of the ``fastat`` commands ``train``, ``sample``, ``prepare`` and ``export``: each takes the
parsed arguments (:func:`fastat.app.cli.build_parser`) and returns the exit code. torch is imported inside
them, after :func:`fastat.app.cli.main` has set OpenMP's wait policy.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import yaml

from fastat.app.guards import check_samples, unused_at_flags
from fastat.train.config_keys import FLAGS, ConfigError
from fastat.utils.errors import EXIT_INTERRUPTED, listing
from fastat.utils.yaml_io import safe_load as bounded_load

__all__ = ["cmd_export", "cmd_prepare", "cmd_sample", "cmd_train", "train_overrides"]


# -- train ---------------------------------------------------------------------------------------------


def train_overrides(args: argparse.Namespace) -> dict:
    """Dotted config overrides: the ``--config`` file, then ``--set``, then the named flags. Each layer is
    checked on its own, so a bad value is an error even where a later layer sets the same key."""
    from fastat.train.config import TrainConfig, load_yaml_overrides

    file_over = load_yaml_overrides(args.config) if args.config else {}
    set_over: dict = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            set_over[key.strip()] = bounded_load(value) if value.strip() else None  # no alias bombs
        except (yaml.composer.ComposerError, yaml.constructor.ConstructorError) as e:  # refused, not text
            raise ConfigError(f"--set {item[:60]!r}: {e.problem}") from None
        except yaml.YAMLError:
            set_over[key.strip()] = value
    flag_over = {key: getattr(args, dest) for dest, (key, _, _) in FLAGS.items()}
    flag_over = {key: v for key, v in flag_over.items() if v is not None}
    if args.fast is not None:
        flag_over["run.fast"] = args.fast
    if args.class_cond:
        flag_over["data.class_cond"] = True
    for layer in (file_over, set_over, flag_over):
        TrainConfig().with_overrides(layer)  # keys and types (values are validated on the merged config)
    merged = {**file_over, **set_over, **flag_over}
    flags = {key: f"--{dest.replace('_', '-')}" for dest, (key, _, _) in FLAGS.items()}
    unused_at_flags(set_over, flag_over, merged, flags)
    return merged


def cmd_train(args: argparse.Namespace) -> int:
    from fastat.train.distributed import DistContext
    from fastat.train.run import resolve_config

    cfg = ckpt = failure = None
    try:
        cfg, ckpt = resolve_config(train_overrides(args), args.resume)
    except Exception as e:  # noqa: BLE001 - raised below, once the ranks of a torchrun job agree
        failure = e
    # Under torchrun: join the job (world 1 without it); every rank runs what follows, rank 0 speaks.
    with DistContext.from_env(timeout_s=cfg.run.dist_timeout if cfg else None) as ctx:
        with ctx.together("the config"):
            if failure is not None:
                raise failure
        return _train(args, cfg, ckpt, ctx)


def _train(args: argparse.Namespace, cfg, ckpt, ctx) -> int:
    from fastat.eval.evaluate import final_evaluation
    from fastat.train.memory import check_step_memory
    from fastat.train.run import TrainingInterrupted, resolve_device, resolve_precision, train
    from fastat.train.run_folder import RunFolder

    if args.dry_run:
        with ctx.together("the dry run"):
            device = resolve_device(cfg.run.device, ctx)
            check_step_memory(cfg, device, ctx.world_size)  # builds the model on meta (the real build's
            # checks and messages, no weights) and weighs the step's memory against what is free
            RunFolder.check(cfg.run.out, resume=ckpt, steps=cfg.run.steps)  # writable, free, may take it
        if not ctx.is_main:
            return 0
        print(cfg.to_yaml(), end="")
        what = f"resume from {ckpt}" if ckpt is not None else f"start {cfg.run.out}"
        ranks = f" x {ctx.world_size} ranks" if ctx.enabled else ""
        print(
            f"# dry run: would {what} on {device}{ranks} ({resolve_precision(cfg.run.precision, device)}); "
            f"nothing was written",
            file=sys.stderr,
        )
        return 0
    _cpu_threads(args.threads, cfg)
    try:
        result = train(cfg, resume=ckpt, progress=not args.no_progress, ctx=ctx, final_eval=final_evaluation)
    except TrainingInterrupted as e:
        if not ctx.is_main:
            return EXIT_INTERRUPTED
        if e.checkpoint is None:
            print(f"fastat: interrupted at step {e.step}; no checkpoint written", file=sys.stderr)
        else:
            how = "checkpoint saved" if e.saved else "the last complete checkpoint is"
            print(
                f"fastat: interrupted at step {e.step}; {how}: {e.checkpoint}\n"
                f"continue with: fastat train --resume {cfg.run.out}",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    if not ctx.is_main:
        return 0
    print(f"run:        {result.run_dir}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"samples:    {result.samples}")
    print(f"metrics:    {result.metrics}")
    from fastat.app.eval_cli import gain_line, report_after_training

    if result.eval:  # built-in known distribution: the full report of fastat eval, and RUN/eval.json
        report_after_training(result, cfg)
    print(f"{result.trained_line} on {result.device} in {result.seconds:.0f} s")
    line = gain_line(result, cfg)  # None without a final evaluation
    if line:
        print(line)
    return 0


# -- sample --------------------------------------------------------------------------------------------


def sample_labels(args: argparse.Namespace, model, where, names=None):
    """``fastat sample``'s labels: ``--class K`` (all samples of class K: one of the class ``names`` the
    run recorded, an image folder's sub-folders, else an index) or ``all`` (sample i of class i mod
    num_classes); None without ``--class``."""
    import torch

    if args.label is None:
        if args.guidance is not None:
            raise ConfigError("--guidance needs --class K (or --class all)")
        return None
    if args.guidance is not None and not args.guidance >= 0:
        raise ConfigError(f"--guidance must be >= 0, got {args.guidance}")
    classes = getattr(getattr(model, "model", model), "num_classes", 0) or getattr(model, "num_classes", 0)
    if not classes:
        raise ConfigError(f"--class: the model of {where} is not class-conditional (train with --class-cond)")
    if args.label == "all":
        return torch.arange(args.n) % classes
    names = list(names or ())
    if args.label in names:  # a name wins over an index: sub-folders 1..20 sort as text ("10" before "2")
        return torch.full((args.n,), names.index(args.label))
    if not (args.label.isdigit() and int(args.label) < classes):
        named = f", one of {listing(names, 20)}" if names else ""
        raise ConfigError(f"--class must be 0..{classes - 1}{named} or all, got {args.label!r}")
    return torch.full((args.n,), int(args.label))


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from fastat.at.seeding import derive_seed
    from fastat.eval.evaluate import load_run
    from fastat.train.checkpoint import CheckpointError
    from fastat.train.config import check_seed
    from fastat.train.run import resolve_device, run_eta
    from fastat.train.samples import SAMPLE_SUFFIXES, generate, write_samples

    for name in ("n", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise ConfigError(f"--eta must be in [0, 1], got {args.eta}")
    check_seed(args.seed, "--seed")
    if args.out is not None and Path(args.out).suffix.lower() not in SAMPLE_SUFFIXES:
        raise ConfigError(f"--out {args.out} must end in .png or .npy")

    device = resolve_device(args.device)
    model, cfg, ckpt = load_run(args.run, ema=not args.no_ema, device=device)
    try:
        info = ckpt.state["data"]
        kind, shape = info["kind"], tuple(info["sample_shape"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt.path} lacks the run description needed to sample ({e})") from None
    T = cfg.objective.T
    if args.sampler == "ddim" and args.steps > T:
        raise ConfigError(f"--steps must be <= T = {T}, got {args.steps}")
    out = Path(args.out) if args.out else ckpt.run_dir / "samples" / f"sample-{ckpt.step:06d}.png"
    if args.out and out.exists() and not args.overwrite:  # a file this command did not write is the user's
        raise ConfigError(f"--out {out} exists; choose another file, or pass --overwrite to replace it")
    if out.suffix.lower() == ".png" and kind == "points":
        if len(shape) != 1 or shape[0] not in (2, 3):
            raise ConfigError(f"a .png of {shape[0]}-D points is not possible; use --out FILE.npy")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError(
                "a .png of points needs matplotlib (pip install matplotlib); or use --out FILE.npy"
            ) from None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write to {out.parent}: {e.strerror or e}") from None

    from fastat.train.memory import require_memory

    # the noise, the samples and their output copy (float32) on the host; a batch of them on the device
    require_memory(3 * 4 * args.n * math.prod(shape), f"--n {args.n} samples", torch.device("cpu"),
                   "lower --n (or sample in several calls with other --seed)")  # fmt: skip
    labels = sample_labels(args, model, ckpt.path, ckpt.state.get("data", {}).get("classes"))
    noise = torch.randn((args.n, *shape), generator=torch.Generator().manual_seed(args.seed))
    x = generate(
        model,
        cfg.build_objective().schedule,
        noise,
        sampler=args.sampler,
        steps=args.steps,
        eta=run_eta(cfg) if args.eta is None else args.eta,
        clip_x0=info.get("clip_x0"),
        batch=args.batch_size,
        device=device,
        generator=torch.Generator(device).manual_seed(derive_seed(args.seed, "sample-cli")),
        labels=labels,
        guidance=1.0 if args.guidance is None else args.guidance,
    )
    check_samples(x, ckpt.path, out)  # never a file of NaN
    written = write_samples(x, out, kind)
    print(written)
    return 0


# -- prepare -------------------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    from fastat.data import prepare

    t0 = time.perf_counter()
    ds = prepare(args.src, args.out, args.image_size, data_root=args.data_root, download=not args.no_download,
                 workers=args.workers, progress=not args.no_progress,
                 log=lambda msg: print(msg, file=sys.stderr))  # fmt: skip
    if args.verify:
        ds.verify()
    m = ds.manifest
    names = ds.classes or ()
    classes = f"; {len(names)} classes ({listing(names)})" if names else ""
    print(
        f"{ds.root}: {len(ds)} images {'x'.join(map(str, ds.shape))} uint8 ({ds.nbytes / 1e9:.2f} GB) in "
        f"{len(m['shards'])} shard(s){classes}; skipped {m.get('num_skipped', 0)} of "
        f"{m.get('num_files', len(ds))} files; "
        f"{time.perf_counter() - t0:.1f} s{'; checksums verified' if args.verify else ''}"
    )
    return 0


# -- export --------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from fastat.app.export import export_run

    out = export_run(args.run, args.out, format=args.format, ema=not args.no_ema, overwrite=args.overwrite)
    print(out)
    return 0


def _cpu_threads(n: int | None, cfg) -> None:
    """torch's CPU threads for ``fastat train``: ``--threads N``; else ``OMP_NUM_THREADS`` when set; else one
    thread for the built-in known sets on the CPU (their small models step faster on one thread: the
    quickstart's tiny UNet at 3x8x8, batch 32, took 155 ms per step on one thread, 252 ms on two sleeping
    (PASSIVE) threads, on this 2-core machine idle); else torch's default."""
    import torch

    from fastat.data import KNOWN
    from fastat.train.run_config import resolve_device

    if n is None and "OMP_NUM_THREADS" not in os.environ and cfg.data.dataset in KNOWN:
        with contextlib.suppress(ConfigError):  # a bad device: train() says so, in turn with the ranks
            n = 1 if resolve_device(cfg.run.device).type == "cpu" else None
    if n is not None:
        torch.set_num_threads(n)
