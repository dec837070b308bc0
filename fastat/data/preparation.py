"""``fastat prepare``: decode an image folder (or CIFAR-10) once into a prepared uint8 dataset.

    ds = prepare("~/data/celeba/img_align_celeba", "data/celeba64", 64)   # -> PreparedImages
    ds = prepare("cifar10", "data/cifar10-32", 32, data_root="data")

Images are decoded by :func:`fastat.data.decode.decode_image` (every mode and bit depth converted by
meaning, short side resized, centre crop) in worker processes over all cores, in file order (sorted
relative paths), and written to ``.npy`` shards of about ``shard_bytes`` (format:
:mod:`fastat.data.prepared`). Unreadable files are skipped, counted and named in the manifest. Each
image keeps its class label (:func:`folder_labels`: its first-level sub-folder; CIFAR-10's label).

Safety: everything is written to a sibling folder ``.NAME.partial`` (locked while a prepare runs) and
renamed to ``NAME`` only after the manifest is written, so an interrupted prepare leaves nothing that
looks finished; re-running the same command continues from the last complete shard. Re-running on a
finished output is a no-op; an output prepared from other files or at another size is an error (or,
with ``replace=True``, prepared again and swapped in when done).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fastat import __version__
from fastat.utils.errors import one_line

from . import prep_lock
from ._errors import DatasetError
from .decode import IMAGE_EXTENSIONS, READ_ERRORS, decode_image
from .prepared import (
    FORMAT,
    MANIFEST,
    VERSION,
    PreparedImages,
    npy_header,
    read_manifest,
    set_checksum,
    write_labels,
)

__all__ = ["DEFAULT_SHARD_BYTES", "folder_labels", "list_images", "prepare", "source_digest"]

DEFAULT_SHARD_BYTES = 1 << 30
CHUNK_FILES = 256  # files per decode task (fewer for large images: about 16 MiB of pixels per task)
SKIPPED_LISTED = 1000  # skipped files named in the manifest (all are counted)


# -- sources -------------------------------------------------------------------------------------------


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive; extensions :data:`IMAGE_EXTENSIONS`, any case), sorted."""
    exts = set(IMAGE_EXTENSIONS)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file())


def folder_labels(root: Path, paths: list[Path]) -> tuple[list[str], np.ndarray]:
    """``(classes, labels)`` of the images ``paths`` under ``root``: the classes are the first-level
    sub-folders holding images (sorted names, as torchvision's ``ImageFolder``), an image's label the
    index of the one it lies in (at any depth), -1 for an image directly in ``root``."""
    first = [p.relative_to(root).parts for p in paths]
    classes = sorted({parts[0] for parts in first if len(parts) > 1})
    index = {name: i for i, name in enumerate(classes)}
    return classes, np.array([index[parts[0]] if len(parts) > 1 else -1 for parts in first], np.int32)


