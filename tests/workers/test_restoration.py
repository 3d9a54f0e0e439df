from __future__ import annotations

import numpy as np
import pytest
import torch

from pngrow.workers.data import PatchSampler, default_images
from pngrow.workers.models import get_family
from pngrow.workers.restoration import decode, encode, read_header, receptive_margin, upscale
from pngrow.workers.settings import TaskSettings
from pngrow.workers.training import train_task

TINY = TaskSettings(grow_steps=3, prune_steps=2, finetune_steps=1, batch_size=2)


def _grow(family, shared, task: str, seed: int = 0) -> None:
    images = default_images("eval").limit(1)
    sampler = PatchSampler(images, max(family.patch_size(t) for t in family.tasks), seed=seed)
    train_task(shared, family, task, TINY, sampler, images, log=lambda _: None)


def _trained(name: str, tasks: list[str], seed: int = 0, **arch):  # noqa: ANN003, ANN202
    """A family and its shared network with the first task grown, pruned and committed."""
    family = get_family(name, tasks, **arch)
    torch.manual_seed(seed)
    shared = family.build_shared()
    _grow(family, shared, tasks[0], seed=seed)
    return family, shared


@pytest.fixture(scope="module")
def sisr():
    return _trained("sisr", ["x2", "x3"], width=8, depth=2, lr_patch=8)


@pytest.fixture(scope="module")
def nic():
    return _trained("nic", ["q6", "q2"], N=16, M=16, patch=64)


def _image(h: int, w: int) -> torch.Tensor:
    return default_images("eval").images[1][:, 40 : 40 + h, 60 : 60 + w].contiguous()


def test_tiled_upscaling_matches_the_whole_image(sisr) -> None:
    family, shared = sisr
    image = _image(70, 90)
    whole = upscale(family, shared, "x2", image)
    assert whole.shape == (3, 140, 180)
    for tile in (16, 33):
        tiled = upscale(family, shared, "x2", image, tile=tile)
        diff = (tiled.int() - whole.int()).abs()
        assert int(diff.max()) <= 1 and float(diff.float().mean()) < 1e-3, tile
    assert receptive_margin(shared.model) >= 2 * 2 + 2


def test_bitstream_round_trip_matches_the_family_restore(nic) -> None:
    family, shared = nic
    image = _image(70, 100)
    data = encode(family, shared, "q6", image, model="models:/nic/1")
    header = read_header(data)
    assert (header["task"], header["height"], header["width"], header["model"]) == ("q6", 70, 100, "models:/nic/1")
    task, decoded = decode(family, shared, data)
    expected, figures = family.restore(shared, "q6", image)
    assert task == "q6" and torch.equal(decoded, expected)
    assert len(data) > figures["bytes"]  # the header and tile framing come on top of CompressAI's strings


def test_tiled_coding_decodes_to_the_right_size_at_similar_quality(nic) -> None:
    family, shared = nic
    image = _image(150, 140)
    whole = decode(family, shared, encode(family, shared, "q6", image))[1]
    tiled = decode(family, shared, encode(family, shared, "q6", image, tile=64))[1]
    assert tiled.shape == whole.shape == image.shape

    def psnr(x: torch.Tensor) -> float:
        return float(10 * torch.log10(255**2 / (x.float() - image.float()).pow(2).mean()))

    assert abs(psnr(tiled) - psnr(whole)) < 1.0
    with pytest.raises(ValueError, match="NIC tile 100 is not a multiple of 64"):
        encode(family, shared, "q6", image, tile=100)


def test_bad_bitstreams_fail_with_one_line(nic) -> None:
    family, shared = nic
    data = encode(family, shared, "q6", _image(64, 64))
    with pytest.raises(ValueError, match="not a pngrow bitstream"):
        decode(family, shared, b"JPEG" + data)
    with pytest.raises(ValueError, match="truncated"):
        decode(family, shared, data[:-3])
    other, stranger = _trained("nic", ["q6", "q2"], seed=1, N=16, M=16, patch=64)
    with pytest.raises(ValueError, match="this model's task 'q6' differs from the one that wrote the bitstream"):
        decode(other, stranger, data)
    with pytest.raises(ValueError, match="does not compress images"):
        encode(*_trained("sisr", ["x2"], width=8, depth=1, lr_patch=8), "x2", _image(8, 8))


def test_growing_a_task_leaves_earlier_outputs_bit_identical() -> None:
    """The guarantee `pngrow grow` rests on, for both families: old bitstreams decode to the same pixels and old
    scales upscale to the same pixels after a new task is grown into the released blocks."""
    image = _image(64, 72)
    family, shared = _trained("nic", ["q6", "q2"], N=16, M=16, patch=64)
    data = encode(family, shared, "q6", image)
    before = decode(family, shared, data)[1]
    fingerprint = shared.fingerprint("q6")
    _grow(family, shared, "q2", seed=5)
    assert shared.fingerprint("q6") == fingerprint
    assert torch.equal(decode(family, shared, data)[1], before)
    assert encode(family, shared, "q6", image) == data

    sr_family, sr = _trained("sisr", ["x2", "x3"], width=8, depth=2, lr_patch=8)
    old = upscale(sr_family, sr, "x2", image)
    _grow(sr_family, sr, "x3", seed=5)
    assert torch.equal(upscale(sr_family, sr, "x2", image), old)
    assert np.array_equal(upscale(sr_family, sr, "x3", image).shape, (3, 192, 216))


_PEAK_SCRIPT = """
import resource, sys, torch
from pngrow.workers.models import get_family
from pngrow.workers.restoration import upscale
torch.manual_seed(0)
family = get_family("sisr", ["x2"], width=8, depth=1, lr_patch=8)
shared = family.build_shared()
shared.begin_task("x2"); shared.commit(); shared.eval()
side = int(sys.argv[1])
image = torch.randint(0, 256, (3, side, side), dtype=torch.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = upscale(family, shared, "x2", image)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(tuple(out.shape), before * 1024, after * 1024)
"""


@pytest.mark.slow
def test_a_huge_image_is_upscaled_in_tiles_within_a_memory_bound() -> None:
    """A 4000 x 4000 image: untiled, the x2 tail's first output alone would be 32 x 16M floats (2 GiB); in the
    automatic 1024-pixel tiles the whole upscale must add less than that to the process's peak, output included
    (about 0.9 GiB measured on 2 CPU cores)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, "4000"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    shape, before, after = done.stdout.strip().rsplit(")", 1)[0] + ")", *map(int, done.stdout.split(")")[1].split())
    assert shape == "(3, 8000, 8000)"
    assert after - before < 1536 * 2**20, f"peak grew by {(after - before) / 2**20:.0f} MiB"
