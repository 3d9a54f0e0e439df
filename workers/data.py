"""Images from folders (decoded once per node, see :mod:`.decoded`) or scikit-image's bundled photos, and random
training patches from them."""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .decoded import (HR_FOLDER, IMAGE_SUFFIXES, LR_FOLDER, cache_folder, check_image_size, decode_array, decoded_set,
                      folder_files, pixel_digest)

__all__ = [
    "HR_FOLDER",
    "IMAGE_SUFFIXES",
    "ImageSet",
    "LR_FOLDER",
    "PatchSampler",
    "check_folder",
    "default_images",
    "load_folder",
    "load_image",
    "write_shard",
]

# scikit-image ships these colour photographs inside the wheel, so the default job needs no download.
DEFAULT_TRAIN = ("coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
DEFAULT_EVAL = ("astronaut", "chelsea")


@dataclass(frozen=True)
class ImageSet:
    """Named RGB images as uint8 tensors of shape (3, H, W).

    ``low_res`` maps a scale to the images' given low-resolution versions (a paired SR folder), in the same order;
    a scale missing there is made on the fly by the SISR family. ``image_digests`` and ``low_res_digests`` hold each
    image's :func:`~.decoded.pixel_digest` where the node's cache gives them (else they are hashed when asked for).
    """

    source: str
    names: tuple[str, ...]
    images: tuple[torch.Tensor, ...]
    low_res: Mapping[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    image_digests: tuple[str, ...] = ()
    low_res_digests: Mapping[int, tuple[str, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def limit(self, count: int | None) -> ImageSet:
        if count is None:
            return self
        return ImageSet(self.source, self.names[:count], self.images[:count],
                        {s: lr[:count] for s, lr in self.low_res.items()}, self.image_digests[:count],
                        {s: d[:count] for s, d in self.low_res_digests.items()})

    @functools.cached_property
    def digest(self) -> str:
        """A short SHA-256 of the images' names, shapes and pixels (and any paired LR images'): the same set, the
        same digest, however it was loaded.

        >>> default_images("eval").digest == default_images("eval").digest != default_images("train").digest
        True
        """
        hasher = hashlib.sha256()
        images = self.image_digests or tuple(pixel_digest(im.numpy()) for im in self.images)
        records = list(zip(self.names, self.images, images))
        for scale, lrs in sorted(self.low_res.items()):
            given = self.low_res_digests.get(scale) or tuple(pixel_digest(lr.numpy()) for lr in lrs)
            records += [(str(scale), lr, digest) for lr, digest in zip(lrs, given)]
        for name, image, digest in records:
            hasher.update(f"{name}:{tuple(image.shape)}:{digest};".encode())
        return hasher.hexdigest()[:16]

    @property
    def protocol(self) -> str:
        """How SISR inputs are made: from the folder's paired LR images, or by bicubic downscaling on the fly."""
        scales = ",".join(f"x{s}" for s in sorted(self.low_res))
        return f"paired {LR_FOLDER} ({scales})" if self.low_res else "bicubic on the fly (antialiased)"


def _to_rgb_tensor(array: np.ndarray) -> torch.Tensor:
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file as RGB uint8 (3, H, W); grey is replicated and alpha dropped.

    Raises ``ValueError`` naming the file when it cannot be decoded or is over
    :data:`~.decoded.MAX_PIXELS` pixels.
    """
    return torch.from_numpy(decode_array(path, str(path)))


def check_folder(folder: str | Path) -> int:
    """Check, without decoding pixels, that every image file in ``folder`` is readable and at most
    :data:`~.decoded.MAX_PIXELS` pixels; returns how many there are (Parquet shards counted as files). Raises
    ``ValueError`` naming the first bad file.

    >>> check_folder("/nonexistent")
    Traceback (most recent call last):
    ...
    ValueError: image folder '/nonexistent' does not exist
    """
    images, shards = folder_files(folder)
    for file in images:
        try:
            with Image.open(file) as img:
                check_image_size(img.size, str(file))
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ValueError(f"cannot read image {str(file)!r}: {exc}") from None
    return len(images) + len(shards)


def write_shard(images: ImageSet, path: str | Path) -> Path:
    """Store ``images`` as one Parquet shard: a row per image, columns ``name`` and ``png`` (lossless bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pngs = []
    for image in images.images:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"name": list(images.names), "png": pngs}), str(path))
    return Path(path)


def load_folder(folder: str | Path, cache: str | Path | None = None, source: str | None = None) -> ImageSet:
    """Every image (by suffix) and every image in Parquet shards (``*.parquet``) directly inside ``folder`` (or its
    ``HR/``), with a paired SR folder's ``LR_bicubic/X<s>/`` images, decoded once per node into the cache folder
    ``cache`` (see :func:`~.decoded.cache_folder`) and mapped from there. ``source`` names the set (default: the
    folder).

    >>> load_folder("/nonexistent")
    Traceback (most recent call last):
    ...
    ValueError: image folder '/nonexistent' does not exist
    """
    folder_files(folder)  # a missing or empty folder is named before the cache is touched
    decoded = decoded_set(folder, cache_folder(cache))
    tensors = lambda arrays: tuple(torch.from_numpy(a) for a in arrays)  # noqa: E731 - views, no copy
    return ImageSet(source or str(Path(folder)), decoded.names, tensors(decoded.images),
                    {s: tensors(arrays) for s, (arrays, _) in decoded.low_res.items()}, decoded.digests,
                    {s: digests for s, (_, digests) in decoded.low_res.items()})


@functools.lru_cache(maxsize=2)
def default_images(split: str) -> ImageSet:
    """scikit-image's bundled colour photographs: ``"train"`` (4) or ``"eval"`` (2); decoded once per process.

    >>> default_images("eval") is default_images("eval")
    True
    """
    import skimage.data

    names = {"train": DEFAULT_TRAIN, "eval": DEFAULT_EVAL}[split]
    return ImageSet(f"skimage.data ({split})", names, tuple(_to_rgb_tensor(getattr(skimage.data, n)()) for n in names))


class PatchSampler:
    """Random square patches (random position, flips and 90-degree turns) from an image set, as floats in [0, 1].

    Images smaller than ``patch``, the largest patch that will be asked for, are left out; :attr:`skipped` names them.

    >>> PatchSampler(default_images("eval"), patch=64).sample(2, 48).shape
    torch.Size([2, 3, 48, 48])
    """

    def __init__(self, images: ImageSet, patch: int, seed: int = 0) -> None:
        usable = [(n, im) for n, im in zip(images.names, images.images) if min(im.shape[1:]) >= patch]
        self.skipped = tuple(n for n, im in zip(images.names, images.images) if min(im.shape[1:]) < patch)
        if not usable:
            raise ValueError(f"no image in {images.source!r} is at least {patch}x{patch} pixels, the patch size")
        self.images = [im for _, im in usable]
        self.patch = patch
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, batch_size: int, patch: int) -> torch.Tensor:
        if patch > self.patch:
            raise ValueError(f"patch {patch} is larger than the sampler's {self.patch}")
        p, g = patch, self.generator
        out = torch.empty(batch_size, 3, p, p, dtype=torch.uint8)
        for i in range(batch_size):
            image = self.images[int(torch.randint(len(self.images), (1,), generator=g))]
            top = int(torch.randint(image.shape[1] - p + 1, (1,), generator=g))
            left = int(torch.randint(image.shape[2] - p + 1, (1,), generator=g))
            crop = image[:, top : top + p, left : left + p]
            if bool(torch.randint(2, (1,), generator=g)):
                crop = crop.flip(2)
            out[i] = torch.rot90(crop, int(torch.randint(4, (1,), generator=g)), dims=(1, 2))
        return out.float() / 255.0
