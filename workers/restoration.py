"""Restore whole images with a shared model: SISR upscaling and NIC coding, in tiles where an image is large, and
the pngrow bitstream (a header naming the model, the task and the task's fingerprint, then the entropy-coded tiles).

A bitstream decodes with any model whose task has the same fingerprint: a model grown from the one that wrote it
decodes it bit-identically, and any other model refuses it with a one-line error.
"""

from __future__ import annotations

import json
import struct
from typing import Callable, Iterator

import torch
from torch import nn

from .metrics import quantize
from .models import Codec, Family, Upscaler
from .png import SharedNetwork

__all__ = ["MAGIC", "decode", "encode", "read_header", "resolve_tile", "tile_count", "tiles", "upscale"]

MAGIC = b"PNGR\x01"
# Tile side (input pixels) used when a caller asks for none and the image has more pixels than this squared.
AUTO_TILE = 1024
Progress = Callable[[int], None]


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
    """How many tiles :func:`upscale` or :func:`encode` processes for an image (after :func:`resolve_tile`).

    >>> tile_count(1030, 1040, None), tile_count(100, 100, None), tile_count(100, 100, 40)
    (4, 1, 9)
    """
    return len(list(tiles(height, width, resolve_tile(height, width, tile))))


def receptive_margin(model: nn.Module) -> int:
    """Input pixels each side that a tile needs so its interior is computed exactly as in the whole image: an upper
    bound from the model's convolutions (each k x k conv reaches (k-1)/2 pixels) plus 2 for bicubic resampling."""
    reach = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            reach += max((k - 1) // 2 * d for k, d in zip(module.kernel_size, module.dilation))
    return reach + 2


def _check_image(image: torch.Tensor) -> None:
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 RGB image of shape (3, H, W), got {image.dtype} {tuple(image.shape)}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"the image is empty ({image.shape[2]}x{image.shape[1]} pixels)")


@torch.no_grad()
def upscale(family: Family, shared: SharedNetwork, task: str, image: torch.Tensor, tile: int | None = None,
            progress: Progress | None = None) -> torch.Tensor:
    """Super-resolve a uint8 (3, H, W) image with SISR ``task``, in ``tile`` x ``tile`` tiles when given (or when
    the image is larger than :data:`AUTO_TILE` squared); each tile sees a margin of :func:`receptive_margin` pixels.
    """
    _check_image(image)
    if not isinstance(family, Upscaler):
        raise ValueError(f"family {family.name!r} does not upscale images; its tasks restore them otherwise")
    shared.task_index(task)
    scale = family.scale(task)
    tile = resolve_tile(image.shape[1], image.shape[2], tile)
    margin = receptive_margin(shared.model)
    _, h, w = image.shape
    out = torch.empty(3, h * scale, w * scale, dtype=torch.uint8)
    for top, left, th, tw in tiles(h, w, tile):
        t0, l0 = max(0, top - margin), max(0, left - margin)
        t1, l1 = min(h, top + th + margin), min(w, left + tw + margin)
        lr = image[None, :, t0:t1, l0:l1].float().div(255).to(shared.device)
        sr = quantize(shared(task, lr))[0].mul(255).round().to(torch.uint8).cpu()
        y, x = (top - t0) * scale, (left - l0) * scale
        out[:, top * scale : (top + th) * scale, left * scale : (left + tw) * scale] = sr[:, y : y + th * scale,
                                                                                         x : x + tw * scale]
        if progress:
            progress(1)
    return out


@torch.no_grad()
def encode(family: Family, shared: SharedNetwork, task: str, image: torch.Tensor, model: str = "",
           tile: int | None = None, progress: Progress | None = None) -> bytes:
    """Entropy-code a uint8 (3, H, W) image with NIC ``task``: the pngrow bitstream, tiles coded independently."""
    _check_image(image)
    if not isinstance(family, Codec):
        raise ValueError(f"family {family.name!r} does not compress images; its tasks restore them otherwise")
    shared.task_index(task)
    tile = resolve_tile(image.shape[1], image.shape[2], tile)
    if tile is not None and tile % 64:
        raise ValueError(f"NIC tile {tile!r} is not a multiple of 64, the codec's stride")
    _, h, w = image.shape
    header = {"family": family.name, "task": task, "fingerprint": shared.fingerprint(task), "model": model,
              "height": h, "width": w, "tile": tile}
    body = bytearray()
    for top, left, th, tw in tiles(h, w, tile):
        x = image[None, :, top : top + th, left : left + tw].float().div(255).to(shared.device)
        coded = family.compress(shared, task, x)
        body += struct.pack("<HHB", *coded["shape"], len(coded["strings"]))
        for strings in coded["strings"]:
            body += struct.pack("<I", len(strings[0])) + strings[0]
        if progress:
            progress(1)
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + bytes(body)


_HEADER_FIELDS = ("family", "task", "fingerprint", "model", "height", "width", "tile")


def read_header(data: bytes) -> dict:
    """The JSON header of a pngrow bitstream (family, task, fingerprint, model, height, width, tile).

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
    return header


def _read_tile(data: bytes, offset: int) -> tuple[dict, int]:
    """One tile's CompressAI strings and latent shape at ``offset``, and the offset after them."""
    zh, zw, count = struct.unpack_from("<HHB", data, offset)
    offset += 5
    strings = []
    for _ in range(count):
        (size,) = struct.unpack_from("<I", data, offset)
        if offset + 4 + size > len(data):
            raise struct.error("short string")
        strings.append([data[offset + 4 : offset + 4 + size]])
        offset += 4 + size
    return {"strings": strings, "shape": (zh, zw)}, offset


@torch.no_grad()
def decode(family: Family, shared: SharedNetwork, data: bytes,
           progress: Progress | None = None) -> tuple[str, torch.Tensor]:
    """The task and the uint8 (3, H, W) image of a bitstream written by :func:`encode` with the same task weights."""
    if not isinstance(family, Codec):
        raise ValueError(f"family {family.name!r} does not decompress bitstreams; its tasks restore images otherwise")
    header = read_header(data)
    task = header["task"]
    if task not in shared.task_names:
        raise ValueError(f"the bitstream's task {task!r} is not one of this model's: {', '.join(shared.task_names)}")
    if shared.fingerprint(task) != header["fingerprint"]:
        raise ValueError(f"this model's task {task!r} differs from the one that wrote the bitstream "
                         f"(model {header['model'] or 'unnamed'}): it cannot decode it")
    offset = len(MAGIC) + 4 + struct.unpack_from("<I", data, len(MAGIC))[0]
    h, w = header["height"], header["width"]
    out = torch.empty(3, h, w, dtype=torch.uint8)
    try:
        for top, left, th, tw in tiles(h, w, header["tile"]):
            coded, offset = _read_tile(data, offset)
            x_hat = family.decompress(shared, task, coded, (th, tw))
            out[:, top : top + th, left : left + tw] = quantize(x_hat)[0].mul(255).round().to(torch.uint8).cpu()
            if progress:
                progress(1)
    except struct.error:
        raise ValueError("pngrow bitstream is truncated") from None
    if offset != len(data):
        raise ValueError(f"pngrow bitstream has {len(data) - offset} bytes after its last tile")
    return task, out
