"""BD-rate on CompressAI's own published Kodak results, where the answer is known independently of pngrow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pngrow.workers.metrics import bd_rate

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "compressai-kodak"


def _curve(name: str, metric: str = "psnr-rgb") -> list[tuple[float, float]]:
    results = json.loads((REFERENCE / name).read_text())["results"]
    return list(zip(results["bpp"], results[metric]))


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="needs ../shared/reference (CompressAI's published results)")
def test_published_curves_give_the_known_bd_rates() -> None:
    separate = _curve("compressai-bmshj2018-hyperprior_mse_cpu.json")
    # CompressAI's variable-rate hyperprior matches its eight separate models (its own figure: +0.04%).
    assert abs(bd_rate(separate, _curve("bmshj2018-hyperprior-vbr-ans.json"))) < 0.5
    # The same models run on CUDA code the same bits: 0 to float precision.
    assert abs(bd_rate(separate, _curve("compressai-bmshj2018-hyperprior_mse_cuda.json"))) < 0.01
    # The mean-scale hyperprior (Minnen et al. 2018) saves rate over the scale hyperprior at equal PSNR.
    assert -10.0 < bd_rate(separate, _curve("compressai-mbt2018-mean_mse_cuda.json")) < -4.0
