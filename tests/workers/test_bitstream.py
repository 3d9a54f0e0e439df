"""The bitstream's framing: pinned indexes (which latents, how they are written and read back, how a decoder uses
them) and bitstreams written before them."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from pngrow.workers.bitstream import BOUNDARY_MARGIN, MAGIC, CodedTile, IndexMismatch, LatentIndexes, \
    decoding_indexes, encoded_tile, index_checksum, near_boundary, pack, unpack

# CompressAI's scale table (64 scales from 0.11 to 256, evenly spaced in log), in float32 as its models hold it.
TABLE = np.exp(np.linspace(np.log(0.11), np.log(256), 64)).astype(np.float32)
BOUNDARIES = TABLE[:-1]
HEADER = {"family": "nic", "task": "q4", "fingerprint": "f", "model": "", "height": 64, "width": 128, "tile": 64}


def _scales(shape: tuple[int, ...], largest: float, seed: int = 0) -> np.ndarray:
    """Scales between 0 and ``largest`` (float32), none within 1e-3 of ``largest`` of a boundary."""
    scales = np.random.default_rng(seed).uniform(0, largest, shape).astype(np.float32)
    above = np.minimum(np.searchsorted(BOUNDARIES, scales), len(BOUNDARIES) - 1)
    near = np.minimum(np.abs(scales - BOUNDARIES[above]), np.abs(scales - BOUNDARIES[np.maximum(above - 1, 0)]))
    return np.where(near < 1e-3 * largest, np.float32(largest / 2 + 1e-2), scales)


def _indexes(scales: np.ndarray) -> np.ndarray:
    """CompressAI's ``GaussianConditional.build_indexes``: how many boundaries lie below each scale, bounded below."""
    return np.searchsorted(BOUNDARIES, np.maximum(scales, TABLE[0]), side="left").astype(np.int32)


def test_the_encoder_pins_exactly_the_latents_near_a_boundary() -> None:
    scales = _scales((8, 6, 5), 40.0)
    reach = BOUNDARY_MARGIN * 40.0
    planted = {  # flat position: scale, at a known distance from a boundary (the largest scale is 40)
        3: BOUNDARIES[30],                      # exactly on one
        17: BOUNDARIES[45] + 0.5 * reach,       # just past one
        18: BOUNDARIES[12] - 0.9 * reach,       # just before one
        64: TABLE[0] - 0.3 * reach,             # below the lower bound, but next to it
        100: BOUNDARIES[45] + 2 * reach,        # past the margin
        101: BOUNDARIES[20] - 1.5 * reach,      # before the margin
        102: 0.0,                               # far below the lower bound
        200: 40.0,                              # the largest scale
    }
    scales.reshape(-1)[list(planted)] = np.array(list(planted.values()), dtype=np.float32)
    assert near_boundary(scales, BOUNDARIES).tolist() == [3, 17, 18, 64]
    tile = encoded_tile([b"y", b"z"], (2, 3), LatentIndexes(scales, BOUNDARIES, _indexes(scales)))
    assert tile.pinned == ((3, 30), (17, 46), (18, 12), (64, 0))
    assert tile.checksum == index_checksum(_indexes(scales))
    assert near_boundary(np.zeros((2, 3)), BOUNDARIES).size == 0  # every scale at 0: nothing near, nothing to pin


def test_a_decoder_takes_the_encoders_index_at_each_pinned_latent_and_no_other() -> None:
    scales = _scales((4, 8, 8), 10.0, seed=1)
    scales.reshape(-1)[[5, 77]] = [BOUNDARIES[20], BOUNDARIES[33]]
    encoder = LatentIndexes(scales, BOUNDARIES, _indexes(scales))
    tile = encoded_tile([b"y", b"z"], (1, 2), encoder)
    theirs = scales.copy()  # another runtime: both scales rounded up, over their boundary
    theirs.reshape(-1)[[5, 77]] = np.nextafter(theirs.reshape(-1)[[5, 77]], np.float32(np.inf))
    decoder = LatentIndexes(theirs, BOUNDARIES, _indexes(theirs))
    assert (decoder.indexes != encoder.indexes).sum() == 2
    assert np.array_equal(decoding_indexes(tile, decoder, 0), encoder.indexes)
    other = decoder.indexes.copy()
    other.reshape(-1)[6] += 1  # a latent the encoder did not pin: far from a boundary for it, so a real defect
    with pytest.raises(IndexMismatch, match=r"^tile 3 of the bitstream: this decoder derives other entropy-coding "
                                            r"indexes than the encoder did \(CRC-32 [0-9a-f]{8}, coded"):
        decoding_indexes(tile, LatentIndexes(theirs, BOUNDARIES, other), 3)
    past = CodedTile(tile.strings, tile.shape, tile.checksum, ((5, 20), (256, 1)))
    with pytest.raises(ValueError, match=r"^tile 0 of the bitstream pins latent 256, past its 256 latents"):
        decoding_indexes(past, decoder, 0)


