"""fastat.data: exact distances of the known sets, corruption, image loading, the resumable loader."""

from __future__ import annotations

import io
import math
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from PIL import Image

from fastat.data import (
    DATASETS,
    KNOWN,
    DatasetError,
    ImageFolder,
    TensorLoader,
    build_dataset,
    cifar10,
    corrupt,
    known_dataset,
    load_tensor,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- known distributions: exact distances ------------------------------------------------------------


def test_gmm2d_distance_exact():
    d = known_dataset("gmm2d")
    centers = d.centers.float()
    assert centers.shape == (8, 2)
    torch.testing.assert_close(centers.norm(dim=1), torch.full((8,), 2.0))
    assert d.distance_to_support(centers).abs().max() < 1e-6
    radial = centers / centers.norm(dim=1, keepdim=True)
    offsets = torch.linspace(0.05, 0.4, 8).unsqueeze(1)
    for sign in (1, -1):
        dist = d.distance_to_support(centers + sign * offsets * radial)
        torch.testing.assert_close(dist, offsets.squeeze(1), atol=1e-6, rtol=0)
    assert d.nearest_mode(centers + 0.1).tolist() == list(range(8))
    torch.testing.assert_close(d.project(centers + 0.1 * radial), centers, atol=1e-6, rtol=0)


def test_plane3d_distance_exact():
    d = known_dataset("plane3d")
    basis, normal = d.basis.float(), d.normal.float()
    # fixed, orthonormal, not axis-aligned
    torch.testing.assert_close(d.frame.T @ d.frame, torch.eye(3, dtype=torch.float64))
    assert (normal.abs() > 0.1).all() and (basis.abs() > 0.1).all()
    c = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 0.3], [0.7, -0.99], [-1.0, -1.0]])
    on = c @ basis.T
    assert d.distance_to_support(on).abs().max() < 1e-6
    heights = torch.tensor([0.5, -0.25, 1e-3, 2.0, -1.0])
    torch.testing.assert_close(d.distance_to_support(on + heights[:, None] * normal), heights.abs())
    # beyond the square's edge: in-plane overshoot and height add by Pythagoras
    beyond = torch.tensor([[1.5, 0.2], [0.0, -1.3], [1.3, -1.4]]) @ basis.T
    height = torch.tensor([0.4, 0.0, -0.3])[:, None] * normal
    expect = torch.tensor([math.hypot(0.5, 0.4), 0.3, math.sqrt(0.3**2 + 0.4**2 + 0.3**2)])
    torch.testing.assert_close(d.distance_to_support(beyond + height), expect)
    torch.testing.assert_close(
        d.project(beyond + height), torch.tensor([[1.0, 0.2], [0.0, -1.0], [1.0, -1.0]]) @ basis.T
    )


def test_subspace_distance_exact():
    d = known_dataset("subspace")
    assert d.sample_shape == (3, 8, 8) and d.k == 8 and d.kind == "image"
    torch.testing.assert_close(d.basis.T @ d.basis, torch.eye(8, dtype=torch.float64))
    x = d.sample(64, gen(1))
    assert d.distance_to_support(x).max() < 1e-6
    # a unit direction orthogonal to the subspace
    v = torch.randn(d.dim, generator=gen(2), dtype=torch.float64)
    v = v - d.basis @ (d.basis.T @ v)
    v = (v / v.norm()).float().reshape(1, *d.sample_shape)
    deltas = torch.linspace(0.1, 5.0, 64)
    dist = d.distance_to_support(x + deltas.view(-1, 1, 1, 1) * v)
    torch.testing.assert_close(dist, deltas / math.sqrt(d.dim), atol=1e-6, rtol=1e-5)
    # moving inside the subspace costs nothing; projection is idempotent
    inside = (d.basis[:, 0]).float().reshape(1, *d.sample_shape)
    assert d.distance_to_support(x + 3.0 * inside).max() < 1e-6
    y = x + torch.randn(x.shape, generator=gen(3))
    assert d.distance_to_support(d.project(y)).max() < 1e-6
    with pytest.raises(ValueError, match="expected shape"):
        d.distance_to_support(x.reshape(64, -1))


