from __future__ import annotations

import math

import pytest
import torch
from pytorch_msssim import ms_ssim as reference_ms_ssim

from pngrow.workers.metrics import bd_rate, ms_ssim


def test_ms_ssim_equals_pytorch_msssim_where_it_applies() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 192, 200, generator=g)
    b = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert ms_ssim(a, b) == pytest.approx(float(reference_ms_ssim(a.double(), b.double(), data_range=1.0)), abs=1e-9)


def test_ms_ssim_uses_the_scales_that_fit_and_orders_distortions() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 3, 48, 48, generator=g)
    mild = (a + 0.02 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    strong = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert 1 > ms_ssim(a, mild) > ms_ssim(a, strong) > 0
    assert 0 < ms_ssim(a, mild, y_border=2) < 1
    assert math.isnan(ms_ssim(a[..., :10, :10], mild[..., :10, :10]))


def test_bd_rate_recovers_a_constant_rate_ratio_and_its_sign() -> None:
    anchor = [(0.12, 27.1), (0.25, 29.8), (0.5, 32.6), (0.9, 35.0)]
    assert bd_rate(anchor, anchor) == pytest.approx(0.0, abs=1e-9)
    assert bd_rate(anchor, [(1.2 * r, q) for r, q in anchor]) == pytest.approx(20.0)
    better = [(r, q + 0.5) for r, q in anchor]  # same rates, higher quality: fewer bits at equal quality
    assert bd_rate(anchor, better) < 0


def test_bd_rate_of_disjoint_curves_is_nan_and_bad_points_are_named() -> None:
    assert math.isnan(bd_rate([(0.1, 20.0), (0.2, 22.0)], [(0.1, 30.0), (0.2, 32.0)]))
    assert math.isnan(bd_rate([(0.1, 20.0), (0.2, 22.0), (0.4, 21.0)], [(0.1, 20.0), (0.2, 21.0), (0.4, 23.0)]))
    with pytest.raises(ValueError, match="at least two points"):
        bd_rate([(0.1, 20.0)], [(0.1, 20.0), (0.2, 21.0)])
    with pytest.raises(ValueError, match="positive rates"):
        bd_rate([(0.0, 20.0), (0.2, 22.0)], [(0.1, 20.0), (0.2, 21.0)])
