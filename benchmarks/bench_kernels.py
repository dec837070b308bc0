"""Micro-benchmarks of the fused kernels against the eager PyTorch op chains they replace.

For each op, size (CIFAR-10: B=128, 3x32x32; LSUN-256: B=32, 3x256x256) and dtype (fp32, bf16):
median time, achieved GB/s (the bytes the timed call moves / time) beside a measured device-to-device
copy bandwidth, speedup over the eager chain, and (CUDA) kernel launches per call for both. The bytes are
those the fused call actually reads and writes: the l2 PGD step reads ``w`` and ``g`` twice (7 passes
over the tensor, not 5); the loss is timed twice, its fused kernel alone (loss and both input gradients
for an upstream gradient of 1: 6 passes) and as autograd's forward + backward (10: the backward
multiplies both stored gradients by the upstream gradient, PyTorch ops), both against eager forward +
backward. ``fastat_kernels_only`` says whether a row times fastat's Triton kernels alone (the
LSUN-256 bandwidth target of ``benchmarks/gpu_summary.py`` is judged on those rows). Every timed call
starts with a cold L2 cache (a 256 MB buffer is written before each, outside the timed window), so the
bandwidth is DRAM bandwidth, not L2's; the copy bandwidth uses 1 GiB buffers, far beyond L2.

    python benchmarks/bench_kernels.py --json out.json        # CUDA
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --smoke   # CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from fastat import kernels as K
from fastat.utils.timing import count_cuda_launches, device_info, time_fn

SIZES = {"cifar10": (128, 3, 32, 32), "lsun256": (32, 3, 256, 256)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def copy_bandwidth(device, n_bytes=1 << 30) -> float:
    """Device-to-device copy GB/s (read + write counted) on a 1 GiB buffer."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=5, reps=20)
    return 2 * n_bytes / (t.median_ms * 1e-3) / 1e9