@pytest.mark.parametrize("name", KNOWN)
def test_samples_lie_on_support(name):
    d = known_dataset(name)
    x = d.sample(4000, gen(5))
    assert x.dtype == torch.float32 and x.shape == (4000, *d.sample_shape)
    dist = d.distance_to_support(x)
    assert dist.shape == (4000,) and dist.dtype == torch.float32
    if name == "gmm2d":
        # Rayleigh(std) around the nearest centre: mean std*sqrt(pi/2); all modes used about equally
        assert abs(dist.mean().item() - 0.05 * math.sqrt(math.pi / 2)) < 0.004
        assert dist.max() < 0.4
        counts = torch.bincount(d.nearest_mode(x), minlength=8)
        assert counts.min() > 400 and counts.max() < 600
    else:
        assert dist.max() < 1e-6
    if name == "plane3d":  # uniform over the whole square
        c = x.double() @ d.basis
        assert c.abs().max() <= 1 + 1e-6 and c.abs().max() > 0.99
        torch.testing.assert_close(c.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.05, rtol=0)
        torch.testing.assert_close(c.var(0), torch.full((2,), 1 / 3, dtype=torch.float64), atol=0.03, rtol=0)
    if name == "subspace":  # pixels mostly in [-1, 1], per-pixel std ~ pixel_std
        assert (x.abs() <= 1).float().mean() > 0.98
        assert abs(x.std(0).mean().item() - 0.3) < 0.03


@pytest.mark.parametrize("name", KNOWN)
def test_known_sampling_deterministic(name):
    d = known_dataset(name)
    a, b, c = d.sample(32, gen(7)), d.sample(32, gen(7)), d.sample(32, gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the fixed geometry does not depend on the sampling generator or the instance
    assert torch.equal(known_dataset(name).sample(32, gen(7)), a)


def test_known_dataset_errors_and_options():
    with pytest.raises(DatasetError, match="gmm2d, plane3d, subspace"):
        known_dataset("moons")
    big = known_dataset("subspace", channels=1, height=32, width=32, k=4)
    assert big.sample(3, gen()).shape == (3, 1, 32, 32)
    assert not torch.equal(known_dataset("subspace", basis_seed=1).basis, known_dataset("subspace").basis)
    unit = big.to_unit(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]))
    assert unit.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="points"):
        known_dataset("gmm2d").to_unit(torch.ones(2, 2))


# -- corruption -------------------------------------------------------------------------------------


def test_corrupt_fraction_sigma_and_distance():
    d = known_dataset("subspace")
    clean = d.sample(500, gen(11))
    c = corrupt(clean, p=0.9, sigma=0.2, seed=3)
    assert c.noisy_mask.sum() == 450 and not c.outlier_mask.any()
    assert c.clean is clean and torch.equal(c.data[~c.noisy_mask], clean[~c.noisy_mask])
    noise = (c.data - clean)[c.noisy_mask]
    assert abs(noise.mean().item()) < 0.002
    assert abs(noise.std().item() - 0.2) < 0.002
    # exact residual of isotropic noise: sigma * sqrt((D - k) / D) per pixel (RMS)
    dist = d.distance_to_support(c.data)
    assert abs(dist[c.noisy_mask].mean().item() - 0.2 * math.sqrt((d.dim - d.k) / d.dim)) < 0.002
    assert dist[~c.noisy_mask].max() < 1e-6


def test_corrupt_deterministic_by_seed():
    clean = known_dataset("gmm2d").sample(300, gen(1))
    a, b = corrupt(clean, 0.5, 0.1, seed=4), corrupt(clean, 0.5, 0.1, seed=4)
    c = corrupt(clean, 0.5, 0.1, seed=5)
    assert torch.equal(a.data, b.data) and torch.equal(a.noisy_mask, b.noisy_mask)
    assert not torch.equal(a.noisy_mask, c.noisy_mask)
    assert clean.shape == a.data.shape and a.data is not clean


def test_corrupt_outliers():
    d = known_dataset("subspace")
    clean = d.sample(200, gen(2))
    c = corrupt(clean, 0.5, 0.1, outliers=0.1, seed=0)
    assert c.outlier_mask.sum() == 20 and c.noisy_mask.sum() == 100
    assert not (c.outlier_mask & c.noisy_mask).any() and c.clean_mask.sum() == 80
    lo, hi = clean.amin(0), clean.amax(0)
    out = c.data[c.outlier_mask]
    assert (out >= lo - 1e-6).all() and (out <= hi + 1e-6).all()
    # junk images are far from the support, much farther than the noisy copies
    dist = d.distance_to_support(c.data)
    assert dist[c.outlier_mask].min() > 3 * dist[c.noisy_mask].max()
    g = corrupt(clean, 0.0, 0.0, outliers=0.05, outlier_kind="gaussian", outlier_scale=1.0, seed=0)
    assert abs((g.data - clean)[g.outlier_mask].std().item() - 1.0) < 0.02
    clipped = corrupt(clean, 1.0, 0.5, clip=(-1.0, 1.0), seed=0)
    assert clipped.data.abs().max() <= 1.0


