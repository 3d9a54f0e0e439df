from __future__ import annotations

import copy
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pngrow.workers.data import ImageSet, PatchSampler
from pngrow.workers.models import get_family, load_model
from pngrow.workers.models.nic import lambda_of
from pngrow.workers.png import load_shared, save_shared
from pngrow.workers.settings import TaskSettings
from pngrow.workers.training import train_shared, train_task
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


def test_a_later_rate_starts_at_its_own_quantisation_step() -> None:
    """Each rate starts from the previous rate's task-local state; its latent gain then moves by sqrt(lambda ratio)
    (the high-rate optimum step goes as 1 / sqrt(lambda)), so q2 after q6 starts with a coarser step."""
    family = get_family("nic", ["q6", "q2"], N=8, M=8, patch=64)
    images = _images()
    untrained = [TaskSettings(grow_steps=0, prune_steps=0, finetune_steps=0, batch_size=2)] * 2
    shared = train_shared(family, untrained, images, images, log=lambda m: None).shared
    gains = {t.name: t.local_state["latent_gain.log_gain"] for t in shared.tasks}
    assert torch.equal(gains["q6"], torch.zeros(8))
    assert torch.allclose(gains["q2"], torch.full((8,), 0.5 * math.log(lambda_of("q2") / lambda_of("q6"))))


def test_the_latent_gain_sets_the_quantisation_step_of_the_real_bitstream(tiny_job) -> None:
    family, result, images = tiny_job
    shared, image = copy.deepcopy(result.shared), images.images[0][None].float() / 255
    sizes = []
    for log_gain in (0.0, math.log(4), math.log(16)):
        shared.activate("q6")
        with torch.no_grad():
            shared.model.latent_gain.log_gain.fill_(log_gain)
        shared.tasks[0].local_state["latent_gain.log_gain"] = shared.model.latent_gain.log_gain.detach().clone()
        family.before_commit(shared, "q6")  # the entropy tables follow the scales, which the gain multiplies
        coded = family.compress(shared, "q6", image)
        sizes.append(sum(len(s) for s in coded["strings"][0]))
        with torch.no_grad():
            y = shared.model.g_a(image)  # the analysis transform's output, times the gain (its hook)
            shared.model.latent_gain.log_gain.zero_()
            assert torch.allclose(y, shared.model.g_a(image) * math.exp(log_gain), rtol=1e-5)
    assert sizes[0] < sizes[1] < sizes[2], f"latent bytes do not grow with the gain: {sizes}"


def test_a_model_saved_before_the_latent_gain_codes_as_it_did(tiny_job, tmp_path) -> None:
    """A saved model without the gain tensors loads with a gain of 1 in each of its tasks, and keeps it when a
    later task, grown on it, moves its own."""
    family, result, images = tiny_job
    old = copy.deepcopy(result.shared)
    for task in old.tasks:
        task.local_state.pop("latent_gain.log_gain")
    old.activate_none()
    old.model.latent_gain.log_gain.data.zero_()
    image = images.images[0][None].float() / 255
    expected = {t: family.compress(old, t, image)["strings"] for t in family.tasks}
    save_shared(old, tmp_path, family.architecture())
    weights = load_file(str(tmp_path / "weights.safetensors"))
    assert not [name for name in weights if "latent_gain" in name]
    family, loaded = load_model(tmp_path, [*family.tasks, "q4"])
    settings = TaskSettings(grow_steps=0, prune_steps=0, finetune_steps=0, batch_size=2)
    train_task(loaded, family, "q4", settings, PatchSampler(images, 64), images, log=lambda m: None)
    assert float(loaded.tasks[-1].local_state["latent_gain.log_gain"].abs().min()) > 0
    for task, strings in expected.items():
        assert family.compress(loaded, task, image)["strings"] == strings