def test_pinned_indexes_are_written_as_varints_and_read_back() -> None:
    pinned = ((0, 0), (1, 63), (127, 5), (300, 130), (20_000, 7), (3_000_000, 1))
    coded = [CodedTile([b"latent", b"hyper"], (4, 5), 0xDEADBEEF, pinned), CodedTile([b"", b"h"], (1, 1), 1, ())]
    data = pack(HEADER, coded)
    header, found = unpack(data)
    assert header["boundary_margin"] == BOUNDARY_MARGIN and found == coded
    # count, then gaps 0, 1, 126, 173, 19700, 2980000, then the indexes: 1 + (1+1+1+2+3+4) + (1+1+1+2+1+1) bytes
    first = len(MAGIC) + 4 + struct.unpack_from("<I", data, len(MAGIC))[0] + 5 + 4 + 6 + 4 + 5
    assert data[first : first + 20].hex() == "06" + "00017ead01f49901a0f1b501" + "003f0582010701"
    with pytest.raises(ValueError, match="^pngrow bitstream is truncated$"):
        unpack(data[: first + 10])


@pytest.mark.parametrize(("field", "message"), [("boundary_margin", "pngrow bitstream has a bad boundary margin -1"),
                                                ("index_check", "pngrow bitstream has an unknown index check -1")])
def test_a_bad_header_field_is_one_line(field: str, message: str) -> None:
    head = json.dumps({**HEADER, field: -1}).encode()
    with pytest.raises(ValueError, match=f"^{message}"):
        unpack(MAGIC + struct.pack("<I", len(head)) + head)


def test_pinned_positions_must_increase() -> None:
    data = bytearray(pack(HEADER, [CodedTile([b"y"], (1, 1), 1, ((4, 1), (9, 2))), CodedTile([b"y"], (1, 1), 1, ())]))
    at = data.index(bytes([2, 4, 5]))  # count 2, gaps 4 and 5
    data[at + 2] = 0
    with pytest.raises(ValueError, match=r"corrupted list of pinned indexes \(positions not increasing\)"):
        unpack(bytes(data))


def _old_bitstream(header: dict, tiles: list[tuple[list[bytes], tuple[int, int]]], checksums: list[int]) -> bytes:
    """A bitstream as pngrow wrote it before pinned indexes, byte by byte: with a CRC-32 after each tile's strings
    when ``checksums`` are given, as the first pngrow did without them."""
    head = json.dumps({**header, **({"index_check": "crc32"} if checksums else {})}, separators=(",", ":")).encode()
    body = MAGIC + struct.pack("<I", len(head)) + head
    for number, (strings, shape) in enumerate(tiles):
        body += struct.pack("<HHB", *shape, len(strings))
        body += b"".join(struct.pack("<I", len(s)) + s for s in strings)
        body += struct.pack("<I", checksums[number]) if checksums else b""
    return body


@pytest.mark.parametrize("checksums", [[], [zlib.crc32(b"a"), zlib.crc32(b"b")]], ids=["first", "crc32"])
def test_bitstreams_written_before_pinned_indexes_still_read(checksums: list[int]) -> None:
    tiles = [([b"y0", b"z0"], (2, 3)), ([b"y1", b"z1"], (2, 1))]
    old = _old_bitstream(HEADER, tiles, checksums)
    header, found = unpack(old)
    assert pack(header, found) == old  # and tiles without pinned indexes are written as before
    assert "boundary_margin" not in header and [(t.strings, t.shape) for t in found] == tiles
    assert [t.pinned for t in found] == [None, None]
    assert [t.checksum for t in found] == (checksums or [None, None])
    decoder = LatentIndexes(np.zeros((1, 2)), BOUNDARIES, np.array([[3, 4]], dtype=np.int32))
    unpinned = CodedTile(found[0].strings, found[0].shape, index_checksum(decoder.indexes) if checksums else None)
    assert np.array_equal(decoding_indexes(unpinned, decoder, 0), decoder.indexes)
