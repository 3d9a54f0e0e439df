"""Image quality measures under the conventions of the SISR (EDSR/BasicSR) and NIC (CompressAI) literature."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["bd_rate", "ms_ssim", "psnr", "psnr_y", "quantize", "rgb_to_y", "ssim_y"]

# Wang, Simoncelli and Bovik (2003): the weights of the five MS-SSIM scales, finest first.
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_WINDOW = 11


def quantize(image: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8-bit levels, as a saved image would be."""
    return image.clamp(0, 1).mul(255).round().div(255)


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    """PSNR in dB over all pixels and channels.

    >>> round(psnr(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.1)), 2)
    20.0
    """
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def rgb_to_y(image: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of RGB in [0, 1], in [16/255, 235/255] (MATLAB's rgb2ycbcr, as EDSR and BasicSR use)."""
    weights = image.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)
    return (image * weights).sum(1, keepdim=True) / 255.0 + 16.0 / 255.0


def _crop_y(sr: torch.Tensor, hr: torch.Tensor, border: int) -> tuple[torch.Tensor, torch.Tensor]:
    sr_y, hr_y = rgb_to_y(sr), rgb_to_y(hr)
    if border:
        sr_y, hr_y = sr_y[..., border:-border, border:-border], hr_y[..., border:-border, border:-border]
    return sr_y, hr_y


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, border: int) -> float:
    """PSNR on the Y channel with ``border`` pixels cropped on every side (the SISR benchmark protocol)."""
    return psnr(*_crop_y(sr, hr, border))


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, border: int) -> float:
    """SSIM on the Y channel (0-255) with ``border`` pixels cropped, as BasicSR's ``calculate_ssim`` with
    ``test_y_channel=True``: an 11x11 Gaussian window of sigma 1.5, 'valid' filtering, the mean over the map.
    (1, 3, H, W) images in [0, 1].

    >>> x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    >>> ssim_y(x, x, 2)
    1.0
    """
    from skimage.metrics import structural_similarity

    a, b = (y[0, 0].double().mul(255).numpy() for y in _crop_y(sr, hr, border))
    return float(structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                       data_range=255))


def ms_ssim(a: torch.Tensor, b: torch.Tensor, y_border: int | None = None) -> float:
    """MS-SSIM (Wang et al. 2003; pytorch-msssim, as CompressAI reports it) of (N, C, H, W) images in [0, 1].

    ``y_border`` measures the Y channel with that border cropped (the SISR protocol) instead of RGB. Images too small
    for five scales of the 11-pixel window (176 pixels) use the scales that fit, their weights renormalised; images
    under 11 pixels give NaN.

    >>> x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    >>> ms_ssim(x, x)
    1.0
    """
    # pytorch-msssim's own ms_ssim refuses images under 161 pixels; its per-scale SSIM is reused with fewer scales.
    from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

    if y_border is not None:
        a, b = _crop_y(a, b, y_border)
    a, b = a.double(), b.double()
    scales = sum(1 for k in range(len(_MS_SSIM_WEIGHTS)) if min(a.shape[-2:]) >= _WINDOW * 2**k)
    if scales == 0:
        return math.nan
    weights = a.new_tensor(_MS_SSIM_WEIGHTS[:scales])
    if scales < len(_MS_SSIM_WEIGHTS):
        weights = weights / weights.sum()
    window = _fspecial_gauss_1d(_WINDOW, 1.5).repeat([a.shape[1], 1, 1, 1]).to(a)
    factors = []
    for level in range(scales):
        ssim, contrast = _ssim(a, b, data_range=1.0, win=window, size_average=False)
        if level < scales - 1:
            factors.append(torch.relu(contrast))
            padding = [s % 2 for s in a.shape[2:]]
            a, b = F.avg_pool2d(a, 2, padding=padding), F.avg_pool2d(b, 2, padding=padding)
    values = torch.prod(torch.stack([*factors, torch.relu(ssim)]) ** weights.view(-1, 1, 1), dim=0)
    return round(float(values.mean()), 12)


def bd_rate(anchor: Sequence[tuple[float, float]], test: Sequence[tuple[float, float]]) -> float:
    """Bjontegaard delta rate in percent: the average rate change of ``test`` against ``anchor`` at equal quality.

    Each curve is (rate, quality) points, e.g. (bpp, PSNR). Computed by the ``bjontegaard`` package (log-rate
    interpolated over quality piecewise cubically, ``method="pchip"``, and integrated over the quality range both
    curves cover). Negative is better. NaN, refused here before the package sees it, when the quality ranges do not
    overlap or a curve's quality does not rise strictly with its rate (e.g. an undertrained codec).

    >>> anchor = [(0.2, 28.0), (0.4, 31.0), (0.7, 33.5), (1.1, 35.5)]
    >>> round(bd_rate(anchor, [(0.9 * r, q) for r, q in anchor]), 6)
    -10.0
    """
    import bjontegaard

    if min(len(anchor), len(test)) < 2:
        raise ValueError(f"BD-rate needs at least two points per curve, got {len(anchor)} and {len(test)}")
    curves = []
    for points in (anchor, test):
        rates, quality = np.array(points, dtype=float).T
        if (rates <= 0).any() or not np.isfinite(quality).all():
            raise ValueError(f"BD-rate needs positive rates and finite qualities, got {list(points)}")
        order = np.argsort(rates)
        if (np.diff(quality[order]) <= 0).any():
            return math.nan
        curves.append((rates[order], quality[order]))
    (rate_a, quality_a), (rate_t, quality_t) = curves
    if max(quality_a.min(), quality_t.min()) >= min(quality_a.max(), quality_t.max()):
        return math.nan
    return float(bjontegaard.bd_rate(rate_a, quality_a, rate_t, quality_t, method="pchip",
                                     require_matching_points=False, min_overlap=0))
