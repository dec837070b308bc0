"""The ``fastat`` command: ``train``, ``sample``, ``prepare``, ``export`` (``bench`` and ``eval`` elsewhere).

    fastat train                                   # default: known subspace data, tiny UNet, adv, CPU
    fastat train --config exp.yaml --steps 50000 --out runs/exp
    fastat train --out runs/exp --resume auto      # continue exactly where runs/exp stopped
    fastat train --dry-run                         # validate and print the resolved config, write nothing
    torchrun --standalone --nproc_per_node=8 -m fastat train ...   # data parallel (README: Many GPUs)
    fastat sample --run runs/exp --n 64 --out grid.png
    fastat export --run runs/exp --format diffusers out/exp   # a DDPMPipeline folder (any image run)

Bad input (unknown dataset or mode, missing folder, bad YAML, unknown key, ...) is reported as one
line ``fastat: error: ...`` on stderr with exit code 2; ``--traceback`` shows the full traceback
instead. Ctrl-C during training saves a checkpoint and exits with code 130.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from fastat import __version__
from fastat.app.commands import (
    cmd_export,
    cmd_prepare,
    cmd_sample,
    cmd_train,
)
from fastat.app.guards import thread_count
from fastat.train.config_keys import FLAGS, ConfigError
from fastat.utils.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, one_line

# This module imports torch lazily (in the commands), so that main() can set OpenMP's wait policy
# before the OpenMP runtime starts; see _passive_openmp.

__all__ = ["build_parser", "main"]


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
    for dest, (key, typ, help_) in FLAGS.items():
        t.add_argument(
            "--" + dest.replace("_", "-"), dest=dest, type=typ, default=None, help=f"{help_} [{key}]"
        )
    t.add_argument(
        "--fast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compiled step, and on CUDA a captured CUDA graph (default: on for CUDA, off on the CPU) "
        "[run.fast]",
    )
    t.add_argument("--class-cond", action="store_true", default=None,
                   help="class-conditional training on the data's labels (an image folder's first-level "
                        "sub-folders, CIFAR-10's classes, a built-in set's components), with label dropout for "
                        "classifier-free guidance [data.class_cond]")  # fmt: skip
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
    s.add_argument("--overwrite", action="store_true", help="replace --out FILE if it exists")
    s.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--batch-size", type=int, default=256, help="samples per model call")
    s.add_argument("--no-ema", action="store_true", help="use the raw (non-EMA) weights")
    s.add_argument("--class", dest="label", metavar="K|NAME|all", default=None,
                   help="class-conditional run: class K (or its name: an image folder's sub-folder), or all: "
                        "a grid of the classes")  # fmt: skip
    s.add_argument("--guidance", type=float, default=None,
                   help="with --class: classifier-free guidance (default 1: conditional only)")  # fmt: skip
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
            "fastat's own UNet becomes the UNet2DModel of the same network (same outputs)."
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
    :func:`fastat.train.distributed.who_says`); torchrun's failure report gets the line too (its error
    file)."""
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
