"""`pngrow eval`: CompressAI's results format read by CompressAI's own plot tool; BasicSR-style SR figures on
HR-only and paired folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pngrow import load_shared_model
from pngrow.pipeline.cli import main
from pngrow.pipeline.evaluate import CODEC_KEYS
from pngrow.workers.models.nic import lambda_of
from tests import reference

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "compressai-kodak"


@pytest.fixture(scope="module")
def models(tiny_model_dirs: dict[str, Path]) -> dict[str, Path]:
    return tiny_model_dirs  # NIC rates q6, q2, q4 (trained in that order), SISR x2, x3


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    # at least 176 pixels a side: five scales of the 11-pixel window for pngrow and for pytorch-msssim, which measures
    # them here independently (pngrow uses fewer scales under 176 pixels, pytorch-msssim refuses under 161)
    Image.fromarray(skimage.data.astronaut()[:176, :200]).save(folder / "astronaut.png")
    Image.fromarray(skimage.data.chelsea()[:176, :192]).save(folder / "chelsea.png")
    return folder


def test_codec_results_are_compressai_eval_model_json_in_rate_order(models, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "pngrow-nic.json"
    assert main(["eval", str(models["nic"]), "--data", str(photos), "--json", str(out), "--name", "pngrow-tiny"]) == 0
    document = json.loads(out.read_text())
    assert document["name"] == "pngrow-tiny" and "description" in document
    assert list(document["results"]) == list(CODEC_KEYS)
    assert document["tasks"] == ["q2", "q4", "q6"]  # trained q6, q2, q4: written in rate order
    assert all(len(values) == 3 for values in document["results"].values())
    # Each entry is the mean over the images of what the pngrow bitstream gives: its size, and its decoded image
    # measured here with numpy (PSNR) and pytorch-msssim (MS-SSIM), not with pngrow's metrics.
    model = load_shared_model(str(models["nic"]), progress=False)
    images = [np.array(Image.open(photos / name)) for name in ("astronaut.png", "chelsea.png")]
    for index, task in enumerate(document["tasks"]):
        figures = []
        for image in images:
            data = model.compress(image, task)
            decoded = model.decompress(data)
            figures.append((reference.psnr(decoded, image), reference.ms_ssim_rgb(decoded, image),
                            len(data) * 8 / (image.shape[0] * image.shape[1])))
        psnr, ms_ssim, bpp = np.mean(figures, axis=0)
        assert document["results"]["psnr-rgb"][index] == pytest.approx(psnr, abs=1e-6), task
        assert document["results"]["ms-ssim-rgb"][index] == pytest.approx(ms_ssim, abs=1e-6), task
        assert document["results"]["bpp"][index] == pytest.approx(bpp, rel=1e-12), task
    assert sorted(lambda_of(t) for t in document["tasks"]) == [lambda_of(t) for t in document["tasks"]]


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="needs ../shared/reference (CompressAI's published results)")
def test_compressai_plot_draws_pngrow_beside_the_published_curves(models, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "pngrow.json"
    assert main(["eval", str(models["nic"]), "--data", str(photos), "--json", str(out)]) == 0
    picture = tmp_path / "rd.png"
    done = subprocess.run([sys.executable, "-m", "compressai.utils.plot", "-f", str(out),
                           str(REFERENCE / "compressai-bmshj2018-hyperprior_mse_cpu.json"),
                           str(REFERENCE / "bmshj2018-hyperprior-vbr-ans.json"), "-o", str(picture)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert picture.stat().st_size > 10_000
    assert Image.open(picture).size[0] > 1000  # CompressAI saves at 300 dpi


def _paired_folder(root: Path) -> Path:
    for name, image in (("baby", skimage.data.astronaut()[:96, :120]), ("bird", skimage.data.coffee()[:90, :120])):
        (root / "HR").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "HR" / f"{name}.png")
        for scale in (2, 3):
            folder = root / "LR_bicubic" / f"X{scale}"
            folder.mkdir(parents=True, exist_ok=True)
            # A different LR than the one made on the fly (nearest-neighbour), so the two protocols must differ.
            Image.fromarray(image[::scale, ::scale][: image.shape[0] // scale, : image.shape[1] // scale]).save(
                folder / f"{name}x{scale}.png")
    return root


def test_sr_figures_per_scale_on_hr_only_and_on_paired_folders(models, tmp_path: Path) -> None:
    paired = _paired_folder(tmp_path / "paired")
    hr_only = tmp_path / "hr"
    hr_only.mkdir()
    for file in (paired / "HR").iterdir():
        (hr_only / file.name).write_bytes(file.read_bytes())
    documents = {}
    for label, folder in (("paired", paired), ("hr", hr_only)):
        out = tmp_path / f"{label}.json"
        assert main(["eval", str(models["sisr"]), "--data", str(folder), "--json", str(out)]) == 0
        documents[label] = json.loads(out.read_text())
    assert documents["paired"]["protocol"] == "paired LR_bicubic (x2,x3)"
    assert documents["hr"]["protocol"].startswith("bicubic on the fly")
    for label in documents:
        results = documents[label]["results"]
        assert sorted(results) == ["x2", "x3"] and results["x3"]["scale"] == 3
        assert 0 < results["x2"]["ssim_y"] <= 1 and results["x2"]["psnr_y"] > 10
    assert documents["paired"]["results"]["x2"]["psnr_y"] != documents["hr"]["results"]["x2"]["psnr_y"]
    # Each figure is the model's output on the folder's LR images (paired) or on LR made by antialiased bicubic
    # downscaling (HR only; made here with PIL), measured here: PSNR-Y with numpy, SSIM-Y with scikit-image's
    # 11x11 Gaussian window of sigma 1.5, on BT.601 luma computed here, a border of the scale cropped.
    model = load_shared_model(str(models["sisr"]), progress=False)
    for label, folder in (("paired", paired), ("hr", hr_only)):
        for task, scale in (("x2", 2), ("x3", 3)):
            psnrs, ssims = [], []
            for name in ("baby", "bird"):
                hr = np.array(Image.open(folder / ("HR" if label == "paired" else "") / f"{name}.png"))
                hr = hr[: hr.shape[0] // scale * scale, : hr.shape[1] // scale * scale]
                lr = (np.array(Image.open(folder / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png"))
                      if label == "paired" else reference.bicubic_down(hr, scale))
                sr = model.upscale(lr, task)
                psnrs.append(reference.psnr_y(sr, hr, scale))
                ssims.append(reference.ssim_y(sr, hr, scale))
            results = documents[label]["results"][task]
            assert results["psnr_y"] == pytest.approx(np.mean(psnrs), abs=1e-3), (label, task)
            assert results["ssim_y"] == pytest.approx(np.mean(ssims), abs=1e-5), (label, task)


def test_eval_errors_name_the_bad_value(models, tmp_path: Path, capsys) -> None:
    assert main(["eval", str(models["nic"]), "--data", str(tmp_path / "missing"), "--json", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    folder = _paired_folder(tmp_path / "broken")
    (folder / "LR_bicubic" / "X3" / "birdx3.png").unlink()
    assert main(["eval", str(models["sisr"]), "--data", str(folder), "--json", str(tmp_path / "o.json")]) == 2
    assert "birdx3.png" in capsys.readouterr().err
