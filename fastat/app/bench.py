"""``fastat bench``: training-step throughput of naive AT (eager and compiled), fastat's AT step and
fastat's DDPM step.

    fastat bench --model cifar10 --batch-size 128 --precision bf16 --mode adv --json bench.json

Rows: (a) naive, the loop a paper would write; (a') naive_compiled, the same with ``torch.compile`` on
the model (skipped with ``--no-fast``); (b) fastat, :class:`fastat.step.engine.StepEngine` with
``fast=True``; (c) fastat in ``--mode ddpm``, the cost AT is measured against. ``--mode free`` and
``--reg-frac`` apply to (b). Warm-up steps are timed apart; reported are the median and p20/p80, img/s,
peak memory, the engine mode that ran, speedups, AT overhead, MFU and ``units/img``; a step with a
non-finite loss or gradient norm is reported instead of a time. Method: docs/DESIGN.md ("Benchmarks").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastat.at.budget import Budget
from fastat.at.objective import ATObjective
from fastat.at.schedule import NoiseSchedule
from fastat.models import PRESETS, build_model
from fastat.step.capture import CaptureError
from fastat.step.engine import StepEngine
from fastat.train.checkpoint import atomic_write_text
from fastat.utils.compile_cache import guard_autograd_cache
from fastat.utils.timing import device_info, time_fn

# Dense matrix peak by card (vendor datasheets, SXM parts), FLOP/s: the MFU denominator.
PEAK_FLOPS = {("H100", "bf16"): 989e12, ("H200", "bf16"): 989e12, ("A100", "bf16"): 312e12}
RUNS = ("naive", "fastat", "fastat_ddpm", "naive_compiled")  # the default order: the most wanted first


@dataclass(frozen=True)
class BenchSetting:
    model: str = "tiny"
    batch_size: int = 32
    image_size: int | None = None
    precision: str = "fp32"
    mode: str = "adv"
    pgd_steps: int = 3
    replays: int = 2  # mode free
    reg_frac: float = 1.0
    grad_accum: int = 1  # fastat's step in this many micro-batches (the naive rows: the whole batch)
    steps: int = 20
    warmup: int = 5
    device: str = "auto"


def model_forward_flops(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops()


def naive_at_step(model, opt, ema_params, x0, tables, objective: ATObjective, clip: float, autocast):
    """One step of AT as a paper's training loop writes it (the baseline (a)): ``(loss, grad norm)``."""
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
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    with torch.no_grad():
        for pe, p in zip(ema_params, model.parameters(), strict=True):
            pe.mul_(0.9999).add_(p, alpha=1 - 0.9999)
    return loss.detach(), norm


def _objective(setting: BenchSetting, mode: str, reg_frac: float | None = None) -> ATObjective:
    return ATObjective(
        schedule=NoiseSchedule(),
        mode=mode,
        pgd_steps=setting.pgd_steps,
        budget=Budget(),
        replays=setting.replays,
        reg_frac=setting.reg_frac if reg_frac is None else reg_frac,
    )


