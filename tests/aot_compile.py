"""Compile every fastat Triton kernel to GPU code ahead of time, without a GPU.

    python tests/aot_compile.py            # the covering set (what CI runs, via tests/test_aot.py)
    python tests/aot_compile.py --full     # every specialisation for every target

Which specialisations: the launchers themselves say. Each ``@triton.jit`` kernel in ``fastat.kernels``
is swapped for a recorder, and the launchers run on ``meta`` tensors (no memory, no kernel) over the
settings the trainer meets: per-sample sizes 3x32x32, 3x64x64, 3x256x256 and 1 element, batch 1, 32 and
128, fp32, bf16 and fp16, and every option (``store_noise``, ``x_t``, ``norm``, ``detach_clean``, gradients or
not). Each launch becomes the signature the JIT would build at run time (pointer dtypes; integers equal
to 1 as constants, multiples of 16 and 16-byte aligned pointers marked divisible by 16) with its
constexprs (``STORE_NOISE``, ``WRITE_X``, ``DETACH``, ``GRAD``, ``BLOCK``, ``RBLOCK``).

The covering set compiles each specialisation once, for sm_80 or sm_90, alternating so that every
combination of constexprs and integer specialisations is compiled in every dtype, and for sm_80 and for
sm_90 (half the compiles of ``--full``). ``triton.compile(ASTSource(...), target=GPUTarget(...))``
runs the whole pipeline (TTIR, TTGIR, LLVM IR, PTX, ptxas) in a pool of processes, using triton's cache.
Prints one JSON object: the cases, failures and timing.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import pkgutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

TARGETS = (80, 90)
SIZES = [(3, 32, 32), (3, 64, 64), (3, 256, 256), (1,)]
BATCHES = (1, 32, 128)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
                 torch.int32: "i32"}  # fmt: skip


def kernel_modules():
    import fastat.kernels as pkg

    return [importlib.import_module(f"fastat.kernels.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


def jit_kernels() -> dict[str, object]:
    """``module:name`` -> JITFunction, for every ``@triton.jit`` kernel in fastat.kernels."""
    from triton.runtime.jit import JITFunction

    return {
        f"{mod.__name__}:{name}": obj
        for mod in kernel_modules()
        for name, obj in vars(mod).items()
        if isinstance(obj, JITFunction) and obj.__module__ == mod.__name__
    }


def _spec(value):
    """(signature type, divisibility attribute, constant) of one runtime argument, as the JIT makes it."""
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_DTYPE[value.dtype], value.data_ptr() % 16 == 0, None
    if isinstance(value, bool):
        return "u1", False, None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False, 1
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), value % 16 == 0, None
    if isinstance(value, float):
        return "fp32", False, None
    raise TypeError(f"unexpected kernel argument {type(value).__name__}")


class _Recorder:
    def __init__(self, key, fn, launches, dtype_label):
        self.key, self.fn, self.launches, self.dtype_label = key, fn, launches, dtype_label

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound = dict(zip(self.fn.arg_names, args, strict=False)) | kwargs
            signature, constexprs, attrs = {}, {}, []
            for i, p in enumerate(self.fn.params):
                v = bound[p.name]
                if p.is_constexpr:
                    signature[p.name], constexprs[p.name] = "constexpr", v
                    continue
                ty, div16, const = _spec(v)
                signature[p.name] = ty
                if const is not None:
                    constexprs[p.name] = const
                if div16:
                    attrs.append(i)
            self.launches.add(
                (self.key, self.dtype_label[0], json.dumps(signature), json.dumps(constexprs), tuple(attrs))
            )

        return launch


def record_launches() -> set:
    """Run every launcher over SIZES x BATCHES x DTYPES x options on meta tensors; record the launches."""
    from fastat import kernels as K

    launches: set = set()
    label = ["fp32"]
    kernels = jit_kernels()
    for key, fn in kernels.items():
        mod, name = key.split(":")
        setattr(sys.modules[mod], name, _Recorder(key, fn, launches, label))
    try:
        _run_launchers(K, label)
    finally:
        for key, fn in kernels.items():
            mod, name = key.split(":")
            setattr(sys.modules[mod], name, fn)
    return launches


def _run_launchers(K, label: list) -> None:
    for size in SIZES:
        for B in BATCHES:
            for label[0], dtype in DTYPES.items():
                x = functools.partial(torch.empty, (B, *size), dtype=dtype, device="meta")
                vec = functools.partial(torch.empty, (B,), dtype=torch.float32, device="meta")
                idx = torch.empty((1,), dtype=torch.int64, device="meta")
                K.q_sample_triton(x(), vec(), vec(), x())
                for store in (True, False):
                    K.noise_inject_triton(x(), vec(), vec(), vec(), idx, idx, store_noise=store)
                out2 = torch.empty(
                    (2 * B, *size), dtype=dtype, device="meta"
                )  # split buffer: x~_t at offset B
                K.noise_inject_triton(x(), vec(), vec(), vec(), idx, idx, out=out2, store_noise=False)
                for norm in K.NORMS:
                    K.pgd_step_triton(x(), x(), vec(), vec(), norm)
                    K.pgd_step_triton(x(), x(), vec(), vec(), norm, x_t=x(), s=vec())
                for detach in (False, True):
                    for grad in (True, False):
                        K.at_loss_triton(x(), x(), x(), x(), vec(), detach, grad=grad)
                    K.at_loss_triton(x(), x(), x(), x(), 0.3, detach, grad=True)  # a float lambda


def choose_cases(launches: set, full: bool) -> list[dict]:
    """Each launch as a compile case with its target(s): all targets (``full``), or alternating."""
    combos: dict[tuple, list] = {}  # everything but the data dtype -> its launches
    for key, label, sig, const, attrs in sorted(launches):
        untyped = [("*" if t.startswith("*") else t) for t in json.loads(sig).values()]
        combos.setdefault((key, const, attrs, tuple(untyped)), []).append((label, key, sig, const, attrs))
    cases = []
    for i, members in enumerate(combos.values()):
        for label, key, sig, const, attrs in members:
            targets = TARGETS if full else [TARGETS[(i + list(DTYPES).index(label)) % 2]]
            case = {
                "kernel": key,
                "dtype": label,
                "signature": json.loads(sig),
                "constexprs": json.loads(const),
            }
            cases += [{**case, "divisible_by_16": list(attrs), "cc": cc} for cc in targets]
    return cases


def compile_case(case: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit_kernels()[case["kernel"]]
    attrs = {(i,): [["tt.divisibility", 16]] for i in case["divisible_by_16"]}
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn, case["signature"], constexprs=case["constexprs"], attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", case["cc"], 32))
        cubin = compiled.asm.get("cubin", b"")
        error = None if cubin else "no cubin produced"
    except Exception as e:  # noqa: BLE001 - reported per case
        cubin, error = (
            b"",
            f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}",
        )
    return {**case, "ok": error is None, "error": error, "cubin_bytes": len(cubin),
            "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="every specialisation for every target")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    kernels = sorted(jit_kernels())
    cases = choose_cases(record_launches(), args.full)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(compile_case, cases))
    import triton

    print(json.dumps({
        "triton": triton.__version__, "kernels": kernels, "cases": results,
        "failed": [r for r in results if not r["ok"]], "seconds": round(time.perf_counter() - t0, 1),
    }))  # fmt: skip
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
