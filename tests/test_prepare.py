"""fastat prepare and the prepared format: decoding of every mode against direct PIL/numpy references,
shards and manifest, no-op re-runs, interrupted prepares, bad input (one line, exit 2)."""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fastat.app.cli import main
from fastat.data import DatasetError, ImageFolder, PreparedImages, decode_image, is_prepared, prepare
from fastat.data import preparation as prepare_mod

S = 12  # target size


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA from the channel count) written by hand: PIL cannot."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def white_composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + 255.0 * (1 - a)


@pytest.fixture
def mixed_dir(tmp_path):
    """Square S x S files of every kind (so conversion is checked without resampling), with the
    expected uint8 (H, W, 3) of each, plus resized ones, a corrupt file and a non-image."""
    r = np.random.default_rng(0)
    root = tmp_path / "src"
    (root / "a" / "b").mkdir(parents=True)
    want: dict[str, np.ndarray] = {}
    rgb = r.integers(0, 256, (S, S, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "00-rgb.png")
    want["00-rgb.png"] = rgb
    g = r.integers(0, 256, (S, S), dtype=np.uint8)
    Image.fromarray(g, mode="L").save(root / "a" / "01-grey.PNG")
    want["a/01-grey.PNG"] = np.repeat(g[..., None], 3, 2)
    g16 = r.integers(0, 65536, (S, S, 1), dtype=np.uint16)
    (root / "a" / "b" / "02-grey16.png").write_bytes(png16(g16))
    want["a/b/02-grey16.png"] = np.repeat(np.rint(g16 / 257.0).astype(np.uint8), 3, 2)
    rgb16 = r.integers(0, 65536, (S, S, 3), dtype=np.uint16)
    (root / "03-rgb16.png").write_bytes(png16(rgb16))
    want["03-rgb16.png"] = (rgb16 >> 8).astype(np.uint8)  # PIL keeps the high byte
    rgba = r.integers(0, 256, (S, S, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(root / "04-rgba.png")
    want["04-rgba.png"] = white_composite(rgba[..., :3], rgba[..., 3])
    la = r.integers(0, 256, (S, S, 2), dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(root / "05-la.png")
    want["05-la.png"] = white_composite(np.repeat(la[..., :1], 3, 2), la[..., 1])
    pal = r.integers(0, 256, 48, dtype=np.uint8)
    p_idx = r.integers(0, 16, (S, S), dtype=np.uint8)
    im = Image.fromarray(p_idx, mode="P")
    im.putpalette(pal.tolist())
    im.save(root / "06-palette-transparent.png", transparency=3)
    colours = pal.reshape(16, 3)[p_idx]
    want["06-palette-transparent.png"] = np.where((p_idx == 3)[..., None], 255, colours)
    im.save(root / "07-palette.gif")
    want["07-palette.gif"] = colours
    bits = r.integers(0, 2, (S, S)).astype(bool)
    Image.fromarray(bits).save(root / "08-bilevel.bmp")
    want["08-bilevel.bmp"] = np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, 2)
    f = r.random((S, S)).astype(np.float32)
    Image.fromarray(f, mode="F").save(root / "09-float.tif")
    want["09-float.tif"] = np.repeat(np.rint(f * 255.0).astype(np.uint8)[..., None], 3, 2)
    # resized: short side to S, centre crop (reference: PIL on the RGB image, independently cropped)
    big = r.integers(0, 256, (2 * S + 3, 3 * S, 3), dtype=np.uint8)
    Image.fromarray(big).save(root / "10-wide.png")
    ref = Image.fromarray(big).resize((round(3 * S * S / (2 * S + 3)), S), Image.Resampling.BICUBIC)
    left = (ref.size[0] - S) // 2
    want["10-wide.png"] = np.asarray(ref)[:, left : left + S]
    (root / "11-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "notes.txt").write_text("not an image")
    return root, want


def _check_against(ds: PreparedImages, root, want, tol_alpha: int = 1) -> None:
    names = sorted(want)
    files = [str(p.relative_to(root)) for p in prepare_mod.list_images(root) if "corrupt" not in p.name]
    assert files == names  # sorted relative paths, corrupt one skipped
    x = ds.read_range(0, len(ds))
    for i, name in enumerate(names):
        got = x[i].permute(1, 2, 0).numpy().astype(np.int64)
        exp = np.asarray(want[name], dtype=np.float64)
        err = np.abs(got - exp).max()
        tol = 0.5 + (tol_alpha if ("rgba" in name or "-la" in name) else 0)
        assert err <= tol, f"{name}: max error {err}"


def test_prepare_converts_every_mode_and_skips_corrupt(mixed_dir, tmp_path):
    root, want = mixed_dir
    notes = []
    ds = prepare(
        root, tmp_path / "out", S, workers=2, shard_bytes=3 * S * S * 4, progress=False, log=notes.append
    )
    assert len(ds) == len(want) == 11 and ds.shape == (3, S, S)
    _check_against(ds, root, want)
    g16 = sorted(want).index("a/b/02-grey16.png")
    grey16 = ds.read_range(g16, g16 + 1).float().mean().item()
    assert 60 < grey16 < 200  # not saturated to white (the bug a plain convert("RGB") has)
    m = ds.manifest
    assert m["num_skipped"] == 1 and m["skipped"][0][0] == "11-corrupt.png" and m["num_files"] == 12
    assert [s["count"] for s in m["shards"]] == [4, 4, 3] and len(m["checksum"]) == 32
    assert any("skipped 1 unreadable" in n for n in notes)
    # standard .npy shards, and the same pixels read back by index in any order
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "shard-00001.npy"), ds.read_range(4, 8).numpy())
    idx = torch.tensor([10, 0, 5, 5, 3])
    out = torch.empty(5, 3, S, S, dtype=torch.uint8)
    assert torch.equal(ds.read_into(idx, out), ds.read_range(0, 11)[idx])
    ds.verify()
    # the trainer's ImageFolder decodes through the same function (16-bit fix included)
    with pytest.warns(UserWarning, match="11-corrupt.png"):
        folder = ImageFolder(root, S)
    assert torch.equal(((folder[g16] + 1) * 127.5).round().to(torch.uint8), ds.read_range(g16, g16 + 1)[0])
    np.testing.assert_array_equal(
        decode_image(root / "a/b/02-grey16.png", S), ds.read_range(g16, g16 + 1)[0].numpy()
    )


def test_prepare_rerun_is_noop_and_mismatches_are_errors(mixed_dir, tmp_path):
    root, _ = mixed_dir
    out = tmp_path / "out"
    prepare(root, out, S, workers=1, progress=False, log=lambda m: None)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    again = prepare(root, out, S, workers=1, progress=False, log=lambda m: None)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp and len(again) == 11
    with pytest.raises(DatasetError, match="8 px"):
        prepare(root, out, 8, progress=False)
    Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(root / "new.png")
    with pytest.raises(DatasetError, match="earlier state of the source"):
        prepare(root, out, S, progress=False)
    ds = prepare(root, out, S, progress=False, replace=True, log=lambda m: None)  # the trainer's cache
    assert len(ds) == 12 and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_interrupted_prepare_looks_unfinished_and_continues(mixed_dir, tmp_path, monkeypatch):
    root, _ = mixed_dir
    monkeypatch.setattr(prepare_mod, "CHUNK_FILES", 5)  # several decode tasks: the worker pool runs
    ref = prepare(root, tmp_path / "ref", S, workers=1, shard_bytes=3 * S * S * 3, progress=False,
                  log=lambda m: None).read_range(0, 11)  # fmt: skip
    out = tmp_path / "out"
    real_finish, calls = prepare_mod._ShardWriter.finish, []

    def finish_then_die(self):
        calls.append(self.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_finish(self)

    monkeypatch.setattr(prepare_mod._ShardWriter, "finish", finish_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(root, out, S, workers=2, shard_bytes=3 * S * S * 3, progress=False)
    assert not out.exists() and not is_prepared(out)
    partial = tmp_path / ".out.partial"
    assert (partial / "progress.json").is_file() and not (partial / "manifest.json").exists()
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        PreparedImages.open(partial)
    monkeypatch.setattr(prepare_mod._ShardWriter, "finish", real_finish)
    notes: list[str] = []
    ds = prepare(root, out, S, workers=2, shard_bytes=3 * S * S * 3, progress=False, log=notes.append)
    assert any("continuing an interrupted prepare after 6 images (2 shards done)" in n for n in notes)
    assert torch.equal(ds.read_range(0, 11), ref) and not partial.exists()
    assert ds.manifest["num_skipped"] == 1


def test_prepare_cifar10_layout(tmp_path, monkeypatch):
    from fastat.data import images as images_mod

    imgs = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (7, 3, 32, 32), dtype=np.uint8))
    monkeypatch.setattr(
        images_mod, "cifar10", lambda *a, **k: images_mod.TensorImages(imgs, source="cifar10:x")
    )
    ds = prepare("cifar10", tmp_path / "c32", 32, progress=False)
    assert torch.equal(ds.read_range(0, 7), imgs) and ds.source == "cifar10:x"
    small = prepare("cifar10", tmp_path / "c16", 16, progress=False)
    ref = Image.fromarray(imgs[3].permute(1, 2, 0).numpy()).resize((16, 16), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(small.read_range(3, 4)[0].permute(1, 2, 0).numpy(), np.asarray(ref))


def _cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_exit2(code, err, needle):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fastat: error:") and needle in lines[0], err


def test_prepare_cli_and_bad_input(mixed_dir, tmp_path, capsys):
    root, _ = mixed_dir
    out = tmp_path / "out"
    code, stdout, err = _cli(capsys, "prepare", str(root), "--image-size", str(S), "--out", str(out),
                             "--no-progress", "--verify", "--workers", "2")  # fmt: skip
    assert (
        code == 0 and "11 images 3x12x12" in stdout and "skipped 1 of 12" in stdout and "verified" in stdout
    )
    assert "11-corrupt.png" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    cases = [
        (
            ("prepare", str(tmp_path / "missing"), "--image-size", "8", "--out", str(tmp_path / "o1")),
            "does not exist",
        ),
        (
            ("prepare", str(tmp_path / "empty"), "--image-size", "8", "--out", str(tmp_path / "o2")),
            "no image files",
        ),
        (
            ("prepare", str(root / "00-rgb.png"), "--image-size", "8", "--out", str(tmp_path / "o3")),
            "is a file",
        ),
        (("prepare", str(root), "--image-size", "0", "--out", str(tmp_path / "o4")), "--image-size"),
        (("prepare", str(root), "--image-size", "8", "--out", str(tmp_path / "junk")), "not a prepared set"),
        (("prepare", str(root), "--image-size", "8", "--out", str(out)), "12 px images, not 8 px"),
        (("bench", "data", str(tmp_path / "junk")), "not a prepared dataset"),
    ]
    for args, needle in cases:
        _one_line_exit2(*_cli(capsys, *args)[::2], needle)
    # a truncated shard: one line naming it, from every reader
    shard = out / "shard-00000.npy"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 5)
    _one_line_exit2(*_cli(capsys, "bench", "data", str(out), "--seconds", "0.1")[::2], "is truncated")
    with pytest.raises(DatasetError, match="shard-00000.npy is truncated"):
        PreparedImages.open(out)
    m = json.loads((out / "manifest.json").read_text())
    m["shape"] = [3, 5, 5]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="inconsistent|holds"):
        PreparedImages.open(out)
    with pytest.raises(DatasetError, match="not 16x16"):
        PreparedImages.open(_fresh(root, tmp_path), 16)


def _fresh(root, tmp_path):
    return prepare(root, tmp_path / "fresh", S, workers=1, progress=False, log=lambda m: None).root


def test_prepare_lock_refuses_second_writer(mixed_dir, tmp_path):
    import fcntl

    root, _ = mixed_dir
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    with open(partial / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DatasetError, match="another fastat prepare"):
            prepare(root, tmp_path / "out", S, progress=False)
    assert os.path.isdir(partial)


# -- damaged sets: found when opened for training, repaired by prepare ------------------------------------


def _flip(f, at: int = -3) -> None:
    data = bytearray(f.read_bytes())
    data[at] ^= 0xFF
    f.write_bytes(bytes(data))


def _manifest(out, **change):
    m = json.loads((out / "manifest.json").read_text())
    m.update(change)
    (out / "manifest.json").write_text(json.dumps(m))
    return m


def _lower_counts(out):
    """Drop the last image, consistently: the last shard's header, its bytes, digest and the checksums."""
    from fastat.data.prepared import npy_header, set_checksum

    m = json.loads((out / "manifest.json").read_text())
    last = m["shards"][-1]
    f = out / last["file"]
    row = int(np.prod(m["shape"]))
    pixels = f.read_bytes()[128 : 128 + (last["count"] - 1) * row]
    f.write_bytes(npy_header((last["count"] - 1, *m["shape"])) + pixels)
    import hashlib

    last["count"] -= 1
    last["blake2b"] = hashlib.blake2b(pixels, digest_size=16).hexdigest()
    m["count"] -= 1
    m["checksum"] = set_checksum(tuple(m["shape"]), [s["blake2b"] for s in m["shards"]])
    (out / "manifest.json").write_text(json.dumps(m))


DAMAGE = {
    "flipped pixel byte": (lambda out: _flip(out / "shard-00001.npy"), "shard-00001.npy does not match"),
    "edited manifest checksum": (lambda out: _manifest(out, checksum="0" * 32), "checksum does not match"),
    "edited shard digest": (
        lambda out: _manifest(out, shards=[{**s, "blake2b": "1" * 32} for s in _manifest(out)["shards"]]),
        "checksum does not match",
    ),
    "consistently lowered counts": (_lower_counts, "counts 10 images, but 12 files of which 1 were skipped"),
    "padded shard": (
        lambda out: open(out / "shard-00000.npy", "ab").write(b"\0" * 7),
        "longer than its images",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_set_is_refused_for_training_and_prepare_repairs_it(case, mixed_dir, tmp_path, capsys):
    root, _ = mixed_dir
    out = tmp_path / "out"
    ref = prepare(root, out, S, workers=1, shard_bytes=3 * S * S * 4, progress=False, log=lambda m: None)
    pixels = ref.read_range(0, 11)
    damage, needle = DAMAGE[case]
    damage(out)
    with pytest.raises(DatasetError, match=needle):
        PreparedImages.open(out)
    code, _, err = _cli(capsys, "train", "--dataset", str(out), "--steps", "1", "--batch-size", "4",
                        "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu")  # fmt: skip
    _one_line_exit2(code, err, needle)
    assert f"repair it with: fastat prepare {root.resolve()} --out {out} --image-size {S}" in err
    assert not (tmp_path / "run").exists()
    # the command it names repairs the set: prepared again and swapped in
    code, stdout, err = _cli(capsys, "prepare", str(root), "--image-size", str(S), "--out", str(out),
                             "--no-progress", "--verify", "--workers", "1")  # fmt: skip
    assert code == 0 and "is damaged" in err and "preparing it again" in err and "verified" in stdout, err
    ds = PreparedImages.open(out)
    assert torch.equal(ds.read_range(0, 11), pixels)


def test_a_damaged_manifest_names_the_folder_to_delete(mixed_dir, tmp_path, capsys):
    root, _ = mixed_dir
    out = _fresh(root, tmp_path)
    (out / "manifest.json").write_text('{"format": "fastat-prepared", "version": 1, "count": ')
    code, _, err = _cli(
        capsys, "prepare", str(root), "--image-size", str(S), "--out", str(out), "--no-progress"
    )
    _one_line_exit2(code, err, f"delete {out} and prepare it again")


def test_a_large_set_is_checked_by_a_sample_of_its_shards(mixed_dir, tmp_path, monkeypatch):
    """Past the budget, shards are drawn at random (here: in reverse) until the budget is spent."""
    import fastat.data.prepared as prepared

    root, _ = mixed_dir
    ds = prepare(root, tmp_path / "out", S, workers=1, shard_bytes=3 * S * S * 4, progress=False,
                 log=lambda m: None)  # fmt: skip
    shard = 4 * 3 * S * S
    assert ds.check() == ds.nbytes  # a small set: all of it
    monkeypatch.setattr(prepared.random, "shuffle", lambda order: order.reverse())
    assert ds.check(budget=shard) == 3 * S * S * 3  # the last shard only (3 images): at least one
    assert ds.check(budget=2 * shard) == 3 * S * S * 7  # the last two
    _flip(tmp_path / "out" / "shard-00000.npy")
    ds.check(budget=2 * shard)  # not drawn this time
    with pytest.raises(DatasetError, match="shard-00000.npy does not match"):
        ds.check(budget=3 * shard)
