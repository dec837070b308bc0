"""Class labels of real image sets: an image folder's first-level sub-folders and CIFAR-10's labels, kept
in the prepared set (``labels.npy``, checked when opened), carried through skipped files, an interrupted
prepare and ``max_items``, handed to the step with each batch (both placements), and the errors of
``--class-cond`` on data without usable labels (one line, exit 2)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from fastat.app.cli import main
from fastat.data import DatasetError, Labelled, PreparedImages, build_dataset, image_loader, prepare
from fastat.data import preparation as prepare_mod
from fastat.data.preparation import folder_labels, list_images


def color_folder(root, n=9, loose=0):
    """Class ``cat`` red, ``dog`` blue (some in a nested folder), an unreadable file among the cats,
    and ``loose`` images directly in ``root``."""
    rng = np.random.default_rng(0)
    for cls, ch in (("cat", 0), ("dog", 2)):
        for i in range(n):
            a = rng.integers(0, 60, (10, 12, 3), dtype=np.uint8)
            a[..., ch] = 190 + rng.integers(0, 60)
            folder = root / cls / ("deep" if cls == "dog" and i % 3 == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(folder / f"{i:02d}.png")
    (root / "cat" / "00b.png").write_bytes(b"not an image")  # sorts among the first cats: skipped
    for i in range(loose):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / f"loose{i}.png")
    return root


def colour_labels(images: torch.Tensor) -> torch.Tensor:
    """0 where red dominates, 1 where blue does: the label the folder gave each image."""
    x = images.float()
    return (x[:, 2].mean((1, 2)) > x[:, 0].mean((1, 2))).long()


def test_folder_labels_are_first_level_sub_folders_sorted(tmp_path):
    root = color_folder(tmp_path / "src", n=3, loose=2)
    classes, labels = folder_labels(root, list_images(root))
    assert classes == ["cat", "dog"]
    names = [p.relative_to(root).as_posix() for p in list_images(root)]
    want = [-1 if "/" not in n else 0 if n.startswith("cat/") else 1 for n in names]
    assert labels.tolist() == want and labels.dtype == np.int32 and -1 in want


def test_prepared_labels_follow_the_images_past_skipped_files_and_an_interrupt(tmp_path, monkeypatch):
    root = color_folder(tmp_path / "src")
    monkeypatch.setattr(prepare_mod, "CHUNK_FILES", 4)
    real_finish, calls = prepare_mod._ShardWriter.finish, []

    def finish_then_die(self):
        calls.append(self.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_finish(self)

    row = 3 * 8 * 8
    monkeypatch.setattr(prepare_mod._ShardWriter, "finish", finish_then_die)
    link = tmp_path / "link"
    link.symlink_to(root)  # the interrupted prepare named the folder by a symlink, the resume by its path
    with pytest.raises(KeyboardInterrupt):
        prepare(link, tmp_path / "out", 8, workers=2, shard_bytes=5 * row, progress=False, log=lambda m: None)
    state = json.loads((tmp_path / ".out.partial" / "progress.json").read_text())
    assert [rel for rel, _ in state["skipped"]] == ["cat/00b.png"]  # the resume starts with it skipped
    monkeypatch.setattr(prepare_mod._ShardWriter, "finish", real_finish)
    notes: list[str] = []
    ds = prepare(root, tmp_path / "out", 8, workers=2, shard_bytes=5 * row, progress=False, log=notes.append)
    assert any("continuing an interrupted prepare" in n for n in notes)
    assert ds.manifest["num_skipped"] == 1 and len(ds) == 18
    assert ds.classes == ("cat", "dog") and ds.manifest["classes"] == ["cat", "dog"]
    assert ds.labels.dtype == torch.int64
    assert torch.equal(ds.labels, colour_labels(ds.read_range(0, len(ds))))
    assert torch.equal(ds.head(7).labels, ds.labels[:7])
    again = PreparedImages.open(tmp_path / "out")  # read back from labels.npy, checked
    assert torch.equal(again.labels, ds.labels)


def test_damaged_labels_are_a_one_line_error(tmp_path):
    out = tmp_path / "out"
    prepare(color_folder(tmp_path / "src", n=3), out, 8, workers=1, progress=False, log=lambda m: None)
    f = out / "labels.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1  # one label changed
    f.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"labels of .* are damaged \(it does not match its checksum\)"):
        PreparedImages.open(out)
    f.unlink()
    with pytest.raises(DatasetError, match="labels of .* are damaged"):
        PreparedImages.open(out)


def test_a_flat_folder_has_no_classes_and_an_old_manifest_none_known(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i + 20, np.uint8)).save(flat / f"{i}.png")
    ds = prepare(flat, tmp_path / "out", 8, workers=1, progress=False)
    assert ds.classes == () and ds.labels is None and not (tmp_path / "out" / "labels.npy").exists()
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    del m["classes"]  # as written by a fastat that kept no labels
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(m))
    assert PreparedImages.open(tmp_path / "out").classes is None


@pytest.mark.parametrize("placement", ["device", "stream"])
def test_each_batch_carries_its_images_labels(tmp_path, placement):
    root = color_folder(tmp_path / "src")
    td = build_dataset(root, image_size=8, cache_dir=tmp_path / "cache", progress=False, log=lambda m: None,
                       max_items=15)  # fmt: skip
    assert td.num_classes == 2 and td.classes == ("cat", "dog") and len(td.labels) == 15
    loader = image_loader(td.images, 6, seed=3, device="cpu", placement=placement, flip=True, workers=2,
                          labels=td.labels)  # fmt: skip
    with loader:
        for _ in range(7):  # past an epoch (15 // 6 = 2 batches each)
            batch = loader.next_batch()
            out = loader.transform(batch)
            assert isinstance(out, Labelled) and out.y.dtype == torch.int64
            assert torch.equal(out.y, colour_labels(batch.images)) and torch.equal(out.y, td.labels[batch.index])
            assert out.x.shape == (6, 3, 8, 8)


def fake_cifar(root, monkeypatch, labels):
    from torchvision.datasets import CIFAR10

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, (fname, _) in enumerate(CIFAR10.train_list + CIFAR10.test_list):
        with open(folder / fname, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": labels[k]}, f)
    with open(folder / CIFAR10.meta["filename"], "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)  # no md5 of the real files
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)


def test_cifar10_keeps_its_labels_in_memory_and_prepared(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    labels = [rng.integers(0, 10, 4).tolist() for _ in range(6)]
    fake_cifar(tmp_path, monkeypatch, labels)
    want = torch.tensor(sum(labels[:5], []))
    td = build_dataset("cifar10", data_root=tmp_path, download=False)
    assert torch.equal(td.labels, want) and td.num_classes == 10 and td.classes[3] == "c3"
    small = build_dataset("cifar10", data_root=tmp_path, download=False, image_size=16,
                          cache_dir=tmp_path / "cache", progress=False, max_items=9)  # fmt: skip
    assert torch.equal(small.labels, want[:9]) and small.classes == td.classes


def _cli(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err


def test_class_cond_on_images_without_usable_labels_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTAT_CACHE", str(tmp_path / "cache"))
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 50 * i + 10, np.uint8)).save(flat / f"{i}.png")
    base = ["train", "--image-size", "8", "--steps", "1", "--batch-size", "2", "--class-cond"]
    code, err = _cli(capsys, *base, "--dataset", str(flat), "--out", str(tmp_path / "r1"))
    assert code == 2 and "has no class labels" in err and "class sub-folders" in err and "Traceback" not in err
    mixed = color_folder(tmp_path / "mixed", n=2, loose=1)
    code, err = _cli(capsys, *base, "--dataset", str(mixed), "--out", str(tmp_path / "r2"))
    assert code == 2 and "1 image(s)" in err and "in no class sub-folder" in err and "cat, dog" in err
    assert not (tmp_path / "cache").exists()  # both said before anything was prepared
    code, err = _cli(capsys, *base, "--dataset", "subspace", "--out", str(tmp_path / "r3"))
    assert code == 2 and "'subspace' has no class labels" in err


def test_class_cond_trains_on_an_image_folder_and_samples_a_class(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTAT_CACHE", str(tmp_path / "cache"))
    root = color_folder(tmp_path / "photos")
    run = tmp_path / "run"
    code, err = _cli(capsys, "train", "--dataset", str(root), "--image-size", "8", "--class-cond", "--steps", "3",
                     "--batch-size", "6", "--set", "model.kwargs={ch: 8, groups: 4}", "--set", "run.eval_n=0",
                     "--no-progress", "--out", str(run))  # fmt: skip
    assert code == 0, err
    assert "class labels: 2 classes (0 cat, 1 dog)" in err
    for label in ("1", "dog"):  # by index or by the sub-folder's name the run recorded
        out = tmp_path / f"dogs-{label}.npy"
        code, err = _cli(capsys, "sample", "--run", str(run), "--class", label, "--guidance", "2", "--n", "4",
                         "--steps", "2", "--out", str(out))  # fmt: skip
        assert code == 0 and np.load(out).shape == (4, 3, 8, 8), err
    assert np.array_equal(np.load(tmp_path / "dogs-1.npy"), np.load(tmp_path / "dogs-dog.npy"))
    code, err = _cli(capsys, "sample", "--run", str(run), "--class", "bird", "--out", str(tmp_path / "b.npy"))
    assert code == 2 and "--class must be 0..1, one of cat, dog or all, got 'bird'" in err


def test_a_cache_prepared_without_labels_gets_them_in_place_or_is_prepared_again(tmp_path):
    """The trainer's cache of a folder, written by a fastat that kept no labels, is labelled from the
    file list without decoding again; when its manifest does not name every skipped file, it cannot
    know which files it holds, and is prepared again (said in one line)."""
    root = color_folder(tmp_path / "src", n=3)
    kw = {"image_size": 8, "cache_dir": tmp_path / "cache", "progress": False}
    first = build_dataset(root, log=lambda m: None, **kw)
    manifest = first.images.root / "manifest.json"
    shards = sorted(first.images.root.glob("shard-*.npy"))
    stamps = [p.stat().st_mtime_ns for p in shards]

    def make_old(**change):
        m = json.loads(manifest.read_text())
        m.pop("classes", None), m.pop("labels", None)
        (first.images.root / "labels.npy").unlink(missing_ok=True)
        manifest.write_text(json.dumps({**m, **change}))

    make_old()
    notes: list[str] = []
    again = build_dataset(root, log=notes.append, **kw)
    assert notes == [] and again.classes == ("cat", "dog") and torch.equal(again.labels, first.labels)
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # not decoded again
    make_old(skipped=[])  # 1 skipped file, none named
    again = build_dataset(root, log=notes.append, **kw)
    assert any("does not name all its skipped files; preparing it again" in n for n in notes)
    assert any("preparing 7 images" in n for n in notes) and torch.equal(again.labels, first.labels)


def test_sample_class_by_name_wins_over_an_index():
    import argparse

    from fastat.app.commands import sample_labels

    class Model:
        num_classes = 3

    names = ["1", "10", "2"]  # sub-folders 1, 2, 10 sort as text

    def label(k):
        return int(sample_labels(argparse.Namespace(label=k, n=2, guidance=None), Model(), "run", names)[0])

    assert label("2") == 2 and label("10") == 1 and label("0") == 0  # "0" is no name: the index


def test_fastat_prepare_names_the_classes_it_kept(tmp_path, capsys):
    root = color_folder(tmp_path / "src", n=2)
    assert main(["prepare", str(root), "--out", str(tmp_path / "ds"), "--image-size", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4 images 3x8x8" in out and "2 classes (cat, dog); skipped 1 of 5 files" in out
