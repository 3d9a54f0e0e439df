"""`pngrow eval`: a shared model's figures on an image folder, written in the formats the field's own tools read.

NIC models give CompressAI's ``eval_model`` results (``python -m compressai.utils.plot`` draws them beside
CompressAI's published curves); SISR models give PSNR-Y and SSIM-Y per scale as BasicSR reports them.

>>> sorted(codec_results("pngrow", "demo", [])["results"])
['bpp', 'decoding_time', 'encoding_time', 'ms-ssim-rgb', 'psnr-rgb']
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..workers.data import ImageSet
from ..workers.metrics import ms_ssim, psnr, psnr_y, ssim_y
from ..workers.models import Codec, Upscaler
from .api import RestorationModel

__all__ = ["CODEC_KEYS", "RateFigures", "codec_results", "evaluate", "measure_codec", "measure_upscaler", "rate_order"]

# CompressAI's eval_model result keys, in its order; plot reads "bpp" and "<metric>-rgb".
CODEC_KEYS = ("psnr-rgb", "ms-ssim-rgb", "bpp", "encoding_time", "decoding_time")


@dataclass(frozen=True)
class RateFigures:
    """One rate's figures averaged over the images, as CompressAI's eval_model averages them."""

    task: str
    lmbda: float
    figures: dict[str, float]  # CODEC_KEYS


def _float(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255)


def _array(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).contiguous().numpy()


def rate_order(rates: list[RateFigures]) -> list[RateFigures]:
    """Rates from the lowest lambda (rate) up, as CompressAI lists them."""
    return sorted(rates, key=lambda r: r.lmbda)


def measure_codec(model: RestorationModel, images: ImageSet) -> list[RateFigures]:
    """Code and decode every image at every rate through the pngrow bitstream, timing each; rates by lambda."""
    rates = []
    for task in model.tasks:
        sums = dict.fromkeys(CODEC_KEYS, 0.0)
        for image in images.images:
            array = _array(image)
            start = time.perf_counter()
            data = model.compress(array, task)
            middle = time.perf_counter()
            decoded = model.decompress(data)
            end = time.perf_counter()
            x, y = _float(array), _float(decoded)
            sums["psnr-rgb"] += psnr(x, y)
            sums["ms-ssim-rgb"] += ms_ssim(x, y)
            sums["bpp"] += len(data) * 8 / (array.shape[0] * array.shape[1])
            sums["encoding_time"] += middle - start
            sums["decoding_time"] += end - middle
        rates.append(RateFigures(task, model.family.rd_lambda(task), {k: v / len(images) for k, v in sums.items()}))
    return rate_order(rates)


def codec_results(name: str, description: str, rates: list[RateFigures]) -> dict[str, Any]:
    """CompressAI's eval_model JSON: ``name``, ``description`` and ``results`` (a list per key, one entry per rate
    in rate order; a figure not measured is null); pngrow's task names ride along under ``tasks``, which
    CompressAI's tools ignore."""
    def value(figure: float | None) -> float | None:  # not measured (NaN or missing): JSON null
        return None if figure is None or math.isnan(figure) else figure

    return {"name": name, "description": description,
            "results": {key: [value(r.figures.get(key)) for r in rates] for key in CODEC_KEYS},
            "tasks": [r.task for r in rates]}


def measure_upscaler(model: RestorationModel, images: ImageSet) -> dict[str, dict[str, float]]:
    """PSNR-Y and SSIM-Y per scale with the border cropped by the scale (BasicSR's ``calculate_psnr/ssim`` with
    ``test_y_channel=True, crop_border=scale``); LR images from the folder's pairs, else bicubic on the fly."""
    from ..workers.models.sisr import bicubic_downscale

    if not isinstance(model.family, Upscaler):
        raise ValueError(f"{model.family.name} models do not upscale")
    per_task = {}
    for task in model.tasks:
        scale = model.family.scale(task)
        given = images.low_res.get(scale)
        psnrs, ssims = [], []
        for index, image in enumerate(images.images):
            h, w = (image.shape[1] // scale) * scale, (image.shape[2] // scale) * scale
            hr = image[None, :, :h, :w].float().div(255)
            lr = given[index][None].float().div(255) if given else bicubic_downscale(hr, scale)
            sr = _float(model.upscale(_array((lr[0] * 255).round().to(torch.uint8)), task))
            psnrs.append(psnr_y(sr, hr, scale))
            ssims.append(ssim_y(sr, hr, scale))
        per_task[task] = {"scale": scale, "psnr_y": sum(psnrs) / len(psnrs), "ssim_y": sum(ssims) / len(ssims)}
    return per_task


def evaluate(model: RestorationModel, images: ImageSet, name: str) -> dict[str, Any]:
    """The results document of ``model`` on ``images``: CompressAI's format for a codec, BasicSR's figures for SR."""
    if isinstance(model.family, Codec):
        description = f"pngrow {model.version} on {images.source} ({len(images)} images)"
        return codec_results(name, description, measure_codec(model, images))
    return {"name": name, "dataset": images.source, "images": len(images), "protocol": images.protocol,
            "metrics": "PSNR-Y / SSIM-Y (BT.601 luma, border cropped by the scale), as BasicSR reports them",
            "results": measure_upscaler(model, images)}
