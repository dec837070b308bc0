"""The distributed context of a run: which process this is in a ``torchrun`` job, and what the ranks do
together (data parallelism: one model, identical on every rank, each rank a shard of every batch).

    ctx = DistContext.from_env(timeout_s=900)   # torchrun's RANK, WORLD_SIZE, ...; world 1 without them
    with ctx.together("start-up"):              # an error on any rank is raised on every rank, said once
        ...                                     #   (no collectives inside: they are the agreement's)
    ctx.broadcast_(model)                       # rank 0's weights and buffers on every rank
    engine = StepEngine(..., reduce_grads=ctx.grad_sync(model))   # gradients averaged in the step
    data = ctx.in_turn(build, "the data")       # rank 0 first, then the others (waiting through the store)
    stop = ctx.agree_stop(requested)            # at the same steps on every rank (the loop: every 10)

With world size 1 every method is the single-process identity. The process group, the gradient
average (:mod:`fastat.train.grad_sync`) and who says an error: docs/DESIGN.md, "Many processes".
"""

from __future__ import annotations

import contextlib
import datetime
import pickle
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from fastat.at.seeding import derive_seed, rank_seed
from fastat.train.config import ConfigError
from fastat.train.grad_sync import BUCKET_BYTES, GradSync
from fastat.train.launch import job_ranks
from fastat.utils.errors import one_line

__all__ = [
    "BUCKET_BYTES",
    "DEFAULT_TIMEOUT_S",
    "DistContext",
    "DistributedError",
    "GradSync",
    "PeerFailed",
    "RankFailed",
    "fingerprint",
    "job_ranks",
    "mark",
    "who_says",
]

DEFAULT_TIMEOUT_S = 900.0


class DistributedError(RuntimeError):
    """The ranks of a run cannot go on together; ``exit_code`` is the command's exit status."""

    exit_code = 1


class PeerFailed(DistributedError):
    """Another rank ended (its own error, a crash, a kill) or stopped answering within the timeout."""


class RankFailed(DistributedError):
    """A :meth:`DistContext.together` block failed on another rank (its message, its exit status)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# Which rank prints an exception (an attribute set on the exception object):
#   "self" (unset): this rank's own error, said by this rank;  "main": every rank raises it, rank 0 says it;
#   "none": nobody says it (another rank already did, or torchrun reports how that rank ended).
_SAY = "_fastat_says"


def mark(e: BaseException, who: str) -> BaseException:
    """Set who prints ``e`` (``"self"``, ``"main"`` or ``"none"``); returns ``e``."""
    setattr(e, _SAY, who)
    return e


def who_says(e: BaseException) -> str:
    """``"self"``, ``"main"`` or ``"none"``: see :func:`mark`."""
    return getattr(e, _SAY, "self")


def usage_error(e: BaseException) -> bool:
    """Errors of the input (config, data, checkpoint): exit status 2, as the command line uses."""
    from fastat.data import DatasetError
    from fastat.train.checkpoint import CheckpointError

    return isinstance(e, (ConfigError, DatasetError, CheckpointError)) or type(e) is ValueError


def fingerprint(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """An exact fingerprint of the tensors' bits: int64 ``(2,)`` on the CPU, equal for bit-identical
    tensors whatever the device (integer sums are exact in any order) and different for any one-bit
    change. One device-to-host copy."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    parts = []
    for i, t in enumerate(tensors):
        bits = t.detach().contiguous().view(ints[t.element_size()]).reshape(-1).to(torch.int64)
        total = bits.sum()
        parts.append(torch.stack([total, total * (2 * i + 1) + bits.numel()]))
    if not parts:
        return torch.zeros(2, dtype=torch.int64)
    return torch.stack([p.to(parts[0].device) for p in parts]).sum(dim=0).cpu()


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