def source_digest(root: Path, paths: list[Path]) -> str:
    """blake2b of each file's relative path, size and modification time: changes when the folder does."""
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _decode_files(paths: list[str], root: str, size: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Worker task: decode ``paths``; the images that read, and ``(relative path, reason)`` of the rest."""
    out, bad = [], []
    for p in paths:
        try:
            out.append(decode_image(p, size))
        except READ_ERRORS as e:
            bad.append((os.path.relpath(p, root), f"{type(e).__name__}: {str(e)[:120]}"))
    arr = np.stack(out) if out else np.empty((0, 3, size, size), np.uint8)
    return arr, bad


def _resize_arrays(images: np.ndarray, size: int) -> tuple[np.ndarray, list]:
    """Worker task for in-memory uint8 ``(k, C, h, w)`` images (CIFAR-10): the same resize and crop."""
    from PIL import Image

    from .decode import resize_crop, to_rgb

    out = [resize_crop(to_rgb(Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)))), size)
           for a in images]
    return np.ascontiguousarray(np.stack(out)), []


class _Source:
    """What to decode: ``n`` items, a description, a digest that changes with the input, and a task
    factory ``task(start, stop) -> (fn, args)`` run in the worker processes."""

    def __init__(self, src: str | os.PathLike, size: int, data_root, download: bool) -> None:
        self.size = size
        if os.fspath(src) == "cifar10":
            from .images import cifar10

            ds = cifar10(data_root, train=True, download=download)
            self.images = ds.images.numpy()
            self.n, self.describe = len(self.images), ds.source
            self.digest = f"cifar10-train-{self.n}"
            self.paths, self.root = None, None
            known = ds.labels is not None
            self.classes = list(ds.classes or ()) if known else []
            self.labels = ds.labels.numpy().astype(np.int32) if known else np.full(self.n, -1, np.int32)
            return
        root = Path(src).expanduser()
        if not root.exists():
            raise DatasetError(f"image folder {root} does not exist")
        if not root.is_dir():
            raise DatasetError(f"{root} is a file, not a folder of images (or cifar10)")
        paths = list_images(root)
        if not paths:
            raise DatasetError(
                f"no readable images in {root}: no image files (searched recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)})"
            )
        self.images, self.root = None, root.resolve()
        self.listed = str(root)  # skipped files are named relative to the folder as listed (any spelling)
        self.paths = [str(p) for p in paths]
        self.n, self.describe = len(paths), f"folder:{self.root}"
        self.digest = source_digest(root, paths)
        self.classes, self.labels = folder_labels(root, paths)

    def kept_labels(self, skipped: list) -> np.ndarray:
        """The labels of the images that were read (``skipped``: ``(relative path, why)`` of the rest)."""
        if not skipped:
            return self.labels
        bad = {rel for rel, _ in skipped}  # relative the way the decode workers write them
        keep = [os.path.relpath(p, self.listed) not in bad for p in self.paths]
        return self.labels[np.array(keep, dtype=bool)]

    def task(self, start: int, stop: int) -> tuple[Callable, tuple]:
        if self.paths is None:
            return _resize_arrays, (self.images[start:stop], self.size)
        return _decode_files, (self.paths[start:stop], self.listed, self.size)


# -- the shard writer ------------------------------------------------------------------------------------


class _ShardWriter:
    """Appends images to ``shard-NNNNN.npy.partial`` (hashing as it goes); ``finish()`` writes the final
    header, syncs and renames it to ``shard-NNNNN.npy``."""

    def __init__(self, folder: Path, index: int, capacity: int, shape: tuple[int, ...]) -> None:
        self.name = f"shard-{index:05d}.npy"
        self.path, self.shape, self.count = folder / (self.name + ".partial"), shape, 0
        self.f = open(self.path, "wb")
        self.f.write(npy_header((capacity, *shape)))
        self.h = hashlib.blake2b(digest_size=16)

    def write(self, rows: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(rows)).cast("B")
        self.f.write(data)
        self.h.update(data)
        self.count += len(rows)

    def finish(self) -> dict:
        self.f.seek(0)
        self.f.write(npy_header((self.count, *self.shape)))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.path, self.path.with_name(self.name))
        return {"file": self.name, "count": self.count, "blake2b": self.h.hexdigest()}


# -- prepare -------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # this process's own: renamed whole
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_existing(out: Path, params: dict) -> bool:
    """True when ``out`` already holds exactly this prepared set; DatasetError when it holds something
    else; False when it is absent or an empty folder."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise DatasetError(f"--out {out} is a file, not a folder")
    if (out / MANIFEST).is_file():
        try:
            m = read_manifest(out)
        except DatasetError as e:
            raise DatasetError(f"{one_line(e)}; delete {out} and prepare it again") from None
        same = all(m.get(k) == v for k, v in params.items())
        if same:
            return True
        if m.get("image_size") != params["image_size"]:
            why = f"{m.get('image_size')} px images, not {params['image_size']} px"
        elif m.get("source") != params["source"]:
            why = f"images from {m.get('source')}, not from {params['source']}"
        else:
            why = "images from an earlier state of the source (files were added, removed or changed since)"
        raise DatasetError(f"{out} already holds a prepared set of {why}; delete it or choose another --out")
    if any(out.iterdir()):
        raise DatasetError(
            f"--out {out} is a non-empty folder that is not a prepared set; choose another --out"
        )
    return False


def prepare(
    src: str | os.PathLike,
    out: str | os.PathLike,
    image_size: int,
    *,
    data_root: str | os.PathLike = "data",
    download: bool = True,
    workers: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    replace: bool = False,
    log: Callable[[str], None] | None = None,
    min_images: int | None = None,
    wait: float | None = None,
) -> PreparedImages:
    """Prepare ``src`` (an image folder or ``"cifar10"``) at ``image_size`` into the folder ``out``;
    return it opened. See the module docstring. ``workers``: decode processes (default: all cores).
    ``replace``: an ``out`` prepared from other files or at another size is prepared again (used by the
    trainer's cache) instead of being an error. ``log`` gets one-line notes (skipped files, resume);
    without it they are warnings. ``min_images``: fail before decoding anything when the source has
    fewer files (the trainer passes its batch size). ``wait``: seconds to wait for another process preparing
    ``out`` (then its result is used); None: that is an error at once."""
    if not isinstance(image_size, int) or isinstance(image_size, bool) or not 1 <= image_size <= 16384:
        raise DatasetError(f"--image-size must be an integer in [1, 16384], got {image_size!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise DatasetError(f"--workers must be >= 1, got {workers!r}")
    say = log or (lambda msg: warnings.warn(msg, stacklevel=3))
    out = Path(out).expanduser()
    source = _Source(src, image_size, data_root, download)
    if min_images is not None and source.n < min_images:
        raise DatasetError(
            f"--batch-size {min_images} is larger than the dataset ({source.n} samples) in {src}"
        )
    params = {"image_size": image_size, "source": source.describe, "source_digest": source.digest}

    def finished() -> bool:
        try:
            done = _check_existing(out, params)
        except DatasetError:
            if not (replace and (out / MANIFEST).is_file()):
                raise
            return False
        # the trainer's cache, written by a fastat that kept no labels: labelled in place (from the file
        # list, which the digest says is unchanged), else prepared again
        return done and (not replace or _add_labels(out, source, say))

    def reopen() -> PreparedImages | None:  # a finished set, checked (sizes, counts, checksums)
        try:
            return PreparedImages.open(out)
        except DatasetError as e:  # damaged: its source is at hand (same digest), so prepare it again
            say(f"fastat: {out} is damaged ({one_line(e).split(';')[0]}); preparing it again")
            return None

    if finished() and (images := reopen()) is not None:
        return images
    shape = (3, image_size, image_size)
    row = int(np.prod(shape))
    shard_size = max(1, int(shard_bytes) // row)

    where = (f"the prepared-image cache {out.parent} (data.cache_dir, $FASTAT_CACHE)" if replace
             else f"next to --out {out}")  # fmt: skip  (replace: the trainer's cache)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot write {where}: {e.strerror or e}") from None
    partial = out.parent / f".{out.name}.partial"
    lock = prep_lock.acquire(partial, out, wait, say, place=where)
    if finished() and (images := reopen()) is not None:  # another process prepared it meanwhile
        prep_lock.release_unused(lock, partial, out)
        return images
    try:
        state = _resume_state(partial, params, shard_size, say)
        if log is not None:
            log(f"fastat: preparing {source.n} images of {source.describe} at {image_size} px into {out}")
        _run(source, partial, state, shape, shard_size, workers, progress, inherited=(lock.fileno(),))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "count": sum(s["count"] for s in state["shards"]),
            "shape": list(shape),
            "dtype": "uint8",
            **params,
            "shard_size": shard_size,
            "shards": state["shards"],
            "checksum": set_checksum(shape, [s["blake2b"] for s in state["shards"]]),
            "num_files": source.n,
            "num_skipped": len(state["skipped"]),
            "skipped": state["skipped"][:SKIPPED_LISTED],
            "fastat_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if manifest["count"] == 0:
            raise DatasetError(f"none of the {source.n} image files in {src} could be read")
        manifest["classes"] = source.classes
        if source.classes:
            manifest["labels"] = write_labels(partial, source.kept_labels(state["skipped"]))
        _write_json(partial / MANIFEST, manifest)
        for name in ("progress.json", "lock"):
            (partial / name).unlink(missing_ok=True)
        _swap_in(partial, out)
    except OSError as e:  # a full disk: name where (a failed write of a shard names no file)
        raise OSError(e.errno, e.strerror or str(e), e.filename or str(partial)) from None
    finally:
        lock.close()
    if state["skipped"]:
        shown = "; ".join(f"{p} ({why})" for p, why in state["skipped"][:3])
        more = (
            f" and {len(state['skipped']) - 3} more (listed in {out / MANIFEST})"
            if len(state["skipped"]) > 3
            else ""
        )
        msg = f"skipped {len(state['skipped'])} unreadable image file(s) of {source.n}: {shown}{more}"
        if log is not None:
            log(f"fastat: {msg}")
        else:
            warnings.warn(msg, stacklevel=2)
    return PreparedImages.open(out, check=False)  # just written and synced


def _add_labels(out: Path, source: _Source, say) -> bool:
    """Give a finished set ``out`` of ``source`` that predates labels its ``classes`` and labels, in place
    (atomic writes; two processes doing it write the same files). False when its skipped files are not all
    named (more than :data:`SKIPPED_LISTED`): it must be prepared again to know which files it holds."""
    m = read_manifest(out)
    if "classes" in m:
        return True
    if len(m.get("skipped", [])) != m.get("num_skipped"):
        say(f"fastat: {out} predates class labels and does not name all its skipped files; preparing it again")
        return False
    labels = source.kept_labels(m.get("skipped", []))
    if len(labels) != m["count"]:
        return False
    m["classes"] = source.classes
    if source.classes:
        m["labels"] = write_labels(out, labels)
    _write_json(out / MANIFEST, m)
    return True


def _resume_state(partial: Path, params: dict, shard_size: int, say) -> dict:
    """The progress recorded in ``partial`` if it was made with the same parameters, else a fresh start."""
    prog = partial / "progress.json"
    fresh = {
        "params": {**params, "shard_size": shard_size},
        "shards": [],
        "files_done": 0,
        "skip": 0,
        "skipped": [],
    }
    if prog.is_file():
        try:
            state = json.loads(prog.read_text())
            ok = state.get("params") == fresh["params"] and all(
                (partial / s["file"]).is_file() for s in state["shards"]
            )
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if ok:
            done = sum(s["count"] for s in state["shards"])
            say(
                f"fastat: continuing an interrupted prepare after {done} images "
                f"({len(state['shards'])} shards done)"
            )
            return state
    for p in partial.iterdir():  # stale or foreign leftovers: start over
        if p.name != "lock":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    _write_json(prog, fresh)
    return fresh


def _run(
    source: _Source, partial: Path, state: dict, shape, shard_size: int, workers, progress: bool,
    inherited: tuple[int, ...] = (),
) -> None:  # fmt: skip
    """Decode the files after ``state['files_done']`` in worker processes (in order) and write shards,
    recording progress after each complete shard. The workers close ``inherited`` (the lock) and end
    with this process (:func:`fastat.data.prep_lock.worker_init`)."""
    from tqdm.auto import tqdm

    row = int(np.prod(shape))
    chunk = max(1, min(CHUNK_FILES, (16 << 20) // row))
    workers = workers or os.cpu_count() or 1
    start = state["files_done"]
    starts = list(range(start, source.n, chunk))
    writer: _ShardWriter | None = None
    skipped_before: list = list(state["skipped"])  # unreadable files before the current chunk
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    bar = tqdm(total=source.n, initial=start, desc="prepare", unit="img", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)  # fmt: skip
    pool = None
    if workers > 1 and len(starts) > 1:
        pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=prep_lock.worker_init,
                                      initargs=(os.getpid(), tuple(inherited)))  # fmt: skip
    pending: deque = deque()

    def submit(i: int) -> None:
        fn, args = source.task(starts[i], min(starts[i] + chunk, source.n))
        pending.append((starts[i], pool.submit(fn, *args) if pool else (fn, args)))

    try:
        nxt = 0
        while nxt < len(starts) and len(pending) < 2 * workers + 2:
            submit(nxt)
            nxt += 1
        skip = state.get("skip", 0)  # images of the first chunk already in a finished shard
        while pending:
            s0, fut = pending.popleft()
            arr, bad = fut.result() if pool else fut[0](*fut[1])
            if nxt < len(starts):
                submit(nxt)
                nxt += 1
            i, skip = skip, 0
            while i < len(arr):
                if writer is None:
                    writer = _ShardWriter(partial, len(state["shards"]), shard_size, shape)
                take = min(len(arr) - i, shard_size - writer.count)
                writer.write(arr[i : i + take])
                i += take
                if writer.count == shard_size:
                    state["shards"].append(writer.finish())
                    writer = None
                    whole = i == len(arr)  # resume after this chunk, or inside it after image i
                    state["files_done"] = min(s0 + chunk, source.n) if whole else s0
                    state["skip"] = 0 if whole else i
                    state["skipped"] = skipped_before + (bad if whole else [])
                    _write_json(partial / "progress.json", state)
            skipped_before = skipped_before + bad
            bar.update(min(chunk, source.n - s0))
        if writer is not None:
            state["shards"].append(writer.finish())
        state["files_done"], state["skip"], state["skipped"] = source.n, 0, skipped_before
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if writer is not None and not writer.f.closed:
            writer.f.close()


def _swap_in(partial: Path, out: Path) -> None:
    """Rename the finished ``partial`` folder to ``out`` (an empty or stale ``out`` is moved aside first)."""
    trash = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            trash = out.parent / f".{out.name}.trash-{os.getpid()}"
            os.replace(out, trash)
    os.replace(partial, out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    try:
        fd = os.open(out.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass
