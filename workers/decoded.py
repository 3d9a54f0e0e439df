"""Image sets decoded once per node, into a file of pixels that every process of the node maps.

A folder's images (its image files, its Parquet shards, a paired SR folder's HR and ``LR_bicubic/X<s>`` images) are
decoded, by the node's cores in parallel, into one file of uint8 pixels (each image channels-first) beside an index
(names, shapes, offsets, each image's pixel digest). A process opens the set by mapping the file: the pixels live
once in the node's page cache, shared by all of its processes and in none's private heap, and a set larger than the
node's memory is read from disk as patches need it.

The entry is keyed by the folder's files (names, sizes and modification times: an ``s3://`` folder's files are its
objects cached under their ETags), built in a scratch folder and renamed into place under a file lock
(:func:`made_once`), so the processes of a node decode a set once, and one killed while decoding leaves nothing a
later one takes for valid: the next one removes the scratch and decodes again.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["HR_FOLDER", "IMAGE_SUFFIXES", "LR_FOLDER", "MAX_PIXELS", "DecodedSet", "cache_folder", "check_image_size",
           "data_files", "decode_array", "decoded_set", "folder_files", "layout_folder", "lr_folders", "made_once",
           "pixel_digest", "set_key"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# The paired SR layout of EDSR's benchmark release, DIV2K and BasicSR: HR images in HR/ (DIV2K's release: one
# <prefix>_HR/ such as DIV2K_train_HR/; or the folder itself) and their LR images in LR_bicubic/X2, X3, ... (DIV2K:
# DIV2K_train_LR_bicubic/X2) named like the HR image, with or without an "x2" suffix (0001x2.png for 0001.png).
HR_FOLDER = "HR"
LR_FOLDER = "LR_bicubic"
_LR_SCALE = re.compile(r"X([2-9])")
# Larger images are refused before decoding (by their header): one such image is 300 MB of pixels, and PIL's own
# guard against decompression bombs starts at 89 megapixels.
MAX_PIXELS = 100_000_000
_FORMAT = 1  # of the index: an entry written by another format is decoded again
# pngrow refuses images over MAX_PIXELS itself, from the header; Pillow's own warning from 89 megapixels is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def cache_folder(configured: str | os.PathLike | None = None) -> Path:
    """This node's cache folder, created: ``configured``, else ``$PNGROW_CACHE``, else ``~/.cache/pngrow``.

    >>> cache_folder("/dev/null/pngrow")
    Traceback (most recent call last):
    ...
    ValueError: cache folder '/dev/null/pngrow' cannot be written: Not a directory
    """
    from .._validation import writable_folder

    path = os.path.expanduser(configured or os.environ.get("PNGROW_CACHE") or "~/.cache/pngrow")
    return writable_folder(Path(path).absolute(), "cache folder")


def made_once(path: Path, make: Callable[[Path], Path]) -> Path:
    """``path`` in a cache (a file or a folder), made unless there already: ``make(scratch)`` builds it in an empty
    scratch folder beside it and returns it, and it is renamed into place, under a file lock, so that the processes
    of one node racing for it make it once. Scratch left by a process killed while making it is removed first."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
        if not path.exists():  # another process of this node may have made it while we waited
            for stale in path.parent.glob(f".{path.name}.*"):
                if stale.is_dir():  # the lock is ours: a scratch folder here is a dead process's
                    shutil.rmtree(stale, ignore_errors=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
            try:
                os.replace(make(scratch), path)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    return path


def folder_files(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """The image files and the Parquet shards directly inside ``folder`` (or its ``HR/``), by name; at least one.

    >>> folder_files("/nonexistent")
    Traceback (most recent call last):
    ...
    ValueError: image folder '/nonexistent' does not exist
    """
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"image folder {str(folder)!r} does not exist")
    path = layout_folder(path, HR_FOLDER) or path
    files = sorted(p for p in path.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    shards = [p for p in files if p.suffix.lower() == ".parquet"]
    if not images and not shards:
        raise ValueError(f"image folder {str(folder)!r} has no {'/'.join(IMAGE_SUFFIXES)} images or .parquet shards")
    return images, shards


def data_files(folder: str | Path) -> list[Path]:
    """Every file :func:`~.data.load_folder` reads from ``folder``: its images or Parquet shards (in it or its
    ``HR/``) and the images of its ``LR_bicubic/X<s>/`` folders (a paired SR folder), nothing else.

    >>> data_files("/nonexistent")
    Traceback (most recent call last):
    ...
    ValueError: image folder '/nonexistent' does not exist
    """
    images, shards = folder_files(folder)
    scales = lr_folders(folder) if not shards else []
    paired = [p for _, sub in scales for p in sorted(sub.iterdir())
              if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return images + shards + paired


def set_key(folder: str | Path) -> str:
    """What a decoded set is cached under: a short hash of the names, sizes and modification times of every file
    under ``folder`` (links followed), so an edited, added or removed file makes a new entry."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    stats = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps([_FORMAT, stats]).encode()).hexdigest()[:20]


def pixel_digest(pixels: np.ndarray) -> str:
    """A short SHA-256 of an image's pixels (as stored, channels first).

    >>> pixel_digest(np.zeros((3, 2, 2), np.uint8)) == pixel_digest(np.zeros((3, 2, 2), np.uint8))
    True
    """
    return hashlib.sha256(np.ascontiguousarray(pixels).data).hexdigest()[:32]


def decode_array(source: str | Path | io.BytesIO, name: str) -> np.ndarray:
    """Decode an image file or encoded bytes (``name`` says which in errors) as RGB uint8, channels first (3, H, W);
    grey is replicated and alpha dropped. One line naming it when it cannot be decoded or is too large."""
    try:
        with Image.open(source) as img:
            check_image_size(img.size, name)
            img.load()
            if img.mode not in ("RGB", "L", "RGBA"):
                img = img.convert("RGB")
            array = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {name!r}: {exc}") from None
    if array.dtype != np.uint8:
        raise ValueError(f"image {name!r} has {array.dtype} pixels; only 8-bit images are supported")
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(np.broadcast_to(array[:, :, :3], array.shape[:2] + (3,)).transpose(2, 0, 1))


def check_image_size(size: tuple[int, int], name: str) -> None:
    """One line naming image ``name`` when its (width, height) is over :data:`MAX_PIXELS` pixels.

    >>> check_image_size((12000, 9000), "huge.png")
    Traceback (most recent call last):
    ...
    ValueError: image 'huge.png' is 12000x9000 (108.0 megapixels), over the 100-megapixel limit
    """
    width, height = size
    if width * height > MAX_PIXELS:
        raise ValueError(f"image {name!r} is {width}x{height} ({width * height / 1e6:.1f} megapixels), over the "
                         f"{MAX_PIXELS // 1_000_000}-megapixel limit")


@dataclass(frozen=True)
class _Item:
    """One image of a set to decode: its name, where its encoded bytes are (an image file, or a shard's row), its
    shape and its place in the pixel file."""

    name: str
    file: Path
    row: int | None  # the Parquet shard's row; None for an image file
    shape: tuple[int, int, int]
    offset: int = 0

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]


def _header_shape(source: str | Path | io.BytesIO, name: str) -> tuple[int, int, int]:
    """The (3, H, W) an image decodes to, read from its header alone."""
    try:
        with Image.open(source) as img:
            check_image_size(img.size, name)
            return 3, img.size[1], img.size[0]
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {name!r}: {exc}") from None


def _shard_rows(path: Path) -> Iterator[tuple[int, str, bytes]]:
    """(row, name, encoded image) of each row of a Parquet shard with columns ``name`` and ``png``."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path), columns=["name", "png"])
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise ValueError(f"cannot read Parquet shard {str(path)!r} (columns name, png): {exc}") from None
    yield from ((row, name, data) for row, (name, data) in
                enumerate(zip(table.column("name").to_pylist(), table.column("png").to_pylist())))


def _plan(folder: Path) -> tuple[list[_Item], dict[int, list[_Item]]]:
    """Every image the folder holds (files, then shard rows) and each scale's paired LR images, shapes from headers."""
    files, shards = folder_files(folder)
    items = [_Item(p.name, p, None, _header_shape(p, str(p))) for p in files]
    for shard in shards:
        items += [_Item(f"{shard.name}:{name}", shard, row, _header_shape(io.BytesIO(data), f"{shard.name}:{name}"))
                  for row, name, data in _shard_rows(shard)]
    if not items:
        raise ValueError(f"image folder {str(folder)!r} has no images: its Parquet shards are empty")
    return items, (_plan_low_res(folder, items) if not shards else {})


def layout_folder(folder: Path, name: str) -> Path | None:
    """``folder/<name>``, else DIV2K's release name ``folder/<prefix>_<name>`` where exactly one such folder is there
    (``DIV2K_train_HR``, ``DIV2K_train_LR_bicubic``); None where neither is."""
    if (folder / name).is_dir():
        return folder / name
    found = [p for p in folder.glob(f"*_{name}") if p.is_dir()]
    return found[0] if len(found) == 1 else None


def lr_folders(folder: str | Path) -> list[tuple[int, Path]]:
    """The (scale, folder) of each ``LR_bicubic/X<s>/`` folder of a paired SR folder, by scale; none for others."""
    root = layout_folder(Path(folder), LR_FOLDER)
    if root is None:
        return []
    return sorted((int(p.name[1:]), p) for p in root.iterdir() if p.is_dir() and _LR_SCALE.fullmatch(p.name))


def _plan_low_res(folder: Path, images: list[_Item]) -> dict[int, list[_Item]]:
    """The paired LR images of ``folder/LR_bicubic/X<s>/`` for each scale there, checked against their HR images:
    each is ``<stem>x<s><suffix>`` or ``<stem><suffix>`` and measures the HR size floor-divided by s."""
    pairs = {}
    for scale, sub in lr_folders(folder):
        found = []
        for hr in images:
            candidates = [sub / f"{hr.file.stem}x{scale}{hr.file.suffix}", sub / hr.file.name]
            lr_file = next((c for c in candidates if c.is_file()), None)
            if lr_file is None:
                raise ValueError(f"paired folder {str(folder)!r}: no LR image {str(candidates[0])!r} for {hr.name!r}")
            shape = _header_shape(lr_file, str(lr_file))
            want = (hr.shape[1] // scale, hr.shape[2] // scale)
            if shape[1:] != want:
                raise ValueError(f"LR image {str(lr_file)!r} is {shape[2]}x{shape[1]}, not {want[1]}x{want[0]} "
                                 f"(its HR image {hr.name!r} divided by {scale})")
            found.append(_Item(f"{sub.name}/{lr_file.name}", lr_file, None, shape))
        pairs[scale] = found
    return pairs


@dataclass(frozen=True)
class DecodedSet:
    """An image set as the node's cache holds it: each image a read-only view into the mapped pixel file, channels
    first, with its pixel digest; ``low_res`` maps a scale to its paired LR images (and digests), aligned."""

    names: tuple[str, ...]
    images: tuple[np.ndarray, ...]
    digests: tuple[str, ...]
    low_res: dict[int, tuple[tuple[np.ndarray, ...], tuple[str, ...]]]
    nbytes: int


def decoded_set(folder: str | Path, cache: Path, threads: int | None = None) -> DecodedSet:
    """The images of the local ``folder`` (see :func:`folder_files`; a paired SR folder's LR images too), decoded
    into ``cache`` once per node by ``threads`` threads (default: every core) and mapped.

    One line names a file that cannot be decoded or is too large, or the cache folder when it has no room."""
    entry = made_once(cache / "decoded" / set_key(folder),
                      lambda scratch: _decode_entry(Path(folder), scratch, _Room(cache, str(folder)), threads))
    return _open(entry)


def _placed(items: list[_Item], start: int) -> list[_Item]:
    """``items`` laid out one after another in the pixel file from byte ``start``."""
    placed = []
    for item in items:
        placed.append(_Item(item.name, item.file, item.row, item.shape, start))
        start += item.size
    return placed


@dataclass(frozen=True)
class _Room:
    """Where a set's pixels are written and whose they are: for the one line a full disk gives."""

    cache: Path
    source: str

    def refuse(self, reason: str) -> ValueError:
        return ValueError(f"cache folder {str(self.cache)!r} {reason}; the decoded images of {self.source!r} "
                          "cannot be written there (set data.cache or PNGROW_CACHE elsewhere)")


def _decode_entry(folder: Path, scratch: Path, room: _Room, threads: int | None) -> Path:
    """Decode ``folder`` into ``scratch`` (``pixels.u8`` and ``index.json``, written last); returns ``scratch``."""
    start = time.perf_counter()
    images, low_res = _plan(folder)
    images = _placed(images, 0)
    end = images[-1].offset + images[-1].size
    for scale, items in low_res.items():
        low_res[scale] = _placed(items, end)
        end = low_res[scale][-1].offset + low_res[scale][-1].size
    everything = images + [item for items in low_res.values() for item in items]
    digests = _write_pixels(scratch / "pixels.u8", everything, end, room, threads)
    index = {"format": _FORMAT, "source": str(folder), "bytes": end, "decode_seconds": time.perf_counter() - start,
             "images": [_record(item, digests[item.offset]) for item in images],
             "low_res": {str(s): [_record(item, digests[item.offset]) for item in items]
                         for s, items in low_res.items()}}
    (scratch / "index.json").write_text(json.dumps(index))
    scratch.chmod(0o755)  # mkdtemp made it private; every process of the node reads it
    return scratch


def _record(item: _Item, digest: str) -> list:
    return [item.name, list(item.shape), item.offset, digest]


def _write_pixels(path: Path, items: list[_Item], total: int, room: _Room, threads: int | None) -> dict[int, str]:
    """Decode ``items`` into the new file ``path`` of ``total`` bytes, each at its offset, in parallel (Pillow decodes
    without the GIL); returns each item's pixel digest by offset. The room is taken up front, so a full disk is one
    line naming the cache folder, never a crash halfway."""
    from .._progress import progress_bar

    free = shutil.disk_usage(path.parent).free
    if free < total:
        raise room.refuse(f"has {_size(free)} free and {_size(total)} are needed")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    digests: dict[int, str] = {}
    try:
        try:  # the room is taken now: a sparse file would fail late, on a full disk, halfway through
            os.posix_fallocate(fd, 0, max(1, total))
        except OSError as exc:
            raise room.refuse(f"cannot hold {_size(total)}: {exc.strerror or exc}") from None
        with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool, \
                progress_bar(len(items), "images", f"decoding {room.source}") as bar:
            for group in _groups(items):
                for offset, digest in pool.map(lambda job: _decode_one(fd, *job), group):
                    digests[offset] = digest
                    bar.update(1)
    finally:
        os.close(fd)
    _release_freed_memory()
    return digests


def _release_freed_memory() -> None:
    """Hand the decoding threads' freed buffers back to the system: glibc keeps them in per-thread arenas, which
    would stay in the process's private memory for as long as it lives (a no-op where there is no glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
        if trim is not None:
            trim(0)


def _size(count: int) -> str:
    """Bytes in words.

    >>> _size(4_718_592), _size(6_635_520_000)
    ('4.7 MB', '6.64 GB')
    """
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


def _groups(items: list[_Item]) -> Iterator[list[tuple[_Item, str | Path | io.BytesIO]]]:
    """What to decode in turn: every image file at once, then each Parquet shard (read once, rows in memory)."""
    yield [(item, item.file) for item in items if item.row is None]
    for shard in dict.fromkeys(item.file for item in items if item.row is not None):
        rows = {row: data for row, _, data in _shard_rows(shard)}
        yield [(item, io.BytesIO(rows[item.row])) for item in items if item.file == shard]


def _decode_one(fd: int, item: _Item, source: str | Path | io.BytesIO) -> tuple[int, str]:
    """Decode one image into its place in the pixel file; its offset and pixel digest."""
    pixels = decode_array(source, str(item.file) if item.row is None else item.name)
    if pixels.shape != item.shape:  # the header said otherwise: a file changed while it was decoded
        raise ValueError(f"image {item.name!r} decoded to {pixels.shape[2]}x{pixels.shape[1]}, not the "
                         f"{item.shape[2]}x{item.shape[1]} its header gave")
    view, written = memoryview(pixels).cast("B"), 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], item.offset + written)
    return item.offset, pixel_digest(pixels)


def _open(entry: Path) -> DecodedSet:
    """Map a decoded set's pixel file (copy on write: pages stay the page cache's until written, which nothing
    does) and view each image in it."""
    index = json.loads((entry / "index.json").read_text())
    pixels = np.memmap(entry / "pixels.u8", dtype=np.uint8, mode="c", shape=(max(1, index["bytes"]),))

    def views(records: list) -> tuple[tuple[np.ndarray, ...], tuple[str, ...]]:
        arrays = tuple(pixels[offset : offset + int(np.prod(shape))].reshape(shape) for _, shape, offset, _ in records)
        return arrays, tuple(digest for *_, digest in records)

    images, digests = views(index["images"])
    return DecodedSet(tuple(name for name, *_ in index["images"]), images, digests,
                      {int(s): views(records) for s, records in index["low_res"].items()}, index["bytes"])
