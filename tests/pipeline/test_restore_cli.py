"""compress / decompress / upscale from the command line, on model folders that `pngrow run --out` writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from pngrow import load_shared_model
from pngrow.pipeline.cli import main

@pytest.fixture(scope="module")
def models(tiny_model_dirs: dict[str, Path]) -> dict[str, Path]:
    return tiny_model_dirs


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(skimage.data.astronaut()[:96, :130]).save(path)
    return path


def test_compress_then_decompress_at_every_rate(models, photo: Path, tmp_path: Path, capsys) -> None:
    model = load_shared_model(str(models["nic"]))
    original = np.array(Image.open(photo))
    for task in ("q6", "q2"):
        bitstream, restored = tmp_path / f"{task}.bin", tmp_path / f"{task}.png"
        assert main(["compress", "--model", str(models["nic"]), "--task", task, str(photo), str(bitstream)]) == 0
        assert "bpp" in capsys.readouterr().out
        assert main(["decompress", "--model", str(models["nic"]), str(bitstream), str(restored)]) == 0
        decoded = np.array(Image.open(restored))
        assert decoded.shape == original.shape
        assert np.array_equal(decoded, model.restore(original, task))
        assert np.array_equal(decoded, model.decompress(bitstream.read_bytes()))


def test_upscale_at_every_scale_in_tiles_or_whole(models, photo: Path, tmp_path: Path) -> None:
    for scale in (2, 3):
        whole, tiled = tmp_path / f"x{scale}.png", tmp_path / f"x{scale}-tiled.png"
        assert main(["upscale", "--model", str(models["sisr"]), "--scale", str(scale), str(photo), str(whole)]) == 0
        assert main(["upscale", "--model", str(models["sisr"]), "--task", f"x{scale}", "--tile", "40", str(photo),
                     str(tiled)]) == 0
        a, b = np.array(Image.open(whole)).astype(int), np.array(Image.open(tiled)).astype(int)
        assert a.shape == (96 * scale, 130 * scale, 3)
        assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["upscale", "--model", "{sisr}", "--scale", "4", "{photo}", "o.png"], "scale 4 is not one of this model's: 2, 3"),
        (["compress", "--model", "{sisr}", "--task", "x2", "{photo}", "o.bin"], "family 'sisr' does not compress"),
        (["compress", "--model", "{nic}", "--task", "q5", "{photo}", "o.bin"], "unknown task 'q5'"),
        (["compress", "--model", "{nic}", "--task", "q6", "missing.png", "o.bin"], "input image 'missing.png' does not"),
        (["decompress", "--model", "{nic}", "{photo}", "o.png"], "not a pngrow bitstream"),
        (["upscale", "--model", "/no/model", "--scale", "2", "{photo}", "o.png"], "'/no/model' is neither a pngrow"),
        (["upscale", "--model", "{sisr}", "--scale", "2", "--tile", "0", "{photo}", "o.png"], "tile 0 must be at least"),
    ],
)
def test_bad_restore_input_fails_with_one_line(models, photo: Path, tmp_path: Path, monkeypatch, capsys,
                                               args: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    filled = [a.format(sisr=models["sisr"], nic=models["nic"], photo=photo) for a in args]
    assert main(filled) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.glob("o.*"))


def test_odd_images_get_a_clear_error_or_tiles(models) -> None:
    from pngrow.workers import restoration

    model = load_shared_model(str(models["sisr"]), progress=False)
    with pytest.raises(ValueError, match=r"expected a uint8 H x W x 3 image, got uint8 \(8, 8, 4\)"):
        model.upscale(np.zeros((8, 8, 4), np.uint8), scale=2)
    with pytest.raises(ValueError, match=r"expected a uint8 H x W x 3 image, got float64"):
        model.upscale(np.zeros((8, 8, 3)), scale=2)
    with pytest.raises(ValueError, match="the image is empty"):
        model.upscale(np.zeros((0, 8, 3), np.uint8), scale=2)
    # Over 1024 x 1024 pixels an image is processed in tiles, to the same result up to one grey level.
    big = np.random.default_rng(0).integers(0, 256, (1030, 1040, 3), dtype=np.uint8)
    assert restoration.tile_count(1030, 1040, None) == 4
    tiled = model.upscale(big, scale=2).astype(int)
    whole = model.upscale(big, scale=2, tile=2048).astype(int)
    assert tiled.shape == (2060, 2080, 3) and np.abs(tiled - whole).max() <= 1


def test_a_bitstream_given_to_a_sisr_model_is_refused(models, photo: Path, tmp_path: Path, capsys) -> None:
    bitstream = tmp_path / "q6.bin"
    assert main(["compress", "--model", str(models["nic"]), "--task", "q6", str(photo), str(bitstream)]) == 0
    capsys.readouterr()
    assert main(["decompress", "--model", str(models["sisr"]), str(bitstream), str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "family 'sisr' does not decompress bitstreams" in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    "args",
    [
        ["upscale", "--model", "{sisr}", "--scale", "2", "--device", "cuda", "{photo}", "o.png"],
        ["compress", "--model", "{nic}", "--task", "q6", "--device", "cuda", "{photo}", "o.bin"],
        ["decompress", "--model", "{nic}", "--device", "cuda:1", "{photo}", "o.png"],
    ],
)
def test_a_device_this_machine_lacks_is_one_line(models, photo: Path, tmp_path: Path, monkeypatch, capsys,
                                                 args: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    filled = [a.format(sisr=models["sisr"], nic=models["nic"], photo=photo) for a in args]
    assert main(filled) == 2
    device = filled[filled.index("--device") + 1]
    expected = f"pngrow: error: device {device!r} is not available: this machine has no CUDA device\n"
    assert capsys.readouterr().err == expected
    assert not list(tmp_path.glob("o.*"))
    with pytest.raises(ValueError, match=f"device {device!r} is not available"):
        load_shared_model(str(models["sisr"]), device=device)
