"""Image measures computed without pngrow (numpy, PIL, scikit-image, pytorch-msssim), for tests to check pngrow's
figures against: H x W x 3 uint8 images in, the literature's conventions (BT.601 luma in [16, 235], a border of
``scale`` pixels cropped for SISR, 8-bit rounding of every image a user would save)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from pytorch_msssim import ms_ssim
from skimage.metrics import structural_similarity


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (or luma planes on the 0-255 scale)."""
    return float(10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an H x W x 3 image on the 0-255 scale (MATLAB's rgb2ycbcr)."""
    return 16 + rgb.astype(np.float64) @ np.array([65.481, 128.553, 24.966]) / 255


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """PSNR of the luma planes with ``border`` pixels cropped on every side."""
    crop = (slice(border, -border or None), slice(border, -border or None))
    return psnr(luma(sr)[crop], luma(hr)[crop])


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """SSIM of the luma planes as BasicSR reports it: scikit-image's, 11x11 Gaussian window of sigma 1.5."""
    crop = (slice(border, -border or None), slice(border, -border or None))
    return float(structural_similarity(luma(sr)[crop], luma(hr)[crop], gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=255))


def ms_ssim_rgb(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM of two RGB images as CompressAI reports it (pytorch-msssim, five scales: sides of 161 pixels up)."""
    to_tensor = lambda x: torch.from_numpy(x.astype(np.float64) / 255).permute(2, 0, 1)[None]  # noqa: E731
    return float(ms_ssim(to_tensor(a), to_tensor(b), data_range=1.0))


def bicubic_down(hr: np.ndarray, scale: int) -> np.ndarray:
    """PIL's antialiased bicubic downscaling by ``scale`` of an image cropped to a multiple of it, rounded to uint8
    (each channel in floating point: no rounding in between)."""
    h, w = hr.shape[0] // scale, hr.shape[1] // scale
    channels = [np.asarray(Image.fromarray(hr[: h * scale, : w * scale, c].astype(np.float32), mode="F").resize(
        (w, h), Image.BICUBIC)) for c in range(3)]
    return np.clip(np.round(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _bicubic_up_axis(image: np.ndarray, scale: int, axis: int) -> np.ndarray:
    size = image.shape[axis]
    source = (np.arange(size * scale) + 0.5) / scale - 0.5  # pixel centres aligned
    left = np.floor(source).astype(int)
    out = np.zeros(image.shape[:axis] + (size * scale,) + image.shape[axis + 1:])
    for offset in (-1, 0, 1, 2):
        taps = np.take(image.astype(np.float64), np.clip(left + offset, 0, size - 1), axis=axis)  # edges repeated
        weight = _cubic(source - (left + offset))
        out += taps * weight.reshape([-1 if d == axis else 1 for d in range(image.ndim)])
    return out


def bicubic_up(lr: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic upscaling (a = -0.75, as PyTorch's and MATLAB's) of an H x W x 3 image, rounded to uint8."""
    up = _bicubic_up_axis(_bicubic_up_axis(lr, scale, 0), scale, 1)
    return np.clip(np.round(up), 0, 255).astype(np.uint8)
