"""The comparison's grid: settings (a known dataset and its corruption), variants, presets and sizes.

A variant is ``MODE`` or ``MODE[key=value,...]`` with keys of the ``objective`` config section, e.g.
``adv[lam=0.5,r_min=0.1]``; the variant string is its label in the table. With ``budget_units`` every
variant trains ``round(budget_units / flop_units)`` steps (an equal FLOP budget).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

__all__ = ["PRESETS", "SETTINGS", "CompareSpec", "Setting", "parse_variant", "slug", "spec_dict", "spec_with"]


@dataclass(frozen=True)
class Setting:
    """A known dataset and how its training copies are corrupted (see :func:`fastat.data.corrupt`)."""

    name: str
    dataset: str
    corrupt_frac: float = 0.9
    corrupt_sigma: float = 0.1
    outliers: float = 0.0
    outlier_kind: str = "uniform"

    @property
    def images(self) -> bool:
        """An image set (a UNet learns it), not points (an MLP)."""
        from fastat.data.known import IMAGE_SETS

        return self.dataset in IMAGE_SETS

    def describe(self) -> str:
        parts = []
        if self.corrupt_frac and self.corrupt_sigma:
            parts.append(f"{self.corrupt_frac:.0%} noisy at sigma {self.corrupt_sigma}")
        if self.outliers:
            parts.append(f"{self.outliers:.0%} {self.outlier_kind} outliers")
        return f"{self.dataset}, " + (" + ".join(parts) if parts else "clean")


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("plane3d-s0.1", "plane3d", 0.9, 0.1),
        Setting("plane3d-s0.2", "plane3d", 0.9, 0.2),
        Setting("plane3d-out", "plane3d", 0.0, 0.0, 0.1),
        Setting("plane3d-clean", "plane3d", 0.0, 0.0),
        Setting("gmm2d-s0.1", "gmm2d", 0.9, 0.1),
        Setting("gmm2d-s0.2", "gmm2d", 0.9, 0.2),
        Setting("gmm2d-out", "gmm2d", 0.0, 0.0, 0.1),
        Setting("subspace-s0.1", "subspace", 0.9, 0.1),
        Setting("subspace-s0.2", "subspace", 0.9, 0.2),
        Setting("subspaces-s0.1", "subspaces", 0.9, 0.1),
        Setting("subspaces-s0.2", "subspaces", 0.9, 0.2),
        Setting("scales-s0.1", "scales", 0.9, 0.1),
        Setting("scales-s0.2", "scales", 0.9, 0.2),
    )
}


@dataclass(frozen=True)
class CompareSpec:
    """The grid and the training/evaluation sizes. Every run of a comparison uses the same numbers."""

    settings: tuple[str, ...] = ("plane3d-s0.1", "plane3d-s0.2", "plane3d-out")
    modes: tuple[str, ...] = ("ddpm", "rand", "adv", "pgd")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 400
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 50
    ema_decay: float = 0.999
    n_train: int = 4096
    hidden: int = 128  # MLP (point sets)
    depth: int = 3
    image_size: int | None = None  # image sets (subspace): H = W (None: the dataset's own, 8)
    unet: dict = field(default_factory=dict)  # image sets: overrides of the UNet preset "tiny" (e.g. ch)
    lr_schedule: str = "constant"  # optim.schedule: constant | cosine | linear
    eval_n: int = 512
    sampler: str = "ddim"
    sample_steps: int = 50
    eta: float = 1.0
    attack: bool = True
    attack_n: int = 128
    attack_at: tuple[int, ...] = (50, 200)
    attack_radius: float = 0.1
    attack_steps: int = 5
    attack_target: str = "eps"
    objective: dict = field(default_factory=dict)  # overrides of the objective section for every run
    # equal FLOP budget: forward-pass equivalents per image slot (steps x flop_units); None: equal steps
    budget_units: float | None = None

    def run_overrides(self, setting: Setting, variant: str, seed: int, out: Path) -> dict:
        over = self._overrides(setting, variant, seed, out, self.steps)
        if self.budget_units is None:
            return over
        steps = max(1, round(self.budget_units / self.flop_units(over)))
        return self._overrides(setting, variant, seed, out, steps)

    def flop_units(self, over: dict) -> float:
        """Forward-pass equivalents per image and step of the run ``over`` describes (one replay in free)."""
        from fastat.train.config import TrainConfig

        return TrainConfig().with_overrides(over).build_objective().flop_units(self.batch_size)

    def _overrides(self, setting: Setting, variant: str, seed: int, out: Path, steps: int) -> dict:
        mode, extra = parse_variant(variant)
        over = {
            "data.dataset": setting.dataset,
            "data.n": self.n_train,
            "data.corrupt_frac": setting.corrupt_frac,
            "data.corrupt_sigma": setting.corrupt_sigma,
            "data.outliers": setting.outliers,
            "data.outlier_kind": setting.outlier_kind,
            "objective.mode": mode,
            "optim.lr": self.lr,
            "optim.warmup": self.warmup,
            "ema.decay": self.ema_decay,
            "run.steps": steps,
            "run.batch_size": self.batch_size,
            "run.seed": seed,
            "run.device": "cpu",
            "run.out": str(out),
            "run.save_every": 0,
            "run.sample_every": 0,
            "run.eval_n": 0,
            "run.log_every": max(1, steps // 4),
            "run.sample_n": 64,
            "run.sampler": self.sampler,
            "run.sample_steps": self.sample_steps,
            "run.tensorboard": False,
            "run.keep": 1,
        }
        if setting.images:
            over.update({"model.name": "tiny", "model.kwargs": dict(self.unet)})
            if self.image_size is not None:
                over["data.image_size"] = self.image_size
        else:
            over.update({"model.name": "mlp", "model.kwargs": {"hidden": self.hidden, "depth": self.depth}})
        over["optim.schedule"] = self.lr_schedule
        over.update({f"objective.{k}": v for k, v in self.objective.items()})
        over.update({f"objective.{k}": v for k, v in extra.items()})
        return over


PRESETS: dict[str, CompareSpec] = {
    "default": CompareSpec(),
    "quick": CompareSpec(
        settings=("plane3d-s0.2",),
        modes=("ddpm", "adv"),
        seeds=(0, 1),
        steps=60,
        batch_size=128,
        warmup=10,
        n_train=1024,
        hidden=32,
        depth=2,
        eval_n=128,
        sample_steps=10,
        attack_n=32,
        attack_steps=2,
    ),
    # subspace images (3x8x8, an 8-dim support) with the tiny UNet: the recipe of the quickstart
    "images": CompareSpec(
        settings=("subspace-s0.1", "subspace-s0.2"),
        steps=1000,
        batch_size=32,
        lr=1e-3,
        warmup=20,
        lr_schedule="cosine",
        ema_decay=0.9999,
        image_size=8,
        eval_n=256,
        attack_n=64,
    ),
}
# the multimodal image sets (clusters of images; clusters that differ in scale), the images recipe
PRESETS["multimodal"] = replace(
    PRESETS["images"], settings=("subspaces-s0.1", "subspaces-s0.2", "scales-s0.1", "scales-s0.2")
)

_VARIANT = re.compile(r"^([a-z]+)(?:\[(.*)\])?$")


def parse_variant(variant: str) -> tuple[str, dict]:
    """``"adv[lam=0.5,r_min=0.1]"`` -> ``("adv", {"lam": 0.5, "r_min": 0.1})`` (values parsed as YAML)."""
    import yaml

    m = _VARIANT.match(variant.strip())
    if not m:
        raise ValueError(f"bad variant {variant!r}: expected MODE or MODE[key=value,...]")
    mode, body = m.group(1), m.group(2)
    extra = {}
    for item in filter(None, (body or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad variant {variant!r}: {item!r} is not key=value")
        extra[key.strip()] = yaml.safe_load(value.strip())
    return mode, extra


def unet_desc(spec: CompareSpec) -> str:
    size = spec.image_size or 8
    kw = ", ".join(f"{k}={v}" for k, v in sorted(spec.unet.items()))
    return f"{size}x{size}" + (f" ({kw})" if kw else "")


def length_desc(spec: CompareSpec) -> str:
    if spec.budget_units is None:
        return f"{spec.steps} steps"
    return (f"an equal FLOP budget of {spec.budget_units:g} forward-pass equivalents per image slot "
            f"(steps x units/img)")  # fmt: skip


def slug(variant: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", variant).strip("_")


def spec_dict(spec: CompareSpec) -> dict:
    d = asdict(spec)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def spec_with(base: CompareSpec, **changes) -> CompareSpec:
    """``base`` with the non-None ``changes`` applied (tuples for the list fields)."""
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in changes.items() if v is not None}
    return replace(base, **kw)
