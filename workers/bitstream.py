"""The pngrow bitstream's framing, free of PyTorch (so that a deployment with ONNX Runtime writes and reads it too).

``PNGR\\x01``, a little-endian uint32 header length, a JSON header (family, task, the task's fingerprint, model,
height, width, tile, ``index_check`` and ``boundary_margin``), then per tile in raster order:

1. the hyper-latent's height and width (uint16 each), the number of strings (uint8), each string as a uint32 length
   and its bytes (CompressAI's order: latent, then hyper-latent);
2. when the header has ``boundary_margin``, the tile's *pinned indexes*, all unsigned LEB128 varints: their count
   n, the n positions in the tile's flattened latent (C order: channel, row, column) as increasing gaps (the first
   position, then each position minus the one before, at least 1), and the n entropy-coding indexes the encoder
   coded those latents with;
3. when the header's ``index_check`` is ``"crc32"``, the CRC-32 (uint32) of the indexes the tile's latent was coded
   with (little-endian int32, C order).

Why: each latent's index is derived from a scale that the decoder recomputes from the hyper-latent, and two
runtimes' float rounding (ONNX Runtime's and PyTorch's kernels, say) differs in the last bits; a scale that lies
next to a boundary of the scale table can land on the other side of it, and the latent then decodes to garbage
without a word (CompressAI issue 309). That rounding error is absolute, proportional to the magnitude of what the
hyper-synthesis computes, so the encoder pins every latent whose scale lies within ``boundary_margin`` times the
tile's largest scale of a boundary (:func:`near_boundary`). The decoder derives its own indexes and takes the
encoder's at every pinned position (:func:`decoding_indexes`): a latent that is not pinned is at least that far
from every boundary at the encoder, so a decoder whose scales differ by less lands on the same side. The CRC-32 then
turns anything else (a decoder whose scales differ by more, a corrupted bitstream) into one clear error instead of
a garbled image. Bitstreams written before (no ``boundary_margin`` in the header: no pinned indexes; no
``index_check``: no checksum) still decode.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

__all__ = ["AUTO_TILE", "BOUNDARY_MARGIN", "INDEX_CHECK", "MAGIC", "CodedTile", "IndexMismatch", "LatentIndexes",
           "decoding_indexes", "encoded_tile", "index_checksum", "near_boundary", "pack", "read_header",
           "resolve_tile", "tile_count", "tiles", "unpack"]

MAGIC = b"PNGR\x01"
# Tile side (input pixels) used when a caller asks for none and the image has more pixels than this squared.
AUTO_TILE = 1024
# The value of the header's ``index_check`` when every tile carries the CRC-32 of its entropy-coding indexes.
INDEX_CHECK = "crc32"
# Latents are pinned within this fraction of their tile's largest scale of a scale-table boundary. ONNX Runtime's and
# PyTorch's hyper-synthesis differ by at most 3.6e-7 of it (all 24 Kodak images, four rates of an N=128 / M=192
# scale hyperprior, docs/benchmark.md): 1e-5 is 28 times that and pins 1 latent in 400 to 4,000.
BOUNDARY_MARGIN = 1e-5
_HEADER_FIELDS = ("family", "task", "fingerprint", "model", "height", "width", "tile")


class IndexMismatch(ValueError):
    """A decoder derived other entropy-coding indexes than the encoder did: its image would be garbage."""


@dataclass(frozen=True)
class CodedTile:
    """One tile's entropy-coded strings (CompressAI's order: latent, then hyper-latent), the hyper-latent's
    (height, width), the CRC-32 of its indexes and its pinned indexes, (position, index) in increasing position
    (each None in bitstreams written without them)."""

    strings: list[bytes]
    shape: tuple[int, int]
    checksum: int | None = None
    pinned: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True, eq=False)
class LatentIndexes:
    """What a runtime derives for one tile's latent from the decoded hyper-latent: the ``scales`` its
    hyper-synthesis computes (before their lower bound), the ``boundaries`` of the scale table (every entry but the
    last) and the CDF ``indexes`` (how many boundaries lie below each scale once it is bounded below)."""

    scales: np.ndarray
    boundaries: np.ndarray
    indexes: np.ndarray


def tiles(height: int, width: int, tile: int | None) -> Iterator[tuple[int, int, int, int]]:
    """(top, left, height, width) of the tiles covering an image in raster order; one tile when ``tile`` is None.

    >>> list(tiles(5, 7, 4))
    [(0, 0, 4, 4), (0, 4, 4, 3), (4, 0, 1, 4), (4, 4, 1, 3)]
    """
    if tile is not None and tile < 1:
        raise ValueError(f"tile {tile!r} must be at least 1 pixel")
    if height < 1 or width < 1:
        raise ValueError(f"the image is empty ({width}x{height} pixels)")
    step_h, step_w = (tile, tile) if tile else (height, width)
    for top in range(0, height, step_h):
        for left in range(0, width, step_w):
            yield top, left, min(step_h, height - top), min(step_w, width - left)


def resolve_tile(height: int, width: int, tile: int | None) -> int | None:
    """The tile side an image is processed with: ``tile`` when given, :data:`AUTO_TILE` when it is None and the
    image has more than :data:`AUTO_TILE` squared pixels, else None (the whole image)."""
    if tile is None and height * width > AUTO_TILE**2:
        return AUTO_TILE
    return tile


def tile_count(height: int, width: int, tile: int | None) -> int:
    """How many tiles an image is processed in (after :func:`resolve_tile`).

    >>> tile_count(1030, 1040, None), tile_count(100, 100, None), tile_count(100, 100, 40)
    (4, 1, 9)
    """
    return len(list(tiles(height, width, resolve_tile(height, width, tile))))


def index_checksum(indexes: np.ndarray) -> int:
    """CRC-32 of entropy-coding indexes, as little-endian int32 in C order.

    >>> index_checksum(np.array([[1, 2]], dtype=np.int64)) == zlib.crc32(bytes([1, 0, 0, 0, 2, 0, 0, 0]))
    True
    """
    return zlib.crc32(np.ascontiguousarray(indexes, dtype="<i4").tobytes())


def near_boundary(scales: np.ndarray, boundaries: np.ndarray, margin: float = BOUNDARY_MARGIN) -> np.ndarray:
    """Positions, in the flattened ``scales``, of the scales within ``margin`` times the largest scale's magnitude
    of a boundary (the latents an encoder pins).

    >>> near_boundary(np.array([[0.5, 1.0, 1.9], [2.0000001, 9.0, -3.0]]), np.array([1.0, 2.0]), margin=1e-6)
    array([1, 3])
    """
    flat = np.asarray(scales, dtype=np.float64).ravel()
    bounds = np.asarray(boundaries, dtype=np.float64)
    if not flat.size or not bounds.size:
        return np.zeros(0, dtype=np.int64)
    above = np.minimum(np.searchsorted(bounds, flat), len(bounds) - 1)
    gap = np.minimum(np.abs(flat - bounds[above]), np.abs(flat - bounds[np.maximum(above - 1, 0)]))
    return np.flatnonzero(gap < margin * float(np.abs(flat).max()))


def encoded_tile(strings: list[bytes], shape: tuple[int, int], latent: LatentIndexes) -> CodedTile:
    """A tile as an encoder writes it: its strings, the CRC-32 of the indexes its latent was coded with
    (``latent.indexes``) and those indexes pinned at every latent near a boundary (:func:`near_boundary`)."""
    positions = near_boundary(latent.scales, latent.boundaries)
    pinned = np.asarray(latent.indexes).ravel()[positions]
    return CodedTile(list(strings), (int(shape[0]), int(shape[1])), index_checksum(latent.indexes),
                     tuple(zip(positions.tolist(), pinned.tolist())))


def decoding_indexes(tile: CodedTile, latent: LatentIndexes, number: int) -> np.ndarray:
    """The indexes to decode tile ``number`` with: this decoder's own (``latent.indexes``) with the encoder's at
    each pinned position; :class:`IndexMismatch` (one line) if they are still not the ones the tile was coded with.
    """
    indexes = np.array(latent.indexes, dtype=np.int32)
    if tile.pinned:
        positions, pinned = (np.array(values, dtype=np.int64) for values in zip(*tile.pinned))
        if positions[-1] >= indexes.size:
            raise ValueError(f"tile {number} of the bitstream pins latent {positions[-1]}, past its {indexes.size} "
                             f"latents: the bitstream is corrupted")
        indexes.reshape(-1)[positions] = pinned
    if tile.checksum is not None and index_checksum(indexes) != tile.checksum:
        raise IndexMismatch(f"tile {number} of the bitstream: this decoder derives other entropy-coding indexes than "
                            f"the encoder did (CRC-32 {index_checksum(indexes):08x}, coded {tile.checksum:08x}), "
                            f"even where the encoder pinned them: its scales differ from the encoder's by more than "
                            f"the pinned margin (CompressAI issue 309), or the bitstream is corrupted; decoding it "
                            f"would give a garbled image")
    return indexes


def _varints(values: Iterable[int]) -> bytes:
    """Unsigned LEB128: 7 bits a byte, low bits first, the high bit set on every byte but a number's last.

    >>> _varints([0, 127, 128, 300]).hex()
    '007f8001ac02'
    """
    out = bytearray()
    for value in values:
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    """The varint at ``offset`` and the offset after it (``struct.error`` where the data ends first)."""
    value = shift = 0
    while True:
        if offset >= len(data):
            raise struct.error("short varint")
        byte = data[offset]
        value |= (byte & 0x7F) << shift
        offset, shift = offset + 1, shift + 7
        if byte < 0x80:
            return value, offset


def _pinned_bytes(pinned: tuple[tuple[int, int], ...]) -> bytes:
    positions = [position for position, _ in pinned]
    gaps = [after - before for before, after in zip([0, *positions], positions)]
    return _varints([len(pinned), *gaps, *(index for _, index in pinned)])


def _read_pinned(data: bytes, offset: int) -> tuple[tuple[tuple[int, int], ...], int]:
    """The pinned indexes at ``offset`` (see the module's docstring) and the offset after them."""
    count, offset = _read_varint(data, offset)
    positions, position = [], 0
    for number in range(count):
        gap, offset = _read_varint(data, offset)
        if number and gap < 1:
            raise ValueError("pngrow bitstream has a corrupted list of pinned indexes (positions not increasing)")
        position += gap
        positions.append(position)
    indexes = []
    for _ in range(count):
        index, offset = _read_varint(data, offset)
        indexes.append(index)
    return tuple(zip(positions, indexes)), offset


def pack(header: dict, coded: list[CodedTile]) -> bytes:
    """The bitstream of ``header`` (the fields of :func:`read_header`) and the tiles in raster order; the header
    says ``index_check`` when every tile has a checksum and ``boundary_margin`` when every tile has pinned indexes.

    >>> data = pack({"family": "nic", "task": "q1", "fingerprint": "f", "model": "", "height": 8, "width": 8,
    ...              "tile": None}, [CodedTile([b"y", b"z"], (1, 1), 7, ((3, 5), (200, 9)))])
    >>> header, found = unpack(data)
    >>> header["index_check"], header["boundary_margin"] == BOUNDARY_MARGIN, found[0].pinned
    ('crc32', True, ((3, 5), (200, 9)))
    """
    checked = bool(coded) and all(t.checksum is not None for t in coded)
    listed = bool(coded) and all(t.pinned is not None for t in coded)
    fields = {k: v for k, v in header.items() if k not in ("index_check", "boundary_margin")}
    fields.update({"index_check": INDEX_CHECK} if checked else {})
    fields.update({"boundary_margin": BOUNDARY_MARGIN} if listed else {})
    head = json.dumps(fields, separators=(",", ":")).encode()
    body = bytearray(MAGIC + struct.pack("<I", len(head)) + head)
    for tile in coded:
        body += struct.pack("<HHB", *tile.shape, len(tile.strings))
        for string in tile.strings:
            body += struct.pack("<I", len(string)) + string
        if listed:
            body += _pinned_bytes(tile.pinned)
        if checked:
            body += struct.pack("<I", tile.checksum)
    return bytes(body)


def read_header(data: bytes) -> dict:
    """The JSON header of a pngrow bitstream (family, task, fingerprint, model, height, width, tile; and
    ``index_check`` and ``boundary_margin`` where its tiles carry checksums and pinned indexes).

    >>> read_header(b"JPEG")
    Traceback (most recent call last):
    ...
    ValueError: not a pngrow bitstream (bad magic bytes)
    """
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise ValueError("not a pngrow bitstream (bad magic bytes)")
    (size,) = struct.unpack_from("<I", data, len(MAGIC))
    try:
        header = json.loads(data[len(MAGIC) + 4 : len(MAGIC) + 4 + size])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("pngrow bitstream has a corrupted header") from None
    missing = [key for key in _HEADER_FIELDS if not isinstance(header, dict) or key not in header]
    if missing:
        raise ValueError(f"pngrow bitstream has a corrupted header (no {missing[0]!r})")
    if header.get("index_check", INDEX_CHECK) != INDEX_CHECK:
        raise ValueError(f"pngrow bitstream has an unknown index check {header['index_check']!r}")
    margin = header.get("boundary_margin", BOUNDARY_MARGIN)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < math.inf:
        raise ValueError(f"pngrow bitstream has a bad boundary margin {margin!r} (a positive number)")
    return header


def _read_tile(data: bytes, offset: int, checked: bool, listed: bool) -> tuple[CodedTile, int]:
    """The tile at ``offset`` and the offset after it (``struct.error`` where the data ends first)."""
    zh, zw, count = struct.unpack_from("<HHB", data, offset)
    offset += 5
    strings = []
    for _ in range(count):
        (size,) = struct.unpack_from("<I", data, offset)
        if offset + 4 + size > len(data):
            raise struct.error("short string")
        strings.append(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
    pinned, offset = _read_pinned(data, offset) if listed else (None, offset)
    checksum = struct.unpack_from("<I", data, offset)[0] if checked else None
    return CodedTile(strings, (zh, zw), checksum, pinned), offset + (4 if checked else 0)


def unpack(data: bytes) -> tuple[dict, list[CodedTile]]:
    """The header and every tile of a bitstream that :func:`pack` wrote (or an older pngrow: without pinned
    indexes, or without checksums either)."""
    header = read_header(data)
    checked, listed = header.get("index_check") == INDEX_CHECK, "boundary_margin" in header
    offset = len(MAGIC) + 4 + struct.unpack_from("<I", data, len(MAGIC))[0]
    coded = []
    try:
        for _ in tiles(header["height"], header["width"], header["tile"]):
            tile, offset = _read_tile(data, offset, checked, listed)
            coded.append(tile)
    except struct.error:
        raise ValueError("pngrow bitstream is truncated") from None
    if offset != len(data):
        raise ValueError(f"pngrow bitstream has {len(data) - offset} bytes after its last tile")
    return header, coded
