"""``fastat bench``: training-step throughput of naive eager AT, fastat's AT step and fastat's DDPM step.

    fastat bench --model cifar10 --batch-size 128 --precision bf16 --mode adv

(a) naive: the loop a paper would write — separate forward passes, ``torch.autograd.grad``, torch ops
    for the noise, the PGD step and the loss, eager AdamW, a per-parameter EMA loop;
(b) fastat: :class:`fastat.engine.StepEngine` with ``fast=True`` (compiled model; on CUDA the fused
    kernels and a CUDA-graph captured step), same mode;
(c) fastat with ``--mode ddpm``: the same engine without the regulariser, the cost AT is measured against.

Each is timed per step with device events (CUDA) or a host clock (CPU) after warm-up steps (compile and
capture happen there), on one resident random batch; the median is reported with img/s, peak memory,
speedup (b)/(a), AT overhead (b)/(c) and model FLOP utilisation (FLOPs of one forward counted by
``torch.utils.flop_counter``; one step = 3 forward-equivalents for DDPM, 6 + 2k for k ascent steps).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastat.budget import Budget
from fastat.checkpoint import atomic_write_text
from fastat.engine import StepEngine
from fastat.models import PRESETS, build_model
from fastat.objective import ATObjective
from fastat.schedule import NoiseSchedule
from fastat.timing import Timing, device_info, time_fn

# Dense matrix peak by card (vendor datasheets, SXM parts), FLOP/s: the MFU denominator.
PEAK_FLOPS = {("H100", "bf16"): 989e12, ("H200", "bf16"): 989e12, ("A100", "bf16"): 312e12}


@dataclass(frozen=True)
class BenchSetting:
    model: str = "tiny"
    batch_size: int = 32
    image_size: int | None = None
    precision: str = "fp32"
    mode: str = "adv"
    pgd_steps: int = 3
    steps: int = 20
    warmup: int = 5
    device: str = "auto"


def forward_equivalents(objective: ATObjective) -> int:
    """Forward-pass FLOP units of one step: fwd+bwd = 3; each ascent step fwd + input-only bwd = 2."""
    k = objective.attack_steps
    if objective.mode == "ddpm":
        return 3
    return 3 + 2 * k + 3


def model_forward_flops(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops()


def naive_at_step(model, opt, ema_params, x0, tables, objective: ATObjective, clip: float, autocast):
    """One step of AT as a paper's training loop writes it (the baseline (a))."""
    a_tab, s_tab = tables["a"], tables["s"]
    B, shape = x0.shape[0], (-1,) + (1,) * (x0.dim() - 1)
    t = torch.randint(0, a_tab.shape[0], (B,), device=x0.device)
    eps = torch.randn_like(x0)
    a, s = a_tab[t].view(shape), s_tab[t].view(shape)
    x_t = a * x0 + s * eps
    with autocast():
        eps_pred = model(x_t, t).float()
        loss = ((eps_pred - eps) ** 2).mean()
        if objective.mode != "ddpm":
            r = objective.budget.radius(s.flatten(), math.prod(x0.shape[1:])).view(shape)
            w = (2 * torch.rand_like(x0) - 1) * r
            alpha = objective.step_multiple * r
            for _ in range(objective.attack_steps):
                w.requires_grad_(True)
                j = ((model(x_t + s * w, t).float() - eps_pred.detach()) ** 2).sum()
                (g,) = torch.autograd.grad(j, [w])
                w = torch.max(torch.min(w.detach() + alpha * g.sign(), r), -r)
            eps_adv = model(x_t + s * w, t).float()
            target = 0 if objective.mode == "inv" else w
            loss = loss + objective.lam * ((eps_adv - eps_pred - target) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    with torch.no_grad():
        for pe, p in zip(ema_params, model.parameters()):
            pe.mul_(0.9999).add_(p, alpha=1 - 0.9999)
    return loss


def _objective(setting: BenchSetting, mode: str) -> ATObjective:
    return ATObjective(schedule=NoiseSchedule(), mode=mode, pgd_steps=setting.pgd_steps, budget=Budget())


def _timed_steps(step_fn, device, warmup: int, steps: int) -> tuple[Timing, float | None]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_fn(step_fn, device, warmup=warmup, reps=steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return timing, peak


def check_setting(setting: BenchSetting) -> None:
    """ValueError (one line) for a setting that cannot run; called for every setting before any runs."""
    if setting.model not in PRESETS:
        raise ValueError(f"unknown model preset {setting.model!r}; choose one of {', '.join(PRESETS)}")
    if setting.precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {setting.precision!r}; choose fp32 or bf16")
    if setting.batch_size < 1 or setting.steps < 1 or setting.warmup < 0 or setting.pgd_steps < 1:
        raise ValueError("--batch-size, --steps and --pgd-steps must be >= 1, --warmup >= 0")
    if setting.image_size is not None and setting.image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {setting.image_size}")
    from fastat.train import resolve_device  # ConfigError (a ValueError) for an unusable device

    resolve_device(setting.device)


def check_json_path(path: str | os.PathLike) -> Path:
    """The ``--json`` file must be writable: checked before the benchmark runs, not after."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"--json {p} is a folder; give a file name")
    if not p.parent.is_dir():
        raise ValueError(f"--json {p}: the folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"--json {p}: not writable")
    return p


def run_bench(setting: BenchSetting, fast: bool = True, log=print) -> dict:
    """Time (a) naive AT, (b) fastat AT and (c) fastat DDPM for one setting; returns a JSON-able dict."""
    check_setting(setting)
    from fastat.train import resolve_device

    device = resolve_device(setting.device)
    kw = {"image_size": setting.image_size} if setting.image_size else {}
    torch.manual_seed(0)
    model0 = build_model(setting.model, **kw)
    shape = (setting.batch_size, *model0.sample_shape)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1).to(device)
    t = torch.randint(0, 1000, (setting.batch_size,), device=device)
    fwd_flops = model_forward_flops(model0.to(device), x0, t)
    bf16 = setting.precision == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(device.type, enabled=False)

    def fresh_model():
        torch.manual_seed(0)
        return build_model(setting.model, **kw).to(device).train()

    rows = {}
    # (a) naive eager AT
    obj_at = _objective(setting, setting.mode)
    m = fresh_model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    ema = [p.detach().clone() for p in m.parameters()]
    tables = obj_at.schedule.tables(device)
    rows["naive"] = _timed_steps(lambda: naive_at_step(m, opt, ema, x0, tables, obj_at, 1.0, autocast),
                                 device, setting.warmup, setting.steps)  # fmt: skip
    del m, opt, ema
    # (b) fastat AT, (c) fastat DDPM
    for key, mode in (("fastat", setting.mode), ("fastat_ddpm", "ddpm")):
        m = fresh_model()
        gen = torch.Generator(device=device).manual_seed(1)
        eng = StepEngine(m, _objective(setting, mode), generator=gen, lr=1e-4, precision=setting.precision,
                         fast=fast, log=log)  # fmt: skip
        rows[key] = _timed_steps(lambda e=eng: e.step(x0, 1e-4), device, setting.warmup, setting.steps)
        rows[key + "_engine"] = eng.mode
        del m, eng

    units = {"naive": forward_equivalents(obj_at), "fastat": forward_equivalents(obj_at), "fastat_ddpm": 3}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for (card, p), v in PEAK_FLOPS.items() if card in name and p == setting.precision), None)
    result = {"setting": setting.__dict__, "info": device_info(device), "fwd_gflops": fwd_flops / 1e9, "runs": {}}
    for key in ("naive", "fastat", "fastat_ddpm"):
        timing, mem = rows[key]
        sec = timing.median_ms / 1e3
        achieved = fwd_flops * units[key] / sec
        result["runs"][key] = {
            **timing.as_dict(), "img_per_s": setting.batch_size / sec, "peak_mem_gib": mem,
            "tflops": achieved / 1e12, "mfu": achieved / peak if peak else None,
            "engine": rows.get(key + "_engine", "naive-eager"),
        }  # fmt: skip
    runs = result["runs"]
    result["speedup_vs_naive"] = runs["naive"]["median_ms"] / runs["fastat"]["median_ms"]
    result["at_overhead"] = runs["fastat"]["median_ms"] / runs["fastat_ddpm"]["median_ms"]
    result["flop_floor_overhead"] = units["fastat"] / 3
    return result


def format_result(r: dict) -> str:
    s = r["setting"]
    lines = [
        f"{s['model']} B={s['batch_size']} {s['precision']} mode={s['mode']}"
        f"{' k=' + str(s['pgd_steps']) if s['mode'] == 'pgd' else ''} on {r['info'].get('gpu', r['info']['device'])}"
        f" (torch {r['info']['torch']}); forward {r['fwd_gflops']:.2f} GFLOP",
        f"{'run':<13}{'engine':<16}{'ms/step':>9}{'p20-p80':>16}{'img/s':>9}{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>9}",
    ]
    for key, run in r["runs"].items():
        mfu = f"{100 * run['mfu']:.0f}%" if run["mfu"] is not None else "-"
        mem = f"{run['peak_mem_gib']:.2f}" if run["peak_mem_gib"] is not None else "-"
        lines.append(
            f"{key:<13}{run['engine']:<16}{run['median_ms']:>9.2f}{run['p20_ms']:>8.2f}-{run['p80_ms']:<7.2f}"
            f"{run['img_per_s']:>9.0f}{run['tflops']:>9.2f}{mfu:>7}{mem:>9}"
        )
    lines.append(
        f"speedup fastat/naive: {r['speedup_vs_naive']:.2f}x   AT overhead fastat/ddpm: {r['at_overhead']:.2f}x"
        f" (FLOP floor {r['flop_floor_overhead']:.2f}x)"
    )
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    d = BenchSetting()
    ap.add_argument("--model", default=d.model, help=f"UNet preset ({', '.join(PRESETS)}; default {d.model})")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[d.batch_size], help="one or more batch sizes")
    ap.add_argument("--image-size", type=int, default=None, help="override the preset's resolution")
    ap.add_argument("--precision", default=d.precision, choices=["fp32", "bf16"])
    ap.add_argument("--mode", nargs="+", default=[d.mode], choices=["rand", "adv", "pgd", "inv"],
                    help="AT mode(s) to time against naive AT and DDPM")  # fmt: skip
    ap.add_argument("--pgd-steps", type=int, default=d.pgd_steps)
    ap.add_argument("--steps", type=int, default=d.steps, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first (compile, capture)")
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                    help="fastat runs compiled (+ CUDA graph on CUDA); --no-fast times its eager step")  # fmt: skip
    ap.add_argument("--json", help="write all results to this JSON file")


def run_from_args(args: argparse.Namespace, log=print) -> int:
    settings = [
        BenchSetting(model=args.model, batch_size=bs, image_size=args.image_size, precision=args.precision,
                     mode=mode, pgd_steps=args.pgd_steps, steps=args.steps, warmup=args.warmup,
                     device=args.device)  # fmt: skip
        for bs in args.batch_size
        for mode in args.mode
    ]
    for setting in settings:  # every bad value and the output path first: no result is lost at the end
        check_setting(setting)
    out = check_json_path(args.json) if args.json else None
    results = []
    for setting in settings:
        r = run_bench(setting, fast=args.fast, log=log)
        print(format_result(r), flush=True)
        print(flush=True)
        results.append(r)
    if out is not None:
        atomic_write_text(out, json.dumps(results, indent=2))
    return 0


def main(argv=None, prog: str = "python -m fastat.bench", parser_class=argparse.ArgumentParser) -> int:
    ap = parser_class(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        return run_from_args(args)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