def cases(shape, dtype, device):
    """(name, fused fn, eager fn, bytes the fused call moves, whether it runs fastat's kernels only)."""
    B, n = shape[0], math.prod(shape)
    el = torch.finfo(dtype).bits // 8
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda: torch.randn(shape, generator=g, device=device).to(dtype)  # noqa: E731
    x0, eps, w, grad, xt, q = mk(), mk(), mk() * 0.1, mk(), mk(), mk()
    a, s = torch.rand(B, device=device), torch.rand(B, device=device)
    r, al = torch.full((B,), 0.3, device=device), torch.full((B,), 0.2, device=device)
    seed, off = torch.tensor([1], device=device), torch.tensor([0], device=device)
    lam = 0.3

    def eager_noise():
        e = torch.randn(shape, device=device)
        w0 = (2 * torch.rand(shape, device=device) - 1) * r.view(-1, 1, 1, 1)
        xt_ = K.q_sample_ref(x0, a, s, e)
        return xt_, K.q_sample_ref(xt_, 1.0, s, w0.to(dtype)), e.to(dtype), w0.to(dtype)

    def eager_pgd(norm):
        w_new = K.pgd_step_ref(w, grad, r, al, norm)
        return w_new, K.q_sample_ref(xt, 1.0, s, w_new)

    p_leaf, q_leaf = x0.clone().requires_grad_(True), q.clone().requires_grad_(True)

    def eager_loss():
        return torch.autograd.grad(K.at_loss_ref(p_leaf, q_leaf, eps, w, lam), [p_leaf, q_leaf])

    def fused_loss():
        loss = K.ATLossFunction.apply(p_leaf, q_leaf, eps, w, lam, False)[0]
        return torch.autograd.grad(loss, [p_leaf, q_leaf])

    def fused_loss_kernel():  # the same loss and gradients (upstream 1), the Triton kernels alone
        return K.at_loss_triton(x0, q, eps, w, lam, grad=True)

    def fused_pgd(norm):
        return lambda: K.pgd_step_triton(w, grad, r, al, norm, x_t=xt, s=s)

    return [  # bytes: passes over an n-element tensor (read + written) times its element size
        ("q_sample", lambda: K.q_sample_triton(x0, a, s, eps), lambda: K.q_sample_ref(x0, a, s, eps),
         3 * n * el, True),  # x0, eps -> x_t
        ("noise_inject", lambda: K.noise_inject_triton(x0, a, s, r, seed, off), eager_noise, 5 * n * el,
         True),  # x0 -> x_t, x~, eps, w0
        ("pgd_linf+x", fused_pgd("linf"), lambda: eager_pgd("linf"), 5 * n * el, True),  # w, g, x_t -> w', x'
        ("pgd_l2+x", fused_pgd("l2"), lambda: eager_pgd("l2"), 7 * n * el, True),  # + w, g for the norms
        ("at_loss+grads", fused_loss_kernel, eager_loss, 6 * n * el, True),  # p, q, eps, w -> gp, gq
        ("at_loss fwd+bwd", fused_loss, eager_loss, 10 * n * el, False),  # + gp, gq times the upstream
    ]  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here (rewritten after every row)")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny sizes, few reps: check the script runs (CPU ok)"
    )
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print(
            "bench_kernels: needs a CUDA device (use --smoke on CPU with TRITON_INTERPRET=1)", file=sys.stderr
        )
        return 2
    sizes = {"smoke": (2, 3, 8, 8)} if args.smoke else SIZES
    reps, warm = (2, 1) if args.smoke else (100, 20)
    result = {"info": device_info(device), "l2_flushed": device.type == "cuda", "rows": []}
    if device.type == "cuda":
        result["copy_gbps"] = copy_bandwidth(device)
    for size, shape in sizes.items():
        for dname, dtype in DTYPES.items():
            for name, fused, eager, nbytes, ours in cases(shape, dtype, device):
                tf = time_fn(fused, device, warm, reps, flush_l2=True)
                te = time_fn(eager, device, warm, reps, flush_l2=True)
                row = {
                    "op": name, "size": size, "dtype": dname, "fused_ms": tf.median_ms,
                    "fused_p20_ms": tf.p20_ms, "fused_p80_ms": tf.p80_ms, "eager_ms": te.median_ms,
                    "speedup": te.median_ms / tf.median_ms, "gbps": nbytes / (tf.median_ms * 1e-3) / 1e9,
                    "bytes": nbytes, "fastat_kernels_only": ours,
                }  # fmt: skip
                if device.type == "cuda":
                    row["launches_fused"] = count_cuda_launches(fused)
                    row["launches_eager"] = count_cuda_launches(eager)
                    row["frac_of_copy"] = row["gbps"] / result["copy_gbps"]
                result["rows"].append(row)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(result, f, indent=2)
    print(format_table(result))
    return 0


def format_table(result) -> str:
    l2 = (
        "times with a cold L2 (256 MB written before every call)"
        if result.get("l2_flushed")
        else "L2 not flushed"
    )
    lines = [
        f"{result['info']}",
        f"copy bandwidth: {result.get('copy_gbps', float('nan')):.0f} GB/s; {l2}",
        "",
    ]
    head = f"{'op':<16}{'size':<9}{'dtype':<6}{'fused ms':>10}{'eager ms':>10}{'speedup':>9}{'GB/s':>8}"
    head += f"{'%copy':>7}{'launch f/e':>12}"
    lines += [head, "-" * len(head)]
    for r in result["rows"]:
        launches = f"{r.get('launches_fused', '-')}/{r.get('launches_eager', '-')}"
        lines.append(
            f"{r['op']:<16}{r['size']:<9}{r['dtype']:<6}{r['fused_ms']:>10.4f}{r['eager_ms']:>10.4f}"
            f"{r['speedup']:>9.2f}{r['gbps']:>8.0f}{100 * r.get('frac_of_copy', float('nan')):>7.0f}"
            f"{launches:>12}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
