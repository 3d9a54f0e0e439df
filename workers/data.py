"""Images from folders (or scikit-image's bundled photos) and random training patches from them."""

from __future__ import annotations

import functools
import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "HR_FOLDER",
    "IMAGE_SUFFIXES",
    "ImageSet",
    "LR_FOLDER",
    "PatchSampler",
    "check_folder",
    "data_files",
    "decode_image",
    "default_images",
    "load_folder",
    "load_image",
    "read_shards",
    "write_shard",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# scikit-image ships these colour photographs inside the wheel, so the default job needs no download.
DEFAULT_TRAIN = ("coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
DEFAULT_EVAL = ("astronaut", "chelsea")
# The paired SR layout of EDSR's benchmark release, DIV2K and BasicSR: HR images in HR/ (or the folder itself) and
# their LR images in LR_bicubic/X2, X3, ... named like the HR image, with or without an "x2" suffix.
HR_FOLDER = "HR"
LR_FOLDER = "LR_bicubic"
_LR_SCALE = re.compile(r"X([2-9])")


@dataclass(frozen=True)
class ImageSet:
    """Named RGB images as uint8 tensors of shape (3, H, W).

    ``low_res`` maps a scale to the images' given low-resolution versions (a paired SR folder), in the same order;
    a scale missing there is made on the fly by the SISR family.
    """

    source: str
    names: tuple[str, ...]
    images: tuple[torch.Tensor, ...]
    low_res: Mapping[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def limit(self, count: int | None) -> ImageSet:
        if count is None:
            return self
        return ImageSet(self.source, self.names[:count], self.images[:count],
                        {s: lr[:count] for s, lr in self.low_res.items()})

    @functools.cached_property  # a worker process keeps its decoded sets (see pipeline.data_cache): hashed once
    def digest(self) -> str:
        """A short SHA-256 of the images' names and pixels (and any paired LR images): the same set, the same digest.

        >>> default_images("eval").digest == default_images("eval").digest != default_images("train").digest
        True
        """
        hasher = hashlib.sha256()
        pairs = [(str(s), lr) for s, lrs in sorted(self.low_res.items()) for lr in lrs]
        for name, image in [*zip(self.names, self.images), *pairs]:
            hasher.update(f"{name}:{tuple(image.shape)};".encode())
            hasher.update(image.contiguous().numpy().tobytes())
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

    Raises ``ValueError`` naming the file when it cannot be decoded.
    """
    return decode_image(path, str(path))


def decode_image(source: str | Path | io.BytesIO, name: str) -> torch.Tensor:
    """Decode an image file or encoded bytes (``name`` says which in errors) as RGB uint8 (3, H, W)."""
    try:
        with Image.open(source) as img:
            img.load()
            if img.mode not in ("RGB", "L", "RGBA"):
                img = img.convert("RGB")
            array = np.array(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {name!r}: {exc}") from None
    if array.dtype != np.uint8:
        raise ValueError(f"image {name!r} has {array.dtype} pixels; only 8-bit images are supported")
    return _to_rgb_tensor(array)


def _folder_files(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """The image files and the Parquet shards directly inside ``folder`` (or its ``HR/``), by name; at least one."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"image folder {str(folder)!r} does not exist")
    if (path / HR_FOLDER).is_dir():
        path = path / HR_FOLDER
    files = sorted(p for p in path.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    shards = [p for p in files if p.suffix.lower() == ".parquet"]
    if not images and not shards:
        raise ValueError(f"image folder {str(folder)!r} has no {'/'.join(IMAGE_SUFFIXES)} images or .parquet shards")
    return images, shards


def check_folder(folder: str | Path) -> int:
    """Check, without decoding pixels, that every image file in ``folder`` is readable; returns how many there are
    (Parquet shards counted as files). Raises ``ValueError`` naming the first bad file.

    >>> check_folder("/nonexistent")
    Traceback (most recent call last):
    ...
    ValueError: image folder '/nonexistent' does not exist
    """
    images, shards = _folder_files(folder)
    for file in images:
        try:
            with Image.open(file) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ValueError(f"cannot read image {str(file)!r}: {exc}") from None
    return len(images) + len(shards)


def data_files(folder: str | Path) -> list[Path]:
    """Every file :func:`load_folder` reads from ``folder``: its images or Parquet shards (in it or its ``HR/``) and
    the images of its ``LR_bicubic/X<s>/`` folders (a paired SR folder), nothing else.

    >>> data_files("/nonexistent")
    Traceback (most recent call last):
    ...
    ValueError: image folder '/nonexistent' does not exist
    """
    images, shards = _folder_files(folder)
    root = Path(folder) / LR_FOLDER
    scales = sorted(p for p in root.iterdir() if p.is_dir() and _LR_SCALE.fullmatch(p.name)) \
        if root.is_dir() and not shards else []
    paired = [p for sub in scales for p in sorted(sub.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return images + shards + paired


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


def read_shards(paths: list[Path]) -> list[tuple[str, torch.Tensor]]:
    """The images in Parquet shards written by :func:`write_shard`, named ``shard:name``."""
    import pyarrow.parquet as pq

    out = []
    for path in paths:
        try:
            table = pq.read_table(str(path), columns=["name", "png"])
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise ValueError(f"cannot read Parquet shard {str(path)!r} (columns name, png): {exc}") from None
        for name, data in zip(table.column("name").to_pylist(), table.column("png").to_pylist()):
            label = f"{path.name}:{name}"
            out.append((label, decode_image(io.BytesIO(data), label)))
    return out


def load_folder(folder: str | Path) -> ImageSet:
    """Every image (by suffix) and every image in Parquet shards (``*.parquet``) directly inside ``folder``.

    >>> load_folder("/nonexistent")
    Traceback (most recent call last):
    ...
    ValueError: image folder '/nonexistent' does not exist
    """
    images, shards = _folder_files(folder)
    named = [(p.name, load_image(p)) for p in images] + read_shards(shards)
    if not named:
        raise ValueError(f"image folder {str(folder)!r} has no images: its Parquet shards are empty")
    pairs = _low_res(Path(folder), images, [im for _, im in named]) if not shards else {}
    return ImageSet(str(Path(folder)), tuple(n for n, _ in named), tuple(im for _, im in named), pairs)


def _low_res(folder: Path, files: list[Path], images: list[torch.Tensor]) -> dict[int, tuple[torch.Tensor, ...]]:
    """The paired LR images of ``folder/LR_bicubic/X<s>/`` for each scale there, checked against their HR images.

    Each LR image is ``<stem>x<s><suffix>`` or ``<stem><suffix>`` and measures the HR size floor-divided by s.
    """
    root = folder / LR_FOLDER
    if not root.is_dir():
        return {}
    pairs = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and _LR_SCALE.fullmatch(p.name)):
        scale = int(sub.name[1:])
        found = []
        for file, hr in zip(files, images):
            candidates = [sub / f"{file.stem}x{scale}{file.suffix}", sub / file.name]
            lr_file = next((c for c in candidates if c.is_file()), None)
            if lr_file is None:
                raise ValueError(f"paired folder {str(folder)!r}: no LR image {str(candidates[0])!r} for {file.name!r}")
            lr = load_image(lr_file)
            want = (hr.shape[1] // scale, hr.shape[2] // scale)
            if tuple(lr.shape[1:]) != want:
                raise ValueError(f"LR image {str(lr_file)!r} is {lr.shape[2]}x{lr.shape[1]}, not {want[1]}x{want[0]} "
                                 f"(its HR image {file.name!r} divided by {scale})")
            found.append(lr)
        pairs[scale] = tuple(found)
    return pairs


def default_images(split: str) -> ImageSet:
    """scikit-image's bundled colour photographs: ``"train"`` (4) or ``"eval"`` (2)."""
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