def naive_objective(setting: BenchSetting) -> ATObjective:
    """What the naive rows run: the paper's method on the whole batch (``adv`` in place of ``free``)."""
    return _objective(setting, "adv" if setting.mode == "free" else setting.mode, reg_frac=1.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_run(step: Callable[[], torch.Tensor], device, warmup: int, steps: int, ready=lambda: True) -> dict:
    """Warm up (at least ``warmup`` steps and until ``ready()``), timed apart; then time ``steps`` steps.

    ``step()`` returns a 0-dim device tensor that is 1 when the step was not finite (summed on the device,
    read once at the end)."""
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    n_warm = 1
    while n_warm < warmup or (not ready() and n_warm < warmup + 20):
        step()
        n_warm += 1
    _sync(device)
    warm = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bad = torch.zeros((), device=device)
    timing = time_fn(lambda: bad.add_(step()), device, warmup=0, reps=steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row = {**timing.as_dict(), "peak_mem_gib": peak, "first_step_s": first, "warmup_steps": n_warm,
           "warmup_s": warm, "compile_s": None, "capture_s": None, "error": None}  # fmt: skip
    n_bad = int(bad.item())
    if n_bad:
        row.update(median_ms=None, p20_ms=None, p80_ms=None)
        row["error"] = f"non-finite loss or gradients in {n_bad} of {steps} timed steps: no time reported"
    return row


def check_setting(setting: BenchSetting) -> None:
    """ValueError (one line) for a setting that cannot run; called for every setting before any runs."""
    if setting.model not in PRESETS:
        raise ValueError(f"unknown model preset {setting.model!r}; choose one of {', '.join(PRESETS)}")
    if setting.precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {setting.precision!r}; choose fp32 or bf16")
    if min(setting.batch_size, setting.steps, setting.warmup, setting.pgd_steps, setting.replays) < 1:
        raise ValueError(
            "--batch-size, --steps, --warmup (the first step compiles), --pgd-steps and --replays "
            "must be >= 1"
        )
    if setting.grad_accum < 1 or setting.batch_size % setting.grad_accum:
        raise ValueError(f"--grad-accum {setting.grad_accum} must be >= 1 and divide --batch-size "
                         f"{setting.batch_size}")  # fmt: skip
    if not 0 < setting.reg_frac <= 1:
        raise ValueError(f"--reg-frac must be in (0, 1], got {setting.reg_frac}")
    if setting.image_size is not None and setting.image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {setting.image_size}")
    from fastat.train.run import resolve_device  # ConfigError (a ValueError) for an unusable device

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


def run_bench(setting: BenchSetting, fast: bool = True, log=print, on_row=None, runs=RUNS) -> dict:
    """Time naive AT (eager, and compiled when ``fast``), fastat AT and fastat DDPM for one setting (or the
    ``runs`` named); returns a JSON-able dict. ``on_row(partial result)`` is called after each run."""
    unknown = set(runs) - set(RUNS)
    if unknown:
        raise ValueError(f"unknown run(s) {', '.join(sorted(unknown))}; choose from {', '.join(RUNS)}")
    check_setting(setting)
    from fastat.train.run import resolve_device

    device = resolve_device(setting.device)
    torch._dynamo.reset()  # every compile below is fresh and static-shaped (no dynamic-shape recompile)
    kw = {"image_size": setting.image_size} if setting.image_size else {}
    torch.manual_seed(0)
    model0 = build_model(setting.model, **kw)
    shape = (setting.batch_size, *model0.sample_shape)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1).to(device)
    t = torch.randint(0, 1000, (setting.batch_size,), device=device)
    fwd_flops = model_forward_flops(model0.to(device), x0, t)
    del model0
    bf16 = setting.precision == "bf16"

    def autocast():
        return (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if bf16
            else torch.autocast(device.type, enabled=False)
        )

    def fresh_model():
        torch.manual_seed(0)
        return build_model(setting.model, **kw).to(device).train()

    obj_at, obj_naive = _objective(setting, setting.mode), naive_objective(setting)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for (card, p), v in PEAK_FLOPS.items() if card in name and p == setting.precision), None)
    result = {
        "setting": setting.__dict__,
        "info": device_info(device),
        "fwd_gflops": fwd_flops / 1e9,
        "naive_mode": obj_naive.mode,
        "runs": {},
    }
    B = setting.batch_size
    units = {"naive": obj_naive.flop_units(B), "naive_compiled": obj_naive.flop_units(B),
             "fastat": obj_at.flop_units(B), "fastat_ddpm": 3.0}  # fmt: skip
    result["flop_floor_overhead"] = units["fastat"] / units["fastat_ddpm"]  # the AT overhead FLOPs allow

    def add(key: str, row: dict, engine: str) -> None:
        sec = row["median_ms"] / 1e3 if row["median_ms"] else None
        achieved = fwd_flops * units[key] / sec if sec else None
        row["engine"] = engine
        row["units_per_image"] = units[key]  # forward-pass equivalents per image seen
        row["gflop_per_image"] = fwd_flops / B * units[key] / 1e9
        row["img_per_s"] = setting.batch_size / sec if sec else None
        # free: every step replays its batch; a batch is new every `replays` steps
        replays = setting.replays if key == "fastat" and setting.mode == "free" else 1
        row["fresh_img_per_s"] = row["img_per_s"] / replays if sec else None
        row["tflops"] = achieved / 1e12 if sec else None
        row["mfu"] = achieved / peak if sec and peak else None
        result["runs"][key] = row
        _summarise(result)
        if on_row is not None:
            on_row(result)

    tables = obj_at.schedule.tables(device)

    def naive_run(compiled: bool) -> tuple[dict, str]:
        """(a) naive AT, eager or with torch.compile on the model (its first step compiles)."""
        m = fresh_model()
        if compiled and (why := guard_autograd_cache(setting.precision)) is not None:  # torch < 2.14
            log(why)
        net = torch.compile(m) if compiled else m
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        ema = [p.detach().clone() for p in m.parameters()]

        def naive_step():
            loss, norm = naive_at_step(net, opt, ema, x0, tables, obj_naive, 1.0, autocast)
            return torch.logical_not(torch.isfinite(loss) & torch.isfinite(norm)).float()

        row = _time_run(naive_step, device, setting.warmup, setting.steps)
        row["compile_s"] = row["first_step_s"] if compiled else None
        return row, "naive-compiled" if compiled else "naive-eager"

    def engine_run(mode: str) -> tuple[dict, str]:
        """(b), (c): fastat's engine; warm-up lasts until its graph is captured."""
        gen = torch.Generator(device=device).manual_seed(1)
        notes: list[str] = []

        def note(msg: str) -> None:
            notes.append(msg)
            log(msg)

        eng = StepEngine(fresh_model(), _objective(setting, mode), generator=gen, lr=1e-4,
                         precision=setting.precision, fast=fast, log=note,
                         grad_accum=setting.grad_accum)  # fmt: skip
        row = _time_run(lambda: eng.step(x0, 1e-4)["skipped"], device, setting.warmup, setting.steps,
                        ready=lambda: not eng.use_graph or eng.captured)  # fmt: skip
        row.update(compile_s=eng.compile_seconds, capture_s=eng.capture_seconds, notes=notes,
                   compiled_graphs=compiled_graphs(eng.objective, B) if eng.fast else 0)  # fmt: skip
        return row, eng.mode

    for key in runs:  # in the order given: a timeout keeps the first ones
        if key == "naive_compiled" and not fast:
            continue
        if key.startswith("naive"):
            row, engine = naive_run(compiled=key == "naive_compiled")
        else:
            row, engine = engine_run(setting.mode if key == "fastat" else "ddpm")
        add(key, row, engine)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def compiled_graphs(objective: ATObjective, batch_size: int) -> int:
    """Static-shape graphs the fast engine compiles in its first step (``compile_s`` holds them all): the
    model at the batch size, again at the regulariser's ``n = ceil(reg_frac * B)`` samples when ``n < B``
    (a second shape), and the attack's detached copy at ``n`` when the mode has ascent passes."""
    if objective.mode == "ddpm":
        return 1
    n = objective.reg_count(batch_size)
    return 1 + (n < batch_size) + (objective.attack_steps > 0)


