"""The prepared image format: uint8 ``(C, H, W)`` images in plain ``.npy`` shards with a JSON manifest.

    ds = PreparedImages.open("data/celeba64")       # checks the manifest, every shard's size, checksums
    out = torch.empty(128, *ds.shape, dtype=torch.uint8)
    ds.read_into(torch.tensor([5, 0, 4711, ...]), out)   # one positioned read per image
    ds.verify()                                     # recompute the checksums (reads everything)

A folder holds ``manifest.json`` (written last: without it, a folder is not a prepared set) and
``shard-NNNNN.npy`` arrays. Reads are ``os.preadv`` into the caller's (pinned) buffer: no memory map, so
resident memory does not grow, a truncated file is a clean error, and reads release the GIL. The layout:
docs/DESIGN.md ("Data"). Opening checks the
manifest's counts, the set checksum, each shard's size, and hashes the pixels (all of a set up to
``CHECK_BYTES``, else shards drawn at random): a damaged set names the command that repairs it.

Class labels (class-conditional training): the manifest's ``classes`` lists the class names (an image
folder's first-level sub-folders, sorted; CIFAR-10's ten classes) and ``labels`` names ``labels.npy``, an
int32 label per image (-1: an image directly in the folder, in no class) with its blake2b. A manifest
without ``classes`` was written by a fastat that kept no labels.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._errors import DatasetError

__all__ = ["FORMAT", "LABELS", "MANIFEST", "PreparedImages", "is_prepared", "npy_header", "read_manifest",
           "write_labels"]

FORMAT, VERSION = "fastat-prepared", 1
MANIFEST = "manifest.json"
LABELS = "labels.npy"
HEADER_BYTES = 128  # our shards' .npy header length (any valid .npy header is read)
# Pixels hashed when a set is opened: blake2b ran at 0.2 GiB/s on a loaded 2-core machine (3000 images
# of 64x64, 35 MiB: 0.2 s; 20000: 1.1 s), about 1 GiB/s on an idle core.
CHECK_BYTES = 256 << 20


def npy_header(shape: tuple[int, ...], dtype: str = "|u1", total: int = HEADER_BYTES) -> bytes:
    """A .npy (version 1.0) header of exactly ``total`` bytes, so it can be rewritten in place once
    the final row count is known."""
    d = f"{{'descr': {dtype!r}, 'fortran_order': False, 'shape': {tuple(int(s) for s in shape)!r}, }}"
    pad = total - 10 - len(d) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} does not fit a {total}-byte .npy header")
    body = (d + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], str, int]:
    """``(shape, descr, data offset)`` of the .npy file at ``path`` (DatasetError if it is not one)."""
    try:
        with open(path, "rb") as f:
            head = f.read(10)
            if head[:6] != b"\x93NUMPY":
                raise ValueError("not a .npy file")
            major = head[6]
            if major == 1:
                n = int.from_bytes(head[8:10], "little")
                offset = 10 + n
            elif major in (2, 3):
                n = int.from_bytes(head[8:10] + f.read(2), "little")
                offset = 12 + n
            else:
                raise ValueError(f"unknown .npy version {major}")
            f.seek(offset - n)
            d = ast.literal_eval(f.read(n).decode("latin1"))
        if not isinstance(d, dict) or d.get("fortran_order") or "shape" not in d:
            raise ValueError("unsupported .npy header")
        return tuple(int(s) for s in d["shape"]), str(d["descr"]), offset
    except OSError as e:
        raise DatasetError(f"cannot read shard {path}: {e.strerror or e}") from None
    except (ValueError, SyntaxError, KeyError, TypeError) as e:
        raise DatasetError(f"shard {path} is not a valid .npy file ({e}); prepare the set again") from None


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of the prepared folder ``root`` (DatasetError if absent or malformed)."""
    path = Path(root).expanduser() / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path.parent} is not a prepared dataset (no {MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a fastat prepared-dataset manifest")
    if m.get("version") != VERSION:
        raise DatasetError(
            f"{path} has format version {m.get('version')}; this fastat reads version {VERSION}"
        )
    return m


def is_prepared(root: str | os.PathLike) -> bool:
    """Whether ``root`` is a folder holding a prepared-dataset manifest."""
    return (Path(root).expanduser() / MANIFEST).is_file()


@dataclass(frozen=True)
class _Shard:
    path: Path
    count: int
    offset: int  # byte offset of the first image
    digest: str


class PreparedImages:
    """A prepared folder, opened for reading: ``len(ds)`` images of shape ``ds.shape`` (uint8).

    Thread-safe: reads are positioned (``preadv``), file descriptors are opened once and shared.
    """

    def __init__(self, root: Path, manifest: dict, shards: list[_Shard]) -> None:
        self.root, self.manifest, self._shards = root, manifest, shards
        self.shape: tuple[int, int, int] = tuple(manifest["shape"])  # type: ignore[assignment]
        self.count = int(manifest["count"])
        self.shard_size = int(manifest["shard_size"])
        self.image_size = int(manifest["image_size"])
        self.source = str(manifest.get("source", ""))
        self.row_bytes = int(np.prod(self.shape))
        self._fds: list[int | None] = [None] * len(shards)
        classes = manifest.get("classes")  # None: prepared by a fastat that kept no labels
        self.classes: tuple[str, ...] | None = tuple(classes) if classes is not None else None
        self.labels: torch.Tensor | None = None  # int64 (count,), -1: in no class (set by open)

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, root: str | os.PathLike, image_size: int | None = None, *, check: bool = True
    ) -> PreparedImages:
        """Open the prepared folder ``root``; check the manifest, each shard's header and file size
        (a truncated, padded or missing shard is a :class:`DatasetError` naming it), and, if given, that
        the images are ``image_size`` pixels square; ``check``: hash the pixels (:meth:`check`)."""
        root = Path(root).expanduser()
        m = read_manifest(root)
        try:
            shape = tuple(int(s) for s in m["shape"])
            count, shard_size = int(m["count"]), int(m["shard_size"])
            entries = [(str(s["file"]), int(s["count"]), str(s.get("blake2b", ""))) for s in m["shards"]]
            if len(shape) != 3 or count < 1 or shard_size < 1 or m.get("dtype") != "uint8":
                raise ValueError("bad shape, count, shard_size or dtype")
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(
                f"the manifest of {root} is malformed ({e}); delete {root} and prepare the set again"
            ) from None
        if image_size is not None and shape[1:] != (image_size, image_size):
            raise DatasetError(
                f"{root} holds {shape[1]}x{shape[2]} images, not {image_size}x{image_size} (--image-size); "
                f"prepare it again with --image-size {image_size} into another folder, or drop --image-size"
            )
        fix = repair_hint(root, m)
        if sum(c for _, c, _ in entries) != count or any(c != shard_size for _, c, _ in entries[:-1]):
            raise DatasetError(f"the manifest of {root} lists inconsistent shard counts; {fix}")
        files, skipped = m.get("num_files"), m.get("num_skipped")
        if isinstance(files, int) and isinstance(skipped, int) and files - skipped != count:
            raise DatasetError(
                f"the manifest of {root} counts {count} images, but {files} files of which {skipped} were "
                f"skipped; {fix}"
            )
        row = int(np.prod(shape))
        shards = []
        for name, c, digest in entries:
            path = root / name
            if not path.is_file():
                raise DatasetError(f"shard {path} is missing; {fix}")
            s_shape, descr, offset = _read_npy_header(path)
            if s_shape != (c, *shape) or descr not in ("|u1", "<u1", ">u1", "u1"):
                raise DatasetError(
                    f"shard {path} holds {descr} {s_shape}, the manifest says uint8 {(c, *shape)}; {fix}"
                )
            size, want = path.stat().st_size, offset + c * row
            if size != want:
                what = "truncated" if size < want else "longer than its images"
                raise DatasetError(f"shard {path} is {what} ({size} bytes, expected {want}); {fix}")
            shards.append(_Shard(path, c, offset, digest))
        digests = [d for _, _, d in entries]
        if m.get("checksum") and all(digests) and set_checksum(shape, digests) != m["checksum"]:
            raise DatasetError(
                f"the manifest of {root}: its checksum does not match its shards' digests; {fix}"
            )
        ds = cls(root, m, shards)
        ds.labels = _read_labels(root, m, count, fix)
        if check:
            ds.check()
        return ds

    def __len__(self) -> int:
        return self.count

    def head(self, k: int) -> PreparedImages:
        """The first ``k`` images, as a set of their own (same files, own descriptors)."""
        part = PreparedImages(self.root, self.manifest, self._shards)
        part.count = max(0, min(int(k), self.count))
        part.labels = self.labels[: part.count] if self.labels is not None else None
        return part

    @property
    def nbytes(self) -> int:
        return self.count * self.row_bytes

    def __repr__(self) -> str:
        return f"PreparedImages({str(self.root)!r}, count={self.count}, shape={self.shape})"

    def _fd(self, s: int) -> int:
        fd = self._fds[s]
        if fd is None:
            try:
                fd = os.open(self._shards[s].path, os.O_RDONLY)
            except OSError as e:
                raise DatasetError(f"cannot open shard {self._shards[s].path}: {e.strerror or e}") from None
            self._fds[s] = fd
        return fd

    def close(self) -> None:
        for i, fd in enumerate(self._fds):
            if fd is not None:
                os.close(fd)
                self._fds[i] = None

    def __del__(self) -> None:  # file descriptors only; nothing to flush
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- reading -------------------------------------------------------------------------------------
    def _pread(self, s: int, view: memoryview, offset: int) -> None:
        """Fill ``view`` from shard ``s`` at ``offset``. A read may return fewer bytes than asked (network
        file systems, signals): read on from where it stopped; only a read of 0 bytes (end of file) means
        the shard is shorter than it should be."""
        done, want = 0, len(view)
        while done < want:
            got = os.preadv(self._fd(s), [view[done:]], offset + done)
            if got == 0:
                raise DatasetError(
                    f"shard {self._shards[s].path} ended early (read {done} of {want} bytes at {offset}); "
                    f"prepare the set again"
                )
            done += got

    def read_into(self, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Images ``index`` (int64 ``(B,)``, any order) into ``out`` (contiguous CPU uint8
        ``(B, C, H, W)``, e.g. pinned); returns ``out``."""
        if out.dtype != torch.uint8 or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError("out must be a contiguous CPU uint8 tensor")
        if tuple(out.shape) != (index.shape[0], *self.shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {(index.shape[0], *self.shape)}")
        buf = memoryview(out.numpy()).cast("B")
        row, k = self.row_bytes, self.shard_size
        for j, i in enumerate(index.tolist()):
            if not 0 <= i < self.count:
                raise IndexError(f"image {i} out of range for {self.count} images")
            s, r = divmod(i, k)
            self._pread(s, buf[j * row : (j + 1) * row], self._shards[s].offset + r * row)
        return out

    def read_range(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``start:stop`` (contiguous reads, shard by shard) into ``out`` or a new tensor."""
        start, stop = max(0, start), min(stop, self.count)
        n = max(0, stop - start)
        if out is None:
            out = torch.empty((n, *self.shape), dtype=torch.uint8)
        elif tuple(out.shape) != (n, *self.shape) or out.dtype != torch.uint8 or not out.is_contiguous():
            raise ValueError(f"out must be contiguous uint8 {(n, *self.shape)}")
        buf = memoryview(out.numpy()).cast("B")
        row, k, i = self.row_bytes, self.shard_size, start
        chunk = max(1, (64 << 20) // row)  # at most 64 MiB per read call
        while i < stop:
            s, r = divmod(i, k)
            m = min(stop - i, self._shards[s].count - r, chunk)
            j = i - start
            self._pread(s, buf[j * row : (j + m) * row], self._shards[s].offset + r * row)
            i += m
        return out

    def blocks(self, block: int = 1024):
        """Yield ``(start, uint8 block)`` over the whole set, in order."""
        for i in range(0, self.count, block):
            yield i, self.read_range(i, i + block)

    def verify(self, progress=None) -> None:
        """Recompute every shard's blake2b and the manifest checksum (reads the whole set);
        DatasetError naming the first shard that differs. ``progress(nbytes)`` is called per chunk."""
        digests = [self._verify_shard(s, progress) for s in range(len(self._shards))]
        if self.manifest.get("checksum") and set_checksum(self.shape, digests) != self.manifest["checksum"]:
            raise DatasetError(
                f"{self.root}: the manifest checksum does not match its shards; "
                f"{repair_hint(self.root, self.manifest)}"
            )

    def check(self, budget: int = CHECK_BYTES) -> int:
        """Hash the pixels of the whole set if it holds at most ``budget`` bytes, else of shards drawn at
        random until ``budget`` bytes are read (at least one shard); DatasetError naming a shard that
        does not match its digest. Returns the bytes hashed."""
        order = list(range(len(self._shards)))
        if self.nbytes > budget:
            random.shuffle(order)
        done = 0
        for s in order:
            size = self._shards[s].count * self.row_bytes
            if done and done + size > budget:
                continue
            self._verify_shard(s)
            done += size
        return done

    def _verify_shard(self, s: int, progress=None) -> str:
        shard = self._shards[s]
        h = hashlib.blake2b(digest_size=16)
        left, pos = shard.count * self.row_bytes, shard.offset
        while left:
            data = os.pread(self._fd(s), min(left, 16 << 20), pos)
            if not data:
                raise DatasetError(f"shard {shard.path} ended early; {repair_hint(self.root, self.manifest)}")
            h.update(data)
            left, pos = left - len(data), pos + len(data)
            if progress is not None:
                progress(len(data))
        if shard.digest and h.hexdigest() != shard.digest:
            raise DatasetError(
                f"shard {shard.path} does not match its checksum (the set is damaged); "
                f"{repair_hint(self.root, self.manifest)}"
            )
        return h.hexdigest()


def repair_hint(root: Path, manifest: dict) -> str:
    """What repairs a damaged set: ``fastat prepare`` of its source (which prepares it again), else
    deleting it."""
    source, size = str(manifest.get("source", "")), manifest.get("image_size")
    src = (
        source[len("folder:") :]
        if source.startswith("folder:")
        else "cifar10"
        if "cifar10" in source
        else None
    )
    if src is None or not isinstance(size, int):
        return f"delete {root} and prepare the set again"
    return f"repair it with: fastat prepare {src} --out {root} --image-size {size} (or delete {root})"


def set_checksum(shape: tuple[int, ...], shard_digests: list[str]) -> str:
    """The checksum of a whole prepared set: blake2b of its shape and its shards' digests, in order."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([list(shape), list(shard_digests)]).encode())
    return h.hexdigest()


def write_labels(folder: Path, labels: np.ndarray) -> dict:
    """Write ``labels`` (one int per image) to ``folder/labels.npy``, synced; its manifest entry."""
    path, tmp = folder / LABELS, folder / f".{LABELS}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(labels, dtype=np.int32), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a reader sees the old file or the whole new one
    return {"file": LABELS, "blake2b": hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()}


def _read_labels(root: Path, manifest: dict, count: int, fix: str) -> torch.Tensor | None:
    """The labels the manifest names (int64 ``(count,)``), checked against its digest; None without."""
    entry = manifest.get("labels")
    if not entry:
        return None
    try:
        path = root / str(entry["file"])
        data = path.read_bytes()
        if hashlib.blake2b(data, digest_size=16).hexdigest() != entry["blake2b"]:
            raise ValueError("it does not match its checksum")
        labels = np.load(io.BytesIO(data), allow_pickle=False)
        classes = len(manifest.get("classes") or ())
        if labels.shape != (count,) or labels.dtype.kind != "i":
            raise ValueError(f"it holds {labels.dtype} {labels.shape}, not one integer per image ({count})")
        if count and (labels.min() < -1 or labels.max() >= classes):
            raise ValueError(f"a label lies outside [-1, {classes})")
    except (OSError, KeyError, TypeError, ValueError) as e:
        why = getattr(e, "strerror", None) or e
        raise DatasetError(f"the labels of {root} are damaged ({why}); {fix}") from None
    return torch.from_numpy(labels.astype(np.int64))
