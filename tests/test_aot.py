"""Every fastat Triton kernel compiles to a cubin for sm_80 and sm_90 without a GPU (``aot_compile.py``,
run in one subprocess): this catches kernel code that only the Triton interpreter accepts (a plain
Python function called from a kernel runs under the interpreter and fails ``triton.compile``)."""

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def aot():
    pytest.importorskip("triton", reason="triton not installed")
    cmd = [sys.executable, str(HERE / "aot_compile.py")]
    proc = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=900)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout)


def test_every_kernel_compiles_for_sm80_and_sm90(aot):
    rc, r = aot
    failed = [f"{c['kernel']} {c['dtype']} sm_{c['cc']} {c['constexprs']}: {c['error']}" for c in r["failed"]]
    assert rc == 0 and not failed, "\n".join(failed[:20])
    assert all(c["cubin_bytes"] > 0 for c in r["cases"])
    per_kernel = defaultdict(set)
    for c in r["cases"]:
        per_kernel[c["kernel"]].add((c["dtype"], c["cc"]))
    assert len(r["kernels"]) >= 7 and set(per_kernel) == set(r["kernels"])  # each kernel, none forgotten
    for kernel, seen in per_kernel.items():
        assert seen == {(d, cc) for d in ("fp32", "bf16", "fp16") for cc in (80, 90)}, kernel


def test_every_constexpr_value_the_launchers_use_is_covered(aot):
    _, r = aot
    values = defaultdict(set)
    for c in r["cases"]:
        name = c["kernel"].split(":")[1]
        for k, v in c["constexprs"].items():
            values[name, k].add(v)
    flags = [
        ("_noise_inject_kernel", "STORE_NOISE"),
        ("_pgd_linf_kernel", "WRITE_X"),
        ("_pgd_l2_apply_kernel", "WRITE_X"),
        ("_at_loss_kernel", "DETACH"),
        ("_at_loss_kernel", "GRAD"),
    ]
    for flag in flags:
        assert values[flag] == {True, False}, flag
    for kernel in ("_q_sample_kernel", "_noise_inject_kernel", "_pgd_linf_kernel", "_at_loss_kernel"):
        assert {16, 1024} <= values[kernel, "BLOCK"], kernel  # 1 element; 3x32x32 and larger
        assert 1 in values[kernel, "D"]  # the JIT makes an integer equal to 1 a constant
    assert {16, 256} <= values["_pgd_l2_apply_kernel", "RBLOCK"]  # 3x256x256: 192 blocks per sample
    assert {16, 1024} <= values["_sum_partials_kernel", "RBLOCK"]
    # each combination of constexprs is compiled in every dtype and for both targets
    combos = defaultdict(set)
    for c in r["cases"]:
        combos[c["kernel"], json.dumps(c["constexprs"], sort_keys=True), tuple(c["divisible_by_16"])].add(
            (c["dtype"], c["cc"])
        )
    all_dtypes = [k for k, v in combos.items() if {d for d, _ in v} == {"fp32", "bf16", "fp16"}]
    assert all({cc for _, cc in combos[k]} == {80, 90} for k in all_dtypes)
    assert len(all_dtypes) >= 0.8 * len(combos)  # the rest differ in pointer alignment between dtypes
