"""The codecs a learned codec must beat: JPEG and WebP as Pillow writes them, measured as pngrow measures its own
(the same images, PSNR and MS-SSIM on RGB, bits per pixel from the real files).

>>> import torch
>>> image = torch.full((3, 256, 256), 128, dtype=torch.uint8)
>>> point = CLASSIC_CODECS["jpeg"].measure([image], 75)
>>> point.quality, point.psnr > 40, 0 < point.bpp < 1
(75, True, True)
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, features

from .metrics import ms_ssim, psnr

__all__ = ["CLASSIC_CODECS", "ClassicCodec", "CurvePoint", "psnr_at_rate", "psnr_at_rates"]


@dataclass(frozen=True)
class CurvePoint:
    """One quality setting of a classic codec, averaged over images as CompressAI averages its results."""

    quality: int
    bpp: float
    psnr: float
    ms_ssim: float


@dataclass(frozen=True)
class ClassicCodec:
    """A Pillow image format at a quality setting: JPEG (libjpeg's default 4:2:0 chroma, standard tables) or WebP
    (lossy, libwebp's defaults)."""

    name: str
    format: str
    qualities: tuple[int, ...] = tuple(range(1, 96))  # the settings a curve is drawn from

    @property
    def available(self) -> bool:
        """Whether this Pillow was built with the format (WebP is optional)."""
        return features.check({"JPEG": "jpg", "WEBP": "webp"}[self.format])

    def code(self, image: torch.Tensor, quality: int) -> tuple[int, torch.Tensor]:
        """The file's size in bytes and the decoded image, for a uint8 (3, H, W) image at ``quality``."""
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format=self.format, quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        return buffer.tell(), torch.from_numpy(decoded.copy()).permute(2, 0, 1)

    def measure(self, images: Sequence[torch.Tensor], quality: int) -> CurvePoint:
        """Mean bpp, PSNR and MS-SSIM of ``images`` coded at ``quality``."""
        bpps, psnrs, similarity = [], [], []
        for image in images:
            size, decoded = self.code(image, quality)
            x, y = image[None].float().div(255), decoded[None].float().div(255)
            bpps.append(8 * size / (image.shape[1] * image.shape[2]))
            psnrs.append(psnr(y, x))
            similarity.append(ms_ssim(y, x))
        n = len(bpps)
        return CurvePoint(quality, sum(bpps) / n, sum(psnrs) / n, sum(similarity) / n)

    def bpp(self, images: Sequence[torch.Tensor], quality: int) -> float:
        """Mean bits per pixel of ``images`` coded at ``quality``: the files only, nothing decoded or scored."""
        return sum(8 * self.code(image, quality)[0] / (image.shape[1] * image.shape[2]) for image in images) / len(images)

    def curve(self, images: Sequence[torch.Tensor], low_bpp: float, high_bpp: float) -> list[CurvePoint]:
        """The codec's points whose mean bpp spans [``low_bpp``, ``high_bpp``], with one point beyond each end
        where the codec reaches it (two points at least), by rising quality. Bisects the quality settings on their
        files' sizes alone; only the chosen points are decoded and scored."""
        rates: dict[int, float] = {}

        def rate(quality: int) -> float:
            if quality not in rates:
                rates[quality] = self.bpp(images, quality)
            return rates[quality]

        def first_at_least(bpp: float) -> int:  # the lowest quality index whose bpp reaches ``bpp`` (bpp rises)
            low, high = 0, len(self.qualities) - 1
            while low < high:
                middle = (low + high) // 2
                low, high = (middle + 1, high) if rate(self.qualities[middle]) < bpp else (low, middle)
            return low

        end = max(1, min(len(self.qualities) - 1, first_at_least(high_bpp)))  # two points at least: a curve
        start = max(0, min(first_at_least(low_bpp) - 1, end - 1))
        step = max(1, (end - start) // 8)  # about ten points along the span
        chosen = sorted({*range(start, end + 1, step), end})
        return [self.measure(images, self.qualities[i]) for i in chosen]


CLASSIC_CODECS = {"jpeg": ClassicCodec("jpeg", "JPEG"), "webp": ClassicCodec("webp", "WEBP")}


def psnr_at_rate(points: Sequence[CurvePoint], bpp: float) -> float:
    """The PSNR a classic codec's curve reaches at ``bpp`` (linear between its points; NaN outside them).

    >>> psnr_at_rate([CurvePoint(10, 0.2, 25.0, 0.9), CurvePoint(20, 0.4, 28.0, 0.95)], 0.3)
    26.5
    """
    rates = [p.bpp for p in points]
    if not points or not min(rates) <= bpp <= max(rates):
        return float("nan")
    ordered = sorted(points, key=lambda p: p.bpp)
    return float(np.interp(bpp, [p.bpp for p in ordered], [p.psnr for p in ordered]))


def psnr_at_rates(codec: str, images: Sequence[torch.Tensor], rates: dict[str, float]) -> dict[str, float]:
    """The PSNR classic ``codec`` reaches on ``images`` at each named bpp (a learned codec's tasks' rates, say):
    what the same bits buy with it. NaN where it cannot reach that rate."""
    points = CLASSIC_CODECS[codec].curve(images, min(rates.values()), max(rates.values()))
    return {name: psnr_at_rate(points, bpp) for name, bpp in rates.items()}
