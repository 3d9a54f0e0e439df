"""Restore whole images with a shared model: SISR upscaling and NIC coding, in tiles where an image is large, and
the pngrow bitstream (a header naming the model, the task and the task's fingerprint, then the entropy-coded tiles,
each with the entropy-coding indexes of its latents near a scale-table boundary and the CRC-32 of all of them; the
framing is :mod:`.bitstream`'s).

A bitstream decodes with any model whose task has the same fingerprint: a model grown from the one that wrote it
decodes it bit-identically, and any other model refuses it with a one-line error.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .bitstream import MAGIC, decoding_indexes, encoded_tile, pack, read_header, resolve_tile, tile_count, tiles, \
    unpack
from .metrics import quantize
from .models import Codec, Family, Upscaler
from .png import SharedNetwork

__all__ = ["MAGIC", "decode", "encode", "read_header", "resolve_tile", "tile_count", "tiles", "upscale"]

Progress = Callable[[int], None]


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
    coded = []
    for top, left, th, tw in tiles(h, w, tile):
        x = image[None, :, top : top + th, left : left + tw].float().div(255).to(shared.device)
        compressed = family.compress(shared, task, x)
        coded.append(encoded_tile([s[0] for s in compressed["strings"]], tuple(compressed["shape"]),
                                  family.coding_indexes(shared, task, compressed)))
        if progress:
            progress(1)
    return pack(header, coded)


@torch.no_grad()
def decode(family: Family, shared: SharedNetwork, data: bytes,
           progress: Progress | None = None) -> tuple[str, torch.Tensor]:
    """The task and the uint8 (3, H, W) image of a bitstream written by :func:`encode` with the same task weights."""
    if not isinstance(family, Codec):
        raise ValueError(f"family {family.name!r} does not decompress bitstreams; its tasks restore images otherwise")
    header, coded = unpack(data)
    task = header["task"]
    if task not in shared.task_names:
        raise ValueError(f"the bitstream's task {task!r} is not one of this model's: {', '.join(shared.task_names)}")
    if shared.fingerprint(task) != header["fingerprint"]:
        raise ValueError(f"this model's task {task!r} differs from the one that wrote the bitstream "
                         f"(model {header['model'] or 'unnamed'}): it cannot decode it")
    h, w = header["height"], header["width"]
    out = torch.empty(3, h, w, dtype=torch.uint8)
    for number, (tile, (top, left, th, tw)) in enumerate(zip(coded, tiles(h, w, header["tile"]))):
        compressed = {"strings": [[s] for s in tile.strings], "shape": tile.shape}
        indexes = decoding_indexes(tile, family.coding_indexes(shared, task, compressed), number)
        x_hat = family.decompress(shared, task, compressed, (th, tw), indexes)
        out[:, top : top + th, left : left + tw] = quantize(x_hat)[0].mul(255).round().to(torch.uint8).cpu()
        if progress:
            progress(1)
    return task, out