def _summarise(r: dict) -> None:
    """Ratios of the median step times (None where a run is missing or has no time)."""

    def ratio(a: str, b: str):
        ra, rb = r["runs"].get(a), r["runs"].get(b)
        return (
            ra["median_ms"] / rb["median_ms"] if ra and rb and ra["median_ms"] and rb["median_ms"] else None
        )

    r["speedup_vs_naive"] = ratio("naive", "fastat")
    r["speedup_vs_naive_compiled"] = ratio("naive_compiled", "fastat")
    r["compile_speedup_naive"] = ratio("naive", "naive_compiled")
    r["at_overhead"] = ratio("fastat", "fastat_ddpm")


def _ms(v: float | None) -> str:
    """Milliseconds with 3-4 significant digits, never in exponent notation."""
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def format_result(r: dict) -> str:
    s = r["setting"]
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    k = f" k={s['pgd_steps']}" if s["mode"] == "pgd" else f" m={s['replays']}" if s["mode"] == "free" else ""
    k += f" reg_frac={s['reg_frac']}" if s["reg_frac"] != 1 else ""
    k += f" grad_accum={s['grad_accum']}" if s.get("grad_accum", 1) != 1 else ""
    card = r["info"].get("gpu", r["info"]["device"])
    lines = [
        f"{s['model']} B={s['batch_size']} {s['precision']} mode={s['mode']}{k} on {card}"
        f" (torch {r['info']['torch']}); forward {r['fwd_gflops']:.2f} GFLOP",
        f"{'run':<15}{'engine':<16}{'ms/step':>9}{'p20-p80':>16}{'img/s':>9}{'units/img':>10}{'GFLOP/img':>10}"
        f"{'TFLOP/s':>9}{'MFU':>6}{'mem GiB':>9}{'compile s':>10}{'capture s':>10}",
    ]
    for key, run in r["runs"].items():
        spread = f"{_ms(run['p20_ms'])}-{_ms(run['p80_ms'])}" if run["median_ms"] else "-"
        mfu = f"{100 * run['mfu']:.0f}%" if run["mfu"] is not None else "-"
        mem = f(run["peak_mem_gib"], ".2f")
        lines.append(
            f"{key:<15}{run['engine']:<16}{_ms(run['median_ms']):>9} {spread:>15}"
            f"{f(run['img_per_s'], '.0f'):>9}{run['units_per_image']:>10.3g}{run['gflop_per_image']:>10.3g}"
            f"{f(run['tflops'], '.2f'):>9}{mfu:>6}{mem:>9}"
            f"{f(run['compile_s'], '.1f'):>10}{f(run['capture_s'], '.2f'):>10}"
        )
        if run["error"]:
            lines.append(f"  {key}: {run['error']}")
    if s["mode"] == "free" and "fastat" in r["runs"]:
        fresh = f(r["runs"]["fastat"]["fresh_img_per_s"], ".0f")
        lines.append(f"free: units/img counts every replay as a step that sees its batch; new images: "
                     f"{fresh}/s (1 batch in {s['replays']} steps)")  # fmt: skip
    graphs = r["runs"].get("fastat", {}).get("compiled_graphs")
    if graphs and s["reg_frac"] != 1:
        lines.append(f"fastat compiled {graphs} graphs (the model at B and at ceil(reg_frac * B): two static "
                     f"shapes); its compile s counts them all")  # fmt: skip
    if s.get("grad_accum", 1) != 1:
        micro = s["batch_size"] // s["grad_accum"]
        lines.append(f"fastat rows: one step of B={s['batch_size']} in {s['grad_accum']} micro-batches of "
                     f"{micro} (ms/step and img/s per optimizer step)")  # fmt: skip
    if r.get("naive_mode") != s["mode"] or s["reg_frac"] != 1:
        lines.append(f"naive rows: the paper's {r.get('naive_mode')} on the whole batch")
    lines.append(
        f"speedup fastat/naive: {f(r.get('speedup_vs_naive'), '.2f')}x   fastat/naive+compile: "
        f"{f(r.get('speedup_vs_naive_compiled'), '.2f')}x   AT overhead fastat/ddpm: "
        f"{f(r.get('at_overhead'), '.2f')}x (FLOP floor {r['flop_floor_overhead']:.2f}x)"  # no run: "-"
    )
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    d = BenchSetting()
    ap.add_argument("--model", default=d.model, help=f"UNet preset ({', '.join(PRESETS)}; default {d.model})")
    ap.add_argument(
        "--batch-size", type=int, nargs="+", default=[d.batch_size], help="one or more batch sizes"
    )
    ap.add_argument("--image-size", type=int, default=None, help="override the preset's resolution")
    ap.add_argument("--precision", default=d.precision, choices=["fp32", "bf16"])
    ap.add_argument("--mode", nargs="+", default=[d.mode], choices=["rand", "adv", "pgd", "inv", "free"],
                    help="AT mode(s) to time against naive AT and DDPM")  # fmt: skip
    ap.add_argument("--pgd-steps", type=int, default=d.pgd_steps)
    ap.add_argument("--replays", type=int, default=d.replays, help="mode free: steps per batch")
    ap.add_argument("--reg-frac", type=float, default=d.reg_frac,
                    help="regularise this share of each batch (fastat's AT run)")  # fmt: skip
    ap.add_argument("--grad-accum", type=int, default=d.grad_accum,
                    help="fastat's step in this many micro-batches (gradient accumulation)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=d.steps, help="timed steps (median reported)")
    warm = "untimed steps first (compile; fastat's last until its graph is captured)"
    ap.add_argument("--warmup", type=int, default=d.warmup, help=warm)
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                    help="fastat runs compiled (+ CUDA graph on CUDA) beside naive+torch.compile; "
                         "--no-fast times fastat's eager step and naive eager only")  # fmt: skip
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS, help="which runs (default: all)")
    ap.add_argument("--json", help="write the results to this JSON file (rewritten after every run)")


