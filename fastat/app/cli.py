"""The ``fastat`` command: ``train``, ``sample``, ``prepare``, ``export`` (``bench`` and ``eval`` elsewhere).

    fastat train                                   # default: known subspace data, tiny UNet, adv, CPU
    fastat train --config exp.yaml --steps 50000 --out runs/exp
    fastat train --out runs/exp --resume auto      # continue exactly where runs/exp stopped
    fastat train --dry-run                         # validate and print the resolved config, write nothing
    torchrun --standalone --nproc_per_node=8 -m fastat train ...   # data parallel (README: Many GPUs)
    fastat sample --run runs/exp --n 64 --out grid.png
    fastat export --run runs/exp --format diffusers out/exp   # a DDPMPipeline folder (--model diffusers runs)

Bad input (unknown dataset or mode, missing folder, bad YAML, unknown key, ...) is reported as one
line ``fastat: error: ...`` on stderr with exit code 2; ``--traceback`` shows the full traceback
instead. Ctrl-C during training saves a checkpoint and exits with code 130.
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

from fastat import __version__
from fastat.app.guards import check_samples, thread_count, unused_at_flags
from fastat.train.config import ConfigError, load_yaml_overrides
from fastat.utils.errors import one_line
from fastat.utils.yaml_io import safe_load as bounded_load

# This module imports torch lazily (in the commands), so that main() can set OpenMP's wait policy
# before the OpenMP runtime starts; see _passive_openmp.

__all__ = ["main"]

EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130

# flag -> config key (the flags that override the YAML file)
TRAIN_FLAGS = {
    "dataset": (
        "data.dataset",
        str,
        "dataset: gmm2d | plane3d | subspace | cifar10 | prepared folder (fastat prepare) | image folder",
    ),
    "data_placement": (
        "data.placement",
        str,
        "real images: auto | device (uint8 set on the device) | stream (read ahead from disk)",
    ),
    "data_root": ("data.data_root", str, "torchvision root for cifar10 (default: data)"),
    "image_size": ("data.image_size", int, "image size (required for folders; resizes others)"),
    "corrupt_frac": ("data.corrupt_frac", float, "fraction of training samples made noisy (default 0.9)"),
    "corrupt_sigma": ("data.corrupt_sigma", float, "std of that noise in data units (default 0.2)"),
    "model": ("model.name", str, "auto | tiny | cifar10 | celeba64 | lsun256 | mlp | diffusers"),
    "mode": ("objective.mode", str, "ddpm | rand | adv | pgd | inv | free (default adv)"),
    "lam": ("objective.lam", float, "weight of the equivariance regulariser (default 0.3)"),
    "replays": ("objective.replays", int, "mode free: optimizer steps per batch (default 2)"),
    "reg_frac": ("objective.reg_frac", float, "regularise only this share of each batch (default 1)"),
    "steps": ("run.steps", int, "total training steps"),
    "batch_size": ("run.batch_size", int, "batch size"),
    "lr": ("optim.lr", float, "AdamW learning rate"),
    "out": ("run.out", str, "run folder (default runs/<date>-<time>-<dataset>-<mode>)"),
    "seed": ("run.seed", int, "seed of the run (init, dropout, loss noise, batch order)"),
    "device": ("run.device", str, "auto | cpu | cuda | cuda:N"),
    "precision": ("run.precision", str, "auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp32 on CPU)"),
    "save_every": ("run.save_every", int, "checkpoint every N steps (0: only at the end)"),
    "sample_every": ("run.sample_every", int, "sample grid every N steps (0: only at the end)"),
    "log_every": ("run.log_every", int, "metrics every N steps"),
    "keep": ("run.keep", int, "keep the last K checkpoints"),
}


class UsageError(Exception):
    """A command-line parsing error (argparse's), reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastat", description="Fast equivariant adversarial training of diffusion models.")
    p.add_argument("--version", action="version", version=f"fastat {__version__}")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a diffusion model (resumable)",
        description=(
            "Train with the config file and flags (flags win). With no arguments: the built-in known "
            "subspace dataset (90% of the samples noisy), tiny UNet, --mode adv, on the CPU in minutes."
        ),
    )
    t.add_argument(
        "--config", metavar="YAML", help="config file (sections data, model, objective, optim, ema, run)"
    )
    for dest, (key, typ, help_) in TRAIN_FLAGS.items():
        t.add_argument(
            "--" + dest.replace("_", "-"), dest=dest, type=typ, default=None, help=f"{help_} [{key}]"
        )
    t.add_argument(
        "--fast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compiled step, and on CUDA a captured CUDA graph (default: on for CUDA, off on the CPU) [run.fast]",
    )
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any config key, e.g. --set objective.rho=2 --set model.kwargs.dropout=0.1",
    )
    t.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="auto: continue the run in --out if it has a checkpoint; PATH: a run or checkpoint folder",
    )
    t.add_argument(
        "--dry-run", action="store_true", help="validate, print the resolved config, write nothing"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument(
        "--threads",
        type=thread_count,
        metavar="N",
        help="torch CPU threads (default: OMP_NUM_THREADS if set, else 1 on the built-in sets on the CPU, "
        "else torch's default)",
    )
    t.set_defaults(func=cmd_train)

    s = sub.add_parser(
        "sample",
        help="sample from a trained run with its EMA weights",
        description=(
            "Sample with the EMA weights of a run's newest checkpoint. A .png FILE gets a grid (images) or a "
            "scatter plot (points); a .npy FILE the raw samples: images float32 N x C x H x W in [0, 1], "
            "points float32 N x D in data units."
        ),
    )
    s.add_argument(
        "--run", required=True, metavar="DIR", help="run folder (or one of its checkpoint folders)"
    )
    s.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    s.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    s.add_argument(
        "--eta", type=float, default=None, help="DDIM eta (0: deterministic; default: the run's sample_eta)"
    )
    s.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    s.add_argument(
        "--out", metavar="FILE", help="output .png or .npy (default RUN/samples/sample-<step>.png)"
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--batch-size", type=int, default=256, help="samples per model call")
    s.add_argument("--no-ema", action="store_true", help="use the raw (non-EMA) weights")
    s.set_defaults(func=cmd_sample)

    pr = sub.add_parser(
        "prepare",
        help="decode an image folder or CIFAR-10 once into a prepared uint8 dataset",
        description=(
            "Decode every image under SRC (recursive; any PIL format, converted to RGB by meaning) or "
            "CIFAR-10 (SRC = cifar10) once: short side resized to --image-size, centre crop, uint8 .npy "
            "shards and a manifest in --out, in parallel over all cores. Unreadable files are skipped and "
            "counted. Re-running a finished prepare does nothing; an interrupted one continues."
        ),
    )
    pr.add_argument("src", metavar="SRC", help="image folder, or cifar10")
    pr.add_argument("--image-size", type=int, required=True, help="output images are N x N")
    pr.add_argument("--out", required=True, metavar="DIR", help="the prepared dataset folder")
    pr.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    pr.add_argument("--data-root", default="data", help="torchvision root for cifar10 (default: data)")
    pr.add_argument("--no-download", action="store_true", help="cifar10: do not download a missing copy")
    pr.add_argument("--verify", action="store_true", help="then re-read the result and check its checksums")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.set_defaults(func=cmd_prepare)

    x = sub.add_parser(
        "export",
        help="write a trained run in another codebase's format (diffusers)",
        description=(
            "Write the newest checkpoint of a run (EMA weights unless --no-ema) in another codebase's "
            "format. "
            "diffusers: a DDPMPipeline folder (model_index.json, unet/, scheduler/) that "
            "DDPMPipeline.from_pretrained(OUT) and UNet2DModel.from_pretrained(OUT, subfolder='unet') load; "
            "the run must have been trained with --model diffusers."
        ),
    )
    x.add_argument("out", metavar="OUT", help="the folder to write (must not exist, or be empty)")
    x.add_argument("--run", required=True, metavar="DIR", help="run folder (or one of its checkpoints)")
    x.add_argument("--format", default="diffusers", choices=("diffusers",), help="format (default diffusers)")
    x.add_argument("--no-ema", action="store_true", help="export the raw (non-EMA) weights")
    x.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    x.set_defaults(func=cmd_export)

    # listed for --help; main() hands "fastat bench ..." to fastat.app.bench's own parser
    sub.add_parser(
        "bench",
        help="time naive eager AT, fastat's AT step and its DDPM step (fastat bench --help); "
        "fastat bench data DIR: loader throughput",
    )

    from fastat.app.eval_cli import add_eval_parser  # argparse only: no torch at import

    add_eval_parser(sub)
    return p


# -- train ---------------------------------------------------------------------------------------------


def train_overrides(args: argparse.Namespace) -> dict:
    """Dotted config overrides: the ``--config`` file, then ``--set``, then the named flags. Each layer is
    checked on its own, so a bad value is an error even where a later layer sets the same key."""
    from fastat.train.config import TrainConfig

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
    flag_over = {key: getattr(args, dest) for dest, (key, _, _) in TRAIN_FLAGS.items()}
    flag_over = {key: v for key, v in flag_over.items() if v is not None}
    if args.fast is not None:
        flag_over["run.fast"] = args.fast
    for layer in (file_over, set_over, flag_over):
        TrainConfig().with_overrides(layer)  # keys and types (values are validated on the merged config)
    merged = {**file_over, **set_over, **flag_over}
    flags = {key: f"--{dest.replace('_', '-')}" for dest, (key, _, _) in TRAIN_FLAGS.items()}
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
            check_step_memory(cfg, device, ctx.world_size)  # builds the model on meta: its kwargs too
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
    print(f"trained {result.step} steps on {result.device} in {result.seconds:.0f} s")
    line = gain_line(result, cfg)  # None without a final evaluation
    if line:
        print(line)
    return 0


# -- sample --------------------------------------------------------------------------------------------


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
    print(
        f"{ds.root}: {len(ds)} images {'x'.join(map(str, ds.shape))} uint8 ({ds.nbytes / 1e9:.2f} GB) in "
        f"{len(m['shards'])} shard(s); skipped {m.get('num_skipped', 0)} of {m.get('num_files', len(ds))} "
        f"files; "
        f"{time.perf_counter() - t0:.1f} s{'; checksums verified' if args.verify else ''}"
    )
    return 0


# -- export --------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from fastat.app.export import export_run

    out = export_run(args.run, args.out, format=args.format, ema=not args.no_ema, overwrite=args.overwrite)
    print(out)
    return 0


# -- entry point ---------------------------------------------------------------------------------------


def _passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spin (unless the user chose otherwise).

    Measured on a 2-core machine shared with one other busy process: a tiny-UNet training step took
    12.7 s with spinning threads and 1.0 s with sleeping ones (0.9 s on one thread). Only effective
    before torch is first imported, i.e. for the ``fastat`` command, not for ``main()`` called from
    a program that already imported torch.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


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


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C anywhere outside the training loop (start-up, imports, data)
        if _rank()[0] == 0:  # every rank of a torchrun job got it
            print("fastat: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    _passive_openmp()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m fastat -- eval ...`: not every launcher drops the separator
        argv = argv[1:]
    if argv[:1] == ["bench"]:  # its own parser and options (argparse cannot forward leading options)
        if argv[1:2] == ["data"]:
            from fastat.app.bench_data import main as bench_main

            prog, rest = "fastat bench data", argv[2:]
        else:
            from fastat.app.bench import main as bench_main

            prog, rest = "fastat bench", argv[1:]
        try:
            return _reported(lambda: bench_main(rest, prog=prog, parser_class=_Parser), traceback=False)
        except UsageError as e:
            print(e, file=sys.stderr)
            return EXIT_USAGE
        except SystemExit as e:  # --help
            return int(e.code or 0)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help / --version
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    return _reported(lambda: args.func(args), traceback=args.traceback)


def _reported(command, *, traceback: bool) -> int:
    """Run ``command()`` and return its exit code; an error is said as one line (:func:`_error`) with its
    exit code: 2 for bad input, 1 for a failed run or an unexpected error (``traceback``: raised as is)."""
    from fastat.data import DatasetError
    from fastat.train.checkpoint import CheckpointError
    from fastat.train.distributed import DistributedError
    from fastat.train.run import TrainingError

    try:
        return command()
    except (ConfigError, DatasetError, CheckpointError, ValueError, ImportError) as e:  # ImportError: extras
        if traceback:
            raise
        return _error(e, one_line(e), EXIT_USAGE)
    except (TrainingError, DistributedError) as e:  # the run failed (diverged, a write failed, a rank ended)
        if traceback:
            raise
        return _error(e, one_line(e), getattr(e, "exit_code", EXIT_FAILURE))
    except OSError as e:
        if traceback:
            raise
        where = f": {e.filename}" if e.filename else ""
        return _error(e, f"{one_line(e.strerror or e)}{where} (--traceback for details)", EXIT_FAILURE)
    except RuntimeError as e:
        if traceback:
            raise
        return _error(e, f"{type(e).__name__}: {one_line(e)} (--traceback for details)", EXIT_FAILURE)


def _rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process in a torchrun job (``(0, 1)`` outside one, or in a
    half-set environment: the error about it is said by rank 0)."""
    from fastat.train.launch import job_ranks

    try:
        return job_ranks()[:2]
    except ConfigError:
        return 0, 1


def _error(e: BaseException, message: str, code: int) -> int:
    """Say ``fastat: error: MESSAGE`` (one line) and return ``code``. In a torchrun job one rank says it:
    the rank it happened on (``rank R:`` in front), or rank 0 for what every rank raised alike (see
    :func:`fastat.train.distributed.who_says`); torchrun's failure report gets the line too (its error file)."""
    from fastat.train.distributed import who_says

    rank, world = _rank()
    who = who_says(e)
    line = f"fastat: error: {f'rank {rank}: ' if world > 1 and who == 'self' else ''}{message}"
    if who == "self" or (who == "main" and rank == 0):
        print(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and world > 1:
        import json

        with contextlib.suppress(OSError):
            info = {"py_callstack": line, "timestamp": str(int(time.time()))}  # what torchrun's report shows
            Path(error_file).write_text(json.dumps({"message": {"message": line, "extraInfo": info}}))
    return code


if __name__ == "__main__":
    sys.exit(main())
