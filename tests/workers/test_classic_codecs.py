"""JPEG and WebP measured as pngrow measures its codecs (``workers/classic_codecs.py``), against computations made
here with Pillow and NumPy alone."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from pngrow.workers.classic_codecs import CLASSIC_CODECS, ClassicCodec, CurvePoint, psnr_at_rate


def _photos() -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
            for a in (skimage.data.astronaut()[:256, :320], skimage.data.chelsea()[:240, :300])]


@pytest.mark.parametrize("name", ["jpeg", "webp"])
def test_a_quality_setting_is_measured_from_the_real_file(name: str) -> None:
    codec = CLASSIC_CODECS[name]
    if not codec.available:
        pytest.skip(f"this Pillow cannot write {codec.format}")
    images = _photos()
    point = codec.measure(images, 40)
    bpps, psnrs = [], []
    for image in images:  # Pillow and NumPy alone
        array = image.permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=codec.format, quality=40)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")).astype(np.float64)
        bpps.append(8 * len(buffer.getvalue()) / (array.shape[0] * array.shape[1]))
        psnrs.append(10 * math.log10(255**2 / np.mean((decoded - array) ** 2)))
    assert point.bpp == pytest.approx(np.mean(bpps), rel=1e-12) == codec.bpp(images, 40)
    assert point.psnr == pytest.approx(np.mean(psnrs), rel=1e-6)  # pngrow divides by 255 in float32 first
    assert 0.5 < point.ms_ssim < 1 and 20 < point.psnr < 45


def test_a_curve_spans_the_asked_rates_with_one_point_beyond_each_end(monkeypatch: pytest.MonkeyPatch) -> None:
    codec, images = CLASSIC_CODECS["jpeg"], _photos()
    scored = []
    measure = ClassicCodec.measure
    monkeypatch.setattr(ClassicCodec, "measure", lambda self, *a: scored.append(a[1]) or measure(self, *a))
    points = codec.curve(images, 0.5, 1.0)
    assert scored == [p.quality for p in points]  # the bisection reads file sizes; only the curve is scored
    rates = [p.bpp for p in points]
    assert [p.quality for p in points] == sorted(p.quality for p in points) and rates == sorted(rates)
    assert rates[0] < 0.5 and rates[-1] >= 1.0 and 4 <= len(points) <= 12
    assert rates[1] >= 0.5  # only one point below the span
    for point in points[1:-1]:
        assert point == codec.measure(images, point.quality)


def test_the_psnr_at_a_rate_is_read_off_the_curve_and_nan_off_it() -> None:
    curve = [CurvePoint(10, 0.2, 25.0, 0.9), CurvePoint(30, 0.6, 31.0, 0.95), CurvePoint(20, 0.4, 28.0, 0.93)]
    assert psnr_at_rate(curve, 0.3) == pytest.approx(26.5)
    assert psnr_at_rate(curve, 0.5) == pytest.approx(29.5)
    assert math.isnan(psnr_at_rate(curve, 0.1)) and math.isnan(psnr_at_rate(curve, 0.7))
    assert math.isnan(psnr_at_rate([], 0.3))
