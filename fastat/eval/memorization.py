"""Memorisation: how close generated samples come to individual training samples.

    rep = memorization(samples, train_data)                   # dict of floats
    sim, idx = nearest_neighbors(samples, train_data)         # per sample: best similarity, its index

Similarity is the cosine similarity of flattened samples *centred* on the training mean; a sample is a
**near-copy** when its nearest training sample is at least ``threshold`` (default 0.95) alike. The L2
distance to the neighbour is reported too (RMS per element). Read it beside a baseline
(``reference``: held-out samples of the data distribution). Blocks of ``batch`` rows on ``device``: an
N x M similarity matrix is never held at once, and ``train`` may be a sliceable float view (e.g.
:class:`fastat.data.FloatView`), never converted whole. More: docs/DESIGN.md, "Evaluation".
"""

from __future__ import annotations

import torch

__all__ = ["NEAR_COPY_THRESHOLD", "memorization", "nearest_neighbors"]

NEAR_COPY_THRESHOLD = 0.95


def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty floating tensor of shape (N, ...)")
    return x.detach().reshape(x.shape[0], -1)


class _Rows:
    """``train`` as flat float rows, read ``batch`` at a time: a tensor, or a sliceable float view."""

    def __init__(self, x, name: str) -> None:
        if isinstance(x, torch.Tensor):
            self.x = _flat(x, name)
        elif hasattr(x, "shape") and hasattr(x, "__getitem__") and len(x.shape) >= 2 and x.shape[0] >= 1:
            self.x = x
        else:
            raise ValueError(f"{name} must be a non-empty floating tensor of shape (N, ...)")
        self.n, self.dim = int(x.shape[0]), int(torch.Size(x.shape[1:]).numel())

    def block(self, start: int, stop: int) -> torch.Tensor:
        return self.x[start:stop].reshape(-1, self.dim)

    def mean(self, batch: int) -> torch.Tensor:
        total = torch.zeros(self.dim, dtype=torch.float64)
        for i in range(0, self.n, batch):
            total += self.block(i, i + batch).double().sum(0).cpu()
        return total / self.n


def nearest_neighbors(
    samples: torch.Tensor,
    train: torch.Tensor,
    *,
    metric: str = "cosine",
    center: torch.Tensor | None = None,
    batch: int = 1024,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, the nearest training sample: ``(value (N,), index (N,))`` on the CPU.

    ``metric="cosine"``: the largest cosine similarity after subtracting ``center`` (default: the
    training mean); ``metric="l2"``: the smallest Euclidean distance (RMS per element). float32 blocks of
    ``batch`` x ``batch`` on ``device`` (default: ``samples``' device).
    """
    if metric not in ("cosine", "l2"):
        raise ValueError(f"unknown metric {metric!r}; choose cosine or l2")
    xs, xt = _flat(samples, "samples"), _Rows(train, "train")
    if xs.shape[1] != xt.dim:
        raise ValueError(
            f"samples {tuple(samples.shape[1:])} and train {tuple(train.shape[1:])} differ in shape"
        )
    dev = torch.device(device) if device is not None else xs.device
    dim = xs.shape[1]
    if metric == "cosine":
        c = (xt.mean(batch) if center is None else center.detach().reshape(-1).double()).to(dev)
    best_v, best_i = [], []
    for s0 in range(0, xs.shape[0], batch):
        a = xs[s0 : s0 + batch].to(dev, torch.float32)
        if metric == "cosine":
            a = torch.nn.functional.normalize((a.double() - c).float(), dim=1)
        v = torch.full((a.shape[0],), -float("inf") if metric == "cosine" else float("inf"), device=dev)
        idx = torch.zeros(a.shape[0], dtype=torch.long, device=dev)
        for t0 in range(0, xt.n, batch):
            b = xt.block(t0, t0 + batch).to(dev, torch.float32)
            if metric == "cosine":
                b = torch.nn.functional.normalize((b.double() - c).float(), dim=1)
                m, j = (a @ b.T).max(dim=1)
                better = m > v
            else:
                m, j = torch.cdist(a, b).min(dim=1)
                better = m < v
            v = torch.where(better, m, v)
            idx = torch.where(better, j + t0, idx)
        if metric == "l2":
            v = v / dim**0.5
        best_v.append(v.cpu())
        best_i.append(idx.cpu())
    return torch.cat(best_v), torch.cat(best_i)


def memorization(
    samples: torch.Tensor,
    train: torch.Tensor,
    *,
    threshold: float = NEAR_COPY_THRESHOLD,
    reference: torch.Tensor | None = None,
    batch: int = 1024,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Nearest-neighbour statistics of ``samples`` against the training set ``train``:

    - ``nn_cos_mean``: mean cosine similarity (centred) to the nearest training sample;
    - ``near_copy_share``: share of samples with that similarity >= ``threshold``;
    - ``nn_l2_mean``: mean RMS-per-element distance to the nearest training sample (L2 neighbour);
    - with ``reference`` (held-out samples of the data distribution): the same three for it, prefixed
      ``ref_``: what a model that does not memorise would score.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    center = _Rows(train, "train").mean(batch)

    def stats(x: torch.Tensor) -> dict[str, float]:
        cos, _ = nearest_neighbors(x, train, metric="cosine", center=center, batch=batch, device=device)
        l2, _ = nearest_neighbors(x, train, metric="l2", batch=batch, device=device)
        return {
            "nn_cos_mean": cos.double().mean().item(),
            "near_copy_share": (cos >= threshold - 1e-6).double().mean().item(),
            "nn_l2_mean": l2.double().mean().item(),
        }

    out = stats(samples)
    if reference is not None:
        out.update({f"ref_{k}": v for k, v in stats(reference).items()})
    out["near_copy_threshold"] = float(threshold)
    return out