class DistContext:
    """This process's place in the job (see the module docstring). Build it with :meth:`from_env`."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:  # fmt: skip
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.timeout_s = timeout_s
        self._owned = False  # this context initialised the process group (and destroys it)
        self._vote: tuple[Any, torch.Tensor] | None = None  # the stop vote in flight
        self._turns = 0  # in_turn calls (their store keys)

    # -- joining and leaving -------------------------------------------------------------------------

    @classmethod
    def from_env(cls, *, timeout_s: float | None = None, env: dict | None = None) -> DistContext:
        """Join the ``torchrun`` job described by the environment (``RANK``, ``WORLD_SIZE``,
        ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or a world of one without it. ConfigError for
        an environment that names a job incompletely (e.g. ``WORLD_SIZE`` without ``RANK``)."""
        timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
        rank, world, local = job_ranks(env)
        if world <= 1:
            return cls(timeout_s=timeout_s)
        import torch.distributed as dist

        ctx = cls(rank, world, local, timeout_s)
        if dist.is_initialized():  # a program that set up its own group
            if dist.get_world_size() != world or dist.get_rank() != rank:
                raise DistributedError("the process group does not match RANK / WORLD_SIZE")
            return ctx
        cuda = torch.cuda.is_available()
        if cuda and local < torch.cuda.device_count():
            torch.cuda.set_device(local)  # before NCCL makes its communicator
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise mark(DistributedError(f"rank {rank} cannot join the torchrun job: {one_line(e)}"),
                       "main") from None  # fmt: skip
        ctx._owned = True
        return ctx

    @property
    def enabled(self) -> bool:
        """More than one rank."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run folder and speaks."""
        return self.rank == 0

    def close(self, *, clean: bool = True) -> None:
        """Leave the job (a clean exit; after a failure the group is left to the process's end, since
        tearing down a communicator with a dead peer can block)."""
        if not self._owned:
            return
        import torch.distributed as dist

        self._owned = False
        if clean:
            with contextlib.suppress(RuntimeError):
                self._wait_vote()
                dist.destroy_process_group()

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(clean=exc_type is None)

    # -- devices and seeds ---------------------------------------------------------------------------

    def cuda_device(self, device: torch.device) -> torch.device:
        """The CUDA device of this rank: ``cuda:LOCAL_RANK`` (ConfigError for an explicit index or too
        few devices). The CPU and single-process runs keep ``device``."""
        if not self.enabled or device.type != "cuda":
            return device
        if device.index is not None:
            raise ConfigError(
                f"--device {device} under torchrun: each rank uses cuda:LOCAL_RANK; pass --device cuda or "
                f"auto (choose the GPUs with CUDA_VISIBLE_DEVICES)"
            )
        if self.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {self.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                f"start at most that many processes per node (--nproc_per_node)"
            )
        return torch.device("cuda", self.local_rank)

    def rank_seed(self, seed: int, tag: str) -> int:
        """A seed for this rank's own stream ``tag`` (:func:`fastat.at.seeding.rank_seed`); with one rank
        the stream of a single-process run (:func:`fastat.at.seeding.derive_seed`)."""
        return rank_seed(seed, self.rank, tag) if self.enabled else derive_seed(seed, tag)

    def check_batch(self, batch_size: int) -> None:
        """``--batch-size`` is the global batch: it must split evenly over the ranks (ConfigError)."""
        if batch_size % self.world_size:
            lo = batch_size - batch_size % self.world_size
            near = f"{lo} or {lo + self.world_size}" if lo else str(self.world_size)
            raise ConfigError(
                f"--batch-size {batch_size} is the global batch (all ranks together): it must be divisible "
                f"by the world size {self.world_size}, e.g. {near}"
            )

    # -- agreeing --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def together(self, what: str) -> Iterator[None]:
        """Run the block on every rank, then agree: if it raised anywhere, it raises everywhere: the
        failing rank its own exception, the others :class:`RankFailed`; :func:`who_says` picks the rank
        that prints it. The block must not communicate (the agreement is a collective)."""
        if not self.enabled:
            yield
            return
        failure: Exception | None = None
        try:
            yield
        except Exception as e:  # noqa: BLE001 - exchanged with the other ranks, then raised again
            failure = e
        mine = None if failure is None else (2 if usage_error(failure) else getattr(failure, "exit_code", 1),
                                             one_line(failure))  # fmt: skip
        failed = [(r, f) for r, f in enumerate(self.gather_objects(mine, what)) if f is not None]
        if not failed:
            return
        first, (code, message) = failed[0]
        if failure is not None and first == self.rank == 0:
            raise mark(failure, "main")
        if self.is_main:
            raise mark(RankFailed(f"rank {first}: {message}", code), "main")
        raise mark(failure if failure is not None else RankFailed(message, code), "none")

    def in_turn(self, build: Callable[[], Any], what: str) -> Any:
        """``build()`` on every rank, in turn: global rank 0 first (it may download or prepare data into a
        cache), then the local rank 0 of every other node (which finds that cache if the nodes share it,
        or fills its own node-local one), then the other ranks (which read the cache). Each wave waits
        for the previous ones through the job's store, without the collective timeout (preparing a large
        image set can take hours); if a build fails, the later waves skip theirs, and the error is raised
        on every rank (:meth:`together`)."""
        if not self.enabled:
            return build()
        import torch.distributed as dist

        locals_ = self.gather_objects(self.local_rank, what)
        waves = [0 if r == 0 else 1 if local == 0 else 2 for r, local in enumerate(locals_)]
        store = dist.distributed_c10d._get_default_store()
        self._turns += 1
        key = f"fastat/in_turn/{self._turns}/rank"
        before = [f"{key}{r}" for r, w in enumerate(waves) if w < waves[self.rank]]
        result, failure, ok = None, None, False
        try:
            if before:
                with self.talking(what):
                    store.wait(before, datetime.timedelta(days=7))
            if all(store.get(k) == b"ok" for k in before):  # else an earlier wave failed: it says why
                result = build()
                ok = True
        except Exception as e:  # noqa: BLE001 - raised again below, on every rank
            failure = e
        finally:  # also on failure (even Ctrl-C), so that the later waves stop waiting
            store.set(f"{key}{self.rank}", b"ok" if ok else b"failed")
        with self.together(what):
            if failure is not None:
                raise failure
        return result

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (e.g. the step compiled, the graph was captured)."""
        if not self.enabled:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([int(bool(flag))], dtype=torch.int32)
        with self.talking("an agreement"):
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def agree_stop(self, requested: bool, *, last: bool = False) -> bool:
        """Whether the ranks stop after this step: every rank gets the same answer at the same step.

        A stop requested here (a signal on any rank) is voted without blocking and takes effect at the
        next step's call; ``last`` (the final step) waits for this step's vote too."""
        if not self.enabled:
            return bool(requested)
        import torch.distributed as dist

        stop = self._wait_vote()
        t = torch.tensor([int(bool(requested))], dtype=torch.int32)
        with self.talking("the stop vote"):
            self._vote = (dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True), t)
        if stop or last:
            stop = self._wait_vote() or stop
        return stop

    def _wait_vote(self) -> bool:
        if self._vote is None:
            return False
        (work, t), self._vote = self._vote, None
        with self.talking("the stop vote"):
            work.wait()
        return bool(t.item())

    # -- exchanging ------------------------------------------------------------------------------------

    def gather_objects(self, obj: Any, what: str = "an exchange") -> list:
        """``obj`` of every rank, in rank order, on every rank (plain values and CPU tensors, pickled:
        only between the job's own processes, never from a file)."""
        if not self.enabled:
            return [obj]
        return self._gather(obj, what, everywhere=True)

    def gather_to_main(self, obj: Any, what: str = "an exchange") -> list | None:
        """``obj`` of every rank, in rank order, on rank 0 only (``None`` on the others): what only the
        writer needs, e.g. every rank's random states for a checkpoint."""
        if not self.enabled:
            return [obj]
        return self._gather(obj, what, everywhere=False)

    def _gather(self, obj: Any, what: str, everywhere: bool) -> list | None:
        import torch.distributed as dist

        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        with self.talking(what):
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
            dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64))
            n = max(int(s) for s in sizes)
            padded = torch.cat([data, torch.zeros(n - data.numel(), dtype=torch.uint8)])
            bufs = [torch.empty(n, dtype=torch.uint8) for _ in range(self.world_size)]
            if everywhere:
                dist.all_gather(bufs, padded)
            else:
                dist.gather(padded, bufs if self.is_main else None, dst=0)
        if not (everywhere or self.is_main):
            return None
        return [pickle.loads(b[: int(s)].numpy().tobytes()) for b, s in zip(bufs, sizes, strict=True)]  # noqa: S301

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        return self.gather_objects(value if self.is_main else None, "the config")[0]

    def average(self, values: dict[str, float]) -> dict[str, float]:
        """The mean of each value over the ranks (every rank passes the same keys)."""
        if not self.enabled or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        with self.talking("the log interval"):
            dist.all_reduce(t)
        return {**values, **dict(zip(keys, (t / self.world_size).tolist(), strict=True))}

    def broadcast_(self, *objs: nn.Module | torch.optim.Optimizer) -> None:
        """Rank 0's parameters and buffers of modules (and tensors in the state of optimizers) on every
        rank."""
        if not self.enabled:
            return
        import torch.distributed as dist

        with self.talking("the weight broadcast"), torch.no_grad():
            for obj in objs:
                if isinstance(obj, nn.Module):
                    tensors = _tensors(obj)
                else:
                    tensors = [v for st in obj.state.values() for v in st.values() if torch.is_tensor(v)]
                for t in tensors:
                    dist.broadcast(t.data, src=0)

    def check_identical(self, modules: dict[str, nn.Module], step: int) -> None:
        """Every rank holds bit-identical ``modules`` (their :func:`fingerprint`), else a
        :class:`DistributedError` on every rank (said by rank 0)."""
        if not self.enabled:
            return
        mine = {name: fingerprint(_tensors(m)).tolist() for name, m in modules.items()}
        everyone = self.gather_objects(mine, "the weight check")
        for r, theirs in enumerate(everyone):
            bad = [name for name in mine if theirs[name] != everyone[0][name]]
            if bad:
                raise mark(DistributedError(
                    f"the {bad[0]} weights of rank {r} differ from rank 0's at step {step}: the ranks no "
                    f"longer train one model; nothing was saved at this step (resume the last checkpoint)"
                ), "main")  # fmt: skip

    def spread(
        self, fn: Callable[[torch.Tensor, int], torch.Tensor], rows: torch.Tensor
    ) -> torch.Tensor | None:
        """``fn(part, start)`` on this rank's contiguous share ``part = rows[start:stop]`` (it returns a
        CPU tensor shaped like ``part``: e.g. samples from starting noise); all results in row order on
        rank 0, ``None`` on the other ranks. One rank: ``fn(rows, 0)``."""
        if not self.enabled:
            return fn(rows, 0)
        import torch.distributed as dist

        n, w = rows.shape[0], self.world_size
        per = -(-n // w)
        start, stop = min(n, self.rank * per), min(n, (self.rank + 1) * per)
        part = fn(rows[start:stop], start) if stop > start else rows[:0].float().cpu()
        padded = torch.zeros((per, *rows.shape[1:]), dtype=part.dtype)
        padded[: part.shape[0]] = part
        gathered = [torch.empty_like(padded) for _ in range(w)] if self.is_main else None
        with self.talking("gathering samples"):
            dist.gather(padded, gathered, dst=0)
        return torch.cat(gathered)[:n] if self.is_main else None

    def grad_sync(self, model: nn.Module) -> GradSync | None:
        """The gradient average for the step engine (``None`` with one rank)."""
        return GradSync(list(model.parameters()), self) if self.enabled else None

    @contextlib.contextmanager
    def talking(self, what: str) -> Iterator[None]:
        """A block of collectives (``what`` names it in messages): a failed collective means another rank
        ended or stopped answering, raised as :class:`PeerFailed`."""
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as e:
            if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                raise mark(PeerFailed(
                    f"rank {self.rank}: no answer from the other ranks within {self.timeout_s:.0f} s during "
                    f"{what} (run.dist_timeout): a rank is stuck or gone"
                ), "main") from None  # fmt: skip
            raise mark(PeerFailed(f"another rank ended during {what}: {one_line(e)}"), "none") from None
