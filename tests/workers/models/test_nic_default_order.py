"""The default NIC job (`pngrow run --family nic`, its default budget and evaluation images) is a codec: its rates
come out ordered, bpp and PSNR both rising with the rate's lambda (issue 18), and its bitstreams decode to images
far closer to the originals than any constant image is. About 8 minutes on 2 CPU cores, the job run once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pngrow import load_shared_model
from pngrow.pipeline.cli import main
from pngrow.workers.data import default_images
from pngrow.workers.models import get_family
from pngrow.workers.models.nic import lambda_of
from tests import reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default NIC job's folder: its report (``nic.json``) and its saved model (``model/``)."""
    folder = tmp_path_factory.mktemp("default-nic")
    assert main(["run", "--family", "nic", "--quiet", "--json", str(folder / "nic.json"),
                 "--out", str(folder / "model")]) == 0
    return folder


def test_the_default_nic_job_gives_an_ordered_rate_distortion_curve(default_job: Path) -> None:
    tasks = json.loads((default_job / "nic.json").read_text())["tasks"]
    assert [t["name"] for t in tasks] == list(get_family("nic").tasks)
    by_rate = sorted(tasks, key=lambda t: lambda_of(t["name"]))
    curve = [(t["name"], round(t["metrics"]["bpp"], 4), round(t["metrics"]["psnr"], 2)) for t in by_rate]
    for low, high in zip(by_rate, by_rate[1:]):
        assert low["metrics"]["bpp"] < high["metrics"]["bpp"], f"bpp does not rise with the rate: {curve}"
        assert low["metrics"]["psnr"] < high["metrics"]["psnr"], f"PSNR does not rise with the rate: {curve}"


def test_the_default_nic_models_bitstreams_decode_close_to_the_originals(default_job: Path) -> None:
    """Every rate's pngrow bitstream of each evaluation image decodes at least 3 dB above the image's mean colour
    (the best a constant image can do), and the mean is the PSNR the job reported."""
    model = load_shared_model(str(default_job / "model"), progress=False)
    reported = {t["name"]: t["metrics"]["psnr"] for t in json.loads((default_job / "nic.json").read_text())["tasks"]}
    images = [image.permute(1, 2, 0).numpy() for image in default_images("eval").images]
    for task in model.tasks:
        psnrs = []
        for image in images:
            decoded = model.decompress(model.compress(image, task))
            constant = np.broadcast_to(image.reshape(-1, 3).mean(0).round().astype(np.uint8), image.shape)
            psnrs.append(reference.psnr(decoded, image))
            assert psnrs[-1] > reference.psnr(constant, image) + 3, (task, psnrs[-1])
        assert np.mean(psnrs) == pytest.approx(reported[task], abs=1e-3), task


def test_the_compacted_and_the_masked_default_nic_model_code_alike(default_job: Path) -> None:
    """The compacted model (what the API serves) and the masked one: each one's bitstream decodes with both to the
    same pixels. A trained codec's latents are not all rounded to zero (a few steps' are), so an encoder that
    differs shows here."""
    fast = load_shared_model(str(default_job / "model"), progress=False)
    masked = load_shared_model(str(default_job / "model"), progress=False, compacted=False)
    image = default_images("eval").images[0].permute(1, 2, 0).numpy()
    for task in fast.tasks:
        expected = masked.decompress(masked.compress(image, task)).astype(int)
        for coder in (fast, masked):
            data = coder.compress(image, task)
            for decoder in (fast, masked):
                assert np.abs(decoder.decompress(data).astype(int) - expected).max() <= 1, (task, coder, decoder)
