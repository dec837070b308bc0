"""The report of an image run that has no known distribution (a folder, CIFAR-10, a prepared set).

For the samples and for the training images, the same measures side by side: the noise level
(:mod:`fastat.eval.noise`; ``data_sigma_*``: the first ``n`` training images as trained on); memorisation
(:mod:`fastat.eval.memorization`) against the training set, beside the training set's own value
(``ref_*``: its last ``min(n, N/5)`` images against the rest, what images that were not copied score);
with ``FIDSpec.ref`` (held-out clean images) their noise level and FID/KID against them (``data_fid``,
``data_kid``: the training images'), or a one-line ``fid_note`` saying why FID/KID were skipped.
"""

from __future__ import annotations

import torch

from fastat.eval.draws import MeasureSpec, draw_samples, run_attack
from fastat.eval.fid import FIDSpec, FIDUnavailable
from fastat.eval.memorization import memorization
from fastat.eval.noise import noise_summary

__all__ = ["held_out_split", "image_metrics", "ref_metrics"]


class _Rows:
    """Rows ``[start, stop)`` of a tensor or a :class:`fastat.data.FloatView`, sliceable like one."""

    def __init__(self, x, start: int, stop: int) -> None:
        self.x, self.start, self.stop = x, start, stop
        self.shape = (stop - start, *tuple(x.shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item: slice) -> torch.Tensor:
        a, b, _ = item.indices(len(self))
        return self.x[self.start + a : self.start + max(a, b)]


def held_out_split(train, n: int):
    """``(rest, held_out)`` of the training set ``train`` (``N`` rows): the last ``min(n, N // 5)`` rows are
    held out; ``held_out`` is None for fewer than 10 images."""
    total = int(train.shape[0])
    h = min(n, total // 5)
    if total < 10 or h < 2:
        return train, None
    return _Rows(train, 0, total - h), train[total - h : total]


def image_metrics(
    model, schedule, td, spec: MeasureSpec, fid: FIDSpec | None, *, device, spread=None, progress=False
) -> dict:
    """The report's metrics of an image run without a known distribution (module docstring); ``{}`` on
    ranks other than 0 of a torchrun job."""
    shape = tuple(td.sample_shape)
    x = draw_samples(model, schedule, shape, spec, device, spread, progress)
    if x is None:  # another rank measures
        return {}
    train = td.train_view()
    m = min(spec.n, len(td))
    out: dict = {"n": spec.n}
    out.update(noise_summary(x, "sigma"))
    out.update(noise_summary(train[0:m], "data_sigma"))
    out.update(memorization(x, train, device=device))
    rest, held = held_out_split(train, spec.n)
    if held is not None:
        ref = memorization(held, rest, device=device)
        out.update({f"ref_{k}": v for k, v in ref.items() if k != "near_copy_threshold"})
    if fid is not None and fid.ref is not None:
        out.update(ref_metrics(x, train[0:m], fid, shape, seed=spec.seed, device=device))
    extractor = ref_stats = None
    if fid is not None and fid.train:
        from fastat.eval.fid import InceptionFeatures, fid_is, reference_stats

        extractor = InceptionFeatures(fid.weights, device=device)
        key = f"{td.name}-{'x'.join(map(str, shape))}-n{len(td)}-clean"
        ref_stats = reference_stats(key, td.clean_view, extractor, cache_dir=fid.cache, n=len(td))
        out.update(fid_is(x, ref_stats, extractor))
    if spec.attack is not None:
        res = run_attack(model, schedule, shape, spec, device)
        out.update(res.summary())
        if extractor is not None:
            for name, xs in (("none", res.clean), ("pgd", res.attacked)):
                scores = fid_is(xs, ref_stats, extractor)
                out.update({f"attack_{name}_{k}": scores[k] for k in ("fid", "is")})
    return out


def ref_metrics(x: torch.Tensor, train: torch.Tensor, fid: FIDSpec, shape, *, seed: int, device) -> dict:
    """Against the clean images in the folder ``fid.ref`` (read at the run's size and channels): their own
    noise level (``ref_sigma_*``), and FID and KID of the samples ``x`` and of the training images
    ``train``; ``fid_note`` says why FID/KID were skipped when the Inception network is not available."""
    from fastat.data.images import ImageFolder, load_tensor
    from fastat.eval.fid import FeatureStats, InceptionFeatures, fid_from_stats, kid

    ref = load_tensor(ImageFolder(fid.ref, int(shape[-1])))
    if shape[0] == 1:
        ref = ref.mean(dim=1, keepdim=True)
    out: dict = {"ref_images": int(ref.shape[0]), **noise_summary(ref, "ref_sigma")}
    try:
        extractor = InceptionFeatures(fid.weights, device=device)
    except FIDUnavailable as e:
        return {**out, "fid_note": f"FID/KID skipped: {e}"}
    ref_feats = extractor(ref)
    ref_stats = FeatureStats.from_features(ref_feats)
    for prefix, images in (("", x), ("data_", train)):
        feats = extractor(images)
        out[f"{prefix}fid"] = fid_from_stats(FeatureStats.from_features(feats), ref_stats)
        out[f"{prefix}kid"], out[f"{prefix}kid_std"] = kid(feats, ref_feats, seed=seed)
    return out