def test_corrupt_nothing_and_validation():
    clean = known_dataset("plane3d").sample(10, gen())
    c = corrupt(clean, 0.0, 0.3)
    assert c.data is clean and not c.noisy_mask.any()
    for kw in ({"p": -0.1}, {"p": 1.5}, {"p": float("nan")}, {"sigma": -1.0}, {"sigma": float("inf")}):
        with pytest.raises(ValueError):
            corrupt(clean, **{"p": 0.5, "sigma": 0.1, **kw})
    with pytest.raises(ValueError, match="p \\+ outliers"):
        corrupt(clean, 0.8, 0.1, outliers=0.3)
    with pytest.raises(ValueError, match="outlier_kind"):
        corrupt(clean, 0.5, 0.1, outliers=0.1, outlier_kind="scaled")


# -- image folders ----------------------------------------------------------------------------------


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "imgs"
    (root / "nested" / "deeper").mkdir(parents=True)
    # wide image: white centre band, black sides -> a centre crop sees white only
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, 16:48] = 255
    Image.fromarray(wide).save(root / "a_wide.png")
    Image.new("RGB", (20, 50), (255, 0, 0)).save(root / "b_tall.JPG", quality=95)
    Image.new("L", (16, 16), 128).save(root / "nested" / "c_gray.bmp")
    Image.new("RGBA", (40, 40), (0, 0, 255, 255)).save(root / "nested" / "deeper" / "d.webp")
    Image.new("P", (24, 24), 3).save(root / "nested" / "e.GIF")
    (root / "broken.png").write_bytes(b"this is not an image at all")
    (root / "notes.txt").write_text("ignored")
    return root


def test_image_folder_loads_recursively(image_dir):
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\).*broken\.png"):
        ds = ImageFolder(image_dir, 16)
    names = [p.name for p in ds.paths]
    assert names == ["a_wide.png", "b_tall.JPG", "c_gray.bmp", "d.webp", "e.GIF"]
    x = load_tensor(ds)
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x[0, :, :, 2:-2].min() > 0.95  # centre crop of the wide image: the white band
    torch.testing.assert_close(x[1].mean(dim=(1, 2)), torch.tensor([1.0, -1.0, -1.0]), atol=0.03, rtol=0)
    torch.testing.assert_close(x[2], torch.full((3, 16, 16), 128 / 127.5 - 1))
    torch.testing.assert_close(x[3].mean(dim=(1, 2)), torch.tensor([-1.0, -1.0, 1.0]), atol=0.03, rtol=0)
    assert load_tensor(ds, max_items=2).shape == (2, 3, 16, 16)
    assert torch.equal(load_tensor(ds, num_workers=2), x)


def test_image_folder_truncated_file_skipped_by_load_tensor(image_dir):
    good = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)))
    (image_dir / "truncated.png").write_bytes(good[: len(good) // 2])  # header fine, pixels cut
    with pytest.warns(UserWarning):
        ds = ImageFolder(image_dir, 8)
    assert any(p.name == "truncated.png" for p in ds.paths)
    with pytest.raises(DatasetError, match="truncated.png"):
        ds[ds.paths.index(image_dir / "truncated.png")]
    with pytest.warns(UserWarning, match="skipped 1 unreadable item"):
        x = load_tensor(ds)
    assert x.shape == (5, 3, 8, 8)


def test_image_folder_missing_empty_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolder(tmp_path / "nope", 16)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="no readable images"):
        ImageFolder(tmp_path / "empty", 16)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="no readable images"):
        ImageFolder(tmp_path / "bad", 16)
    with pytest.raises(ValueError, match="image_size"):
        ImageFolder(tmp_path, 0)


# -- CIFAR-10 ---------------------------------------------------------------------------------------