def run_from_args(args: argparse.Namespace, log=print) -> int:
    settings = [
        BenchSetting(
            model=args.model,
            batch_size=bs,
            image_size=args.image_size,
            precision=args.precision,
            mode=mode,
            pgd_steps=args.pgd_steps,
            replays=args.replays,
            reg_frac=args.reg_frac,
            grad_accum=args.grad_accum,
            steps=args.steps,
            warmup=args.warmup,
            device=args.device,
        )  # fmt: skip
        for bs in args.batch_size
        for mode in args.mode
    ]
    for setting in settings:  # every bad value and the output path first: no result is lost at the end
        check_setting(setting)
    out = check_json_path(args.json) if args.json else None
    results: list[dict] = []

    def write(partial: dict | None = None) -> None:  # after every run: a timeout keeps what was measured
        if out is not None:
            atomic_write_text(out, json.dumps(results + ([partial] if partial is not None else []), indent=2))

    for setting in settings:
        r = run_bench(setting, fast=args.fast, log=log, on_row=write, runs=tuple(args.runs))
        results.append(r)
        write()
        print(format_result(r), flush=True)
        print(flush=True)
    return 0


def main(argv=None, prog: str = "python -m fastat.app.bench", parser_class=argparse.ArgumentParser) -> int:
    ap = parser_class(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        return run_from_args(args)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (CaptureError, RuntimeError) as e:  # the step itself failed (after any fallback)
        print(f"{prog}: error: {type(e).__name__}: {' '.join(str(e).split())[:500]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
