"""Image quality measures under the conventions of the SISR (EDSR/BasicSR) and NIC (CompressAI) literature."""

from __future__ import annotations

import math

import torch

__all__ = ["psnr", "psnr_y", "quantize", "rgb_to_y"]


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


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, border: int) -> float:
    """PSNR on the Y channel with ``border`` pixels cropped on every side (the SISR benchmark protocol)."""
    sr_y, hr_y = rgb_to_y(sr), rgb_to_y(hr)
    if border:
        sr_y, hr_y = sr_y[..., border:-border, border:-border], hr_y[..., border:-border, border:-border]
    return psnr(sr_y, hr_y)