def test_cifar10_absent_no_download(tmp_path):
    with pytest.raises(DatasetError) as e:
        cifar10(tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "cifar-10-python.tar.gz" in msg
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        build_dataset("cifar10", data_root=tmp_path, download=False)


def test_cifar10_download_failure(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(self):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(DatasetError, match="download failed.*Name or service"):
        cifar10(tmp_path, download=True)


def test_cifar10_conversion_from_local_copy(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = []
    for fname, _ in CIFAR10.train_list + CIFAR10.test_list:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        batches.append(data)
        with open(folder / fname, "wb") as f:
            pickle.dump({"data": data, "labels": [0, 1, 2, 3]}, f)
    with open(folder / CIFAR10.meta["filename"], "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)  # no md5 of the real files
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    ds = cifar10(tmp_path, download=False)
    x = load_tensor(ds)
    assert x.shape == (20, 3, 32, 32)
    expect = torch.from_numpy(np.concatenate(batches[:5])).reshape(20, 3, 32, 32).float() / 127.5 - 1
    torch.testing.assert_close(x, expect)
    torch.testing.assert_close(ds[3], expect[3])
    assert load_tensor(cifar10(tmp_path, download=False, image_size=16), max_items=3).shape == (3, 3, 16, 16)
    td = build_dataset("cifar10", data_root=tmp_path, download=False, max_items=8)
    assert td.kind == "image" and td.data is None and td.known is None and len(td) == 8
    assert td.images.images.dtype == torch.uint8  # held as uint8, never as a float copy
    torch.testing.assert_close(td.clean_view()[0:8], expect[:8])


# -- the loader -------------------------------------------------------------------------------------


def _images(n=37):
    return torch.randn(n, 3, 4, 5, generator=gen(9))


def test_loader_epochs_are_permutations():
    x = torch.arange(1, 24, dtype=torch.float32).reshape(23, 1)  # 23 distinct rows
    loader = TensorLoader(x, 5, generator_seed=0)
    assert len(loader) == 4
    for _ in range(3):
        seen = torch.cat(list(loader))
        assert seen.shape == (20, 1) and seen.unique().numel() == 20
    assert loader.epoch == 2
    full = TensorLoader(x, 5, generator_seed=0, drop_last=False)
    sizes = [b.shape[0] for b in full]
    assert sizes == [5, 5, 5, 5, 3] and len(full) == 5


def test_loader_deterministic_and_resume_equivalent(tmp_path):
    x = _images()
    ref = TensorLoader(x, 8, generator_seed=3, flip=True)
    stream = [ref.next_batch() for _ in range(15)]  # 4 batches/epoch: crosses three epoch boundaries
    again = TensorLoader(x, 8, generator_seed=3, flip=True)
    assert all(torch.equal(a, again.next_batch()) for a in stream)
    for cut in (0, 3, 4, 6, 11):
        a = TensorLoader(x, 8, generator_seed=3, flip=True)
        for _ in range(cut):
            a.next_batch()
        torch.save(a.state_dict(), tmp_path / "loader.pt")
        state = torch.load(tmp_path / "loader.pt", weights_only=True)
        b = TensorLoader(x, 8, generator_seed=123, flip=True)  # different seed: the state wins
        b.load_state_dict(state)
        for want in stream[cut:]:
            assert torch.equal(b.next_batch(), want)
    other = TensorLoader(x, 8, generator_seed=4, flip=True)
    assert not torch.equal(other.next_batch(), stream[0])
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(x, 4, generator_seed=0).load_state_dict(ref.state_dict())


def test_loader_flips_images_only():
    x = _images()
    plain = TensorLoader(x, 37, generator_seed=1)
    flipped = TensorLoader(x, 37, generator_seed=1, flip=True)
    a, b = plain.next_batch(), flipped.next_batch()
    same = (a == b).flatten(1).all(1)
    mirrored = (a.flip(-1) == b).flatten(1).all(1)
    assert (same | mirrored).all()  # same order; each sample either as is or mirrored
    assert 5 < mirrored.sum() < 32
    with pytest.raises(ValueError, match="flip is for images"):
        TensorLoader(torch.randn(10, 2), 4, generator_seed=0, flip=True)


def test_loader_out_buffer_and_errors():
    x = _images()
    out = torch.empty(8, 3, 4, 5)
    a = TensorLoader(x, 8, generator_seed=2, flip=True)
    b = TensorLoader(x, 8, generator_seed=2, flip=True)
    for _ in range(6):
        ptr = out.data_ptr()
        res = a.next_batch(out=out)
        assert res.data_ptr() == ptr and torch.equal(out, b.next_batch())
    with pytest.raises(ValueError, match="larger than the dataset"):
        TensorLoader(x, 38, generator_seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(x, 0, generator_seed=0)


# -- build_dataset ----------------------------------------------------------------------------------


def test_build_dataset_known_sets():
    assert DATASETS == ("gmm2d", "plane3d", "subspace", "subspaces", "scales", "cifar10")
    td = build_dataset("subspace", seed=1, n=256, noise_p=0.9, noise_sigma=0.1)
    assert td.kind == "image" and td.sample_shape == (3, 8, 8) and td.data.shape == (256, 3, 8, 8)
    assert td.noisy_mask.sum() == round(0.9 * 256) and td.known is not None
    assert td.known.distance_to_support(td.clean).max() < 1e-6
    assert torch.equal(td.data, build_dataset("subspace", seed=1, n=256, noise_p=0.9, noise_sigma=0.1).data)
    assert not torch.equal(td.clean, build_dataset("subspace", seed=2, n=256).clean)
    pts = build_dataset("plane3d", n=100, image_size=32)  # image_size: ignored by point sets
    assert pts.kind == "points" and pts.data.shape == (100, 3) and pts.data is pts.clean
    assert build_dataset("subspace", n=4, image_size=16).sample_shape == (3, 16, 16)
    assert build_dataset("gmm2d", n=4, known_kwargs={"n_modes": 3}).known.n_modes == 3


def test_build_dataset_folder_and_unknown(image_dir, tmp_path):
    notes = []
    td = build_dataset(image_dir, image_size=8, noise_p=0.4, noise_sigma=0.1, cache_dir=tmp_path / "cache",
                       progress=False, log=notes.append)  # fmt: skip
    assert td.name == "folder" and td.kind == "image" and len(td) == 5 and td.sample_shape == (3, 8, 8)
    assert td.noisy_mask.sum() == 2 and td.known is None and td.data is None
    assert any("preparing" in n for n in notes) and any("skipped 1 unreadable" in n for n in notes)
    cached = td.images.root
    assert cached.parent == tmp_path / "cache" / "prepared" and cached.name.endswith("-8px")
    kw = dict(cache_dir=tmp_path / "cache", progress=False, log=notes.append)
    again = build_dataset(image_dir, image_size=8, **kw)
    assert again.images.root == cached and len(notes) == 2  # reused: not prepared twice
    direct = build_dataset(cached, max_items=3)  # the prepared folder itself, size from its manifest
    assert len(direct) == 3 and direct.sample_shape == (3, 8, 8)
    clean, noisy = td.clean_view()[0:5], td.train_view()[0:5]
    moved = (noisy - clean).flatten(1).abs().amax(1) > 0
    assert torch.equal(moved, td.noisy_mask)  # the corruption touches exactly the noisy samples
    with pytest.raises(DatasetError, match="gmm2d, plane3d, subspace, subspaces, scales, cifar10"):
        build_dataset("imagenet")
    with pytest.raises(DatasetError, match="not a folder"):
        (tmp_path / "file.png").write_bytes(b"x")
        build_dataset(tmp_path / "file.png", image_size=8)
    with pytest.raises(ValueError, match="image_size .--image-size. is required"):
        build_dataset(image_dir)


def test_subspace_exported_to_png_folder_is_the_builtin_set(tmp_path):
    """The known subspace written as 8-bit PNGs (``save_image_folder``) and read back through the
    folder path of the trainer: the same images up to 8-bit rounding (no resampling at the same size), the
    same noisy groups, noise of the same size, and the same distance of the training data to the support."""
    from fastat.train.samples import save_image_folder

    kw = dict(image_size=8, n=256, seed=3, noise_p=0.9, noise_sigma=0.2)
    builtin = build_dataset("subspace", **kw)
    folder = save_image_folder(builtin.clean, tmp_path / "png")
    assert sorted(p.name for p in folder.iterdir())[:2] == ["000000.png", "000001.png"]
    td = build_dataset(folder, cache_dir=tmp_path / "cache", progress=False, **kw)
    clean = torch.cat(list(td.clean_view().blocks()))
    data = torch.cat(list(td.train_view().blocks()))
    assert clean.shape == builtin.clean.shape == (256, 3, 8, 8)
    err = (clean - builtin.clean.clamp(-1, 1)).abs().max().item()
    assert 0 < err <= 0.5 / 127.5 + 1e-6  # rounding to 256 levels, nothing else
    known = builtin.known
    assert known.distance_to_support(clean).mean() < 0.01  # still on the support, to quantisation
    assert torch.equal(td.noisy_mask, builtin.noisy_mask)
    noise, ref = (data - clean)[td.noisy_mask], (builtin.data - builtin.clean)[builtin.noisy_mask]
    assert noise.std().item() == pytest.approx(0.2, rel=0.03) and ref.std().item() == pytest.approx(0.2, rel=0.03)
    assert torch.equal(data[~td.noisy_mask], clean[~td.noisy_mask])
    d_folder = known.distance_to_support(data).mean().item()
    d_builtin = known.distance_to_support(builtin.data).mean().item()
    assert d_folder == pytest.approx(d_builtin, rel=0.03)
