from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pngrow.workers.data import ImageSet
from pngrow.workers.models import get_family
from pngrow.workers.models.nic import lambda_of
from pngrow.workers.png import load_shared, save_shared
from pngrow.workers.settings import TaskSettings
from pngrow.workers.training import train_shared
from tests import reference


def _images() -> ImageSet:
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 9, 10, generator=g), size=(70, 80), mode="bilinear")
    return ImageSet("random", ("a", "b"), tuple((smooth[i] * 255).round().to(torch.uint8) for i in range(2)))


@pytest.fixture(scope="module")
def tiny_job():
    family = get_family("nic", ["q6", "q2"], N=8, M=8, patch=64)
    settings = [TaskSettings(grow_steps=4, prune_steps=2, finetune_steps=2, batch_size=2, lr=1e-3)] * 2
    images = _images()
    return family, train_shared(family, settings, images, images, log=lambda m: None), images


def test_rate_names() -> None:
    assert lambda_of("q1") == 0.0018 and lambda_of("lambda=1e-3") == 0.001
    for bad in ("q9", "q0", "lambda=-1", "0.01"):
        with pytest.raises(ValueError, match=f"NIC task {bad!r}"):
            lambda_of(bad)
    with pytest.raises(ValueError, match="unknown NIC codec 'cheng'"):
        get_family("nic", codec="cheng")


def test_compressai_is_imported_only_when_a_codec_is_built() -> None:
    """Importing CompressAI costs seconds (it loads torch_geometric and scipy.stats): a SISR driver or trial worker
    does without it, and a NIC model still builds with every codec."""
    script = (
        "import sys\n"
        "import pngrow.pipeline.search, pngrow.pipeline.trial\n"
        "from pngrow.workers.models import get_family\n"
        "get_family('sisr', width=8, depth=1).build_shared()\n"
        "print('compressai' in sys.modules)\n"
        "for codec in ('scale-hyperprior', 'mean-scale-hyperprior'):\n"
        "    print(type(get_family('nic', codec=codec, N=8, M=8).build_model()).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "ScaleHyperprior", "MeanScaleHyperprior"]


def test_bpp_is_counted_from_real_bitstreams_per_task(tiny_job) -> None:
    family, result, images = tiny_job
    shared = result.shared
    metrics = result.final_metrics
    for task in family.tasks:
        assert set(metrics[task]) == {"psnr", "ms_ssim", "bpp", "rd_loss"}
        # bpp and PSNR are the mean over the evaluation images of 8 x the bitstream's bytes (CompressAI's strings,
        # latent and hyper-latent) per pixel of the image, and of its decoded image's PSNR, computed here
        bpp, psnr = [], []
        for image in images.images:
            x = image[None].float() / 255
            coded = family.compress(shared, task, x)
            num_bytes = sum(len(s) for strings in coded["strings"] for s in strings)
            bpp.append(8 * num_bytes / (image.shape[1] * image.shape[2]))
            decoded = family.decompress(shared, task, coded, x.shape[-2:])
            assert decoded.shape == x.shape
            pixels = decoded[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
            psnr.append(reference.psnr(pixels, image.permute(1, 2, 0).numpy()))
        assert metrics[task]["bpp"] == pytest.approx(np.mean(bpp), rel=1e-12) and min(bpp) > 0
        assert metrics[task]["psnr"] == pytest.approx(np.mean(psnr), abs=1e-6)


def test_each_rate_has_its_own_entropy_model(tiny_job) -> None:
    family, result, _ = tiny_job
    shared = result.shared
    quantiles = {t.name: t.local_state["entropy_bottleneck.quantiles"] for t in shared.tasks}
    assert not torch.equal(quantiles["q6"], quantiles["q2"])
    assert all(t.local_state["entropy_bottleneck._quantized_cdf"].numel() > 0 for t in shared.tasks)


def test_bitstreams_survive_save_and_load(tiny_job, tmp_path) -> None:
    family, result, images = tiny_job
    image = images.images[1][None].float() / 255
    save_shared(result.shared, tmp_path, family.architecture())
    loaded = load_shared(tmp_path, lambda arch: get_family("nic", arch["tasks"], N=arch["N"], M=arch["M"]).build_model())
    loaded.eval()
    for task in family.tasks:
        coded = family.compress(result.shared, task, image)
        again = family.compress(loaded, task, image)
        assert coded["strings"] == again["strings"]
        assert torch.equal(family.decompress(result.shared, task, coded, image.shape[-2:]),
                           family.decompress(loaded, task, coded, image.shape[-2:]))
