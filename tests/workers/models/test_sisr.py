from __future__ import annotations

import numpy as np
import pytest
import torch

from pngrow.workers.data import ImageSet
from pngrow.workers.metrics import psnr, psnr_y, rgb_to_y
from pngrow.workers.models import EDSR, get_family
from pngrow.workers.models.sisr import bicubic_downscale, scale_of
from pngrow.workers.settings import TaskSettings
from pngrow.workers.training import train_shared
from tests import reference


@pytest.mark.parametrize("skip", ["none", "bicubic"])
@pytest.mark.parametrize("task, scale", [("x2", 2), ("x3", 3), ("x4", 4)])
def test_each_scale_has_its_own_pixelshuffle_tail(task: str, scale: int, skip: str) -> None:
    model = EDSR({"x2": 2, "x3": 3, "x4": 4}, width=8, depth=2, skip=skip)
    assert model(torch.zeros(1, 3, 6, 7), task).shape == (1, 3, 6 * scale, 7 * scale)


def test_task_names_and_architecture_options_are_checked() -> None:
    assert scale_of("x3") == 3
    for bad in ("x5", "3", "x", "X2"):
        with pytest.raises(ValueError, match=f"SISR task {bad!r}"):
            scale_of(bad)
    with pytest.raises(ValueError, match="unknown sisr architecture option 'widht'"):
        get_family("sisr", widht=3)
    with pytest.raises(ValueError, match="width='wide' is not a int"):
        get_family("sisr", width="wide")
    with pytest.raises(ValueError, match="names a task twice"):
        get_family("sisr", ["x2", "x2"])


def test_psnr_y_follows_the_benchmark_protocol() -> None:
    hr = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    sr = hr.clone()
    sr[..., :2, :] = 0  # damage only inside a border of 2
    assert psnr_y(sr, hr, border=2) == float("inf")
    assert psnr_y(sr, hr, border=1) < 40
    white = torch.ones(1, 3, 2, 2)
    assert torch.allclose(rgb_to_y(white), torch.full((1, 1, 2, 2), 235 / 255))
    assert round(psnr(torch.zeros(1), torch.full((1,), 0.01)), 6) == 40.0


def test_bicubic_downscale_sizes_and_levels() -> None:
    lr = bicubic_downscale(torch.rand(2, 3, 24, 36), 3)
    assert lr.shape == (2, 3, 8, 12)
    assert torch.equal(lr, (lr * 255).round() / 255)


def _images() -> ImageSet:
    g = torch.Generator().manual_seed(0)
    return ImageSet("random", ("a", "b"),
                    tuple(torch.randint(0, 256, (3, 40, 48), generator=g, dtype=torch.uint8) for _ in range(2)))


def _tiny_job(seed: int):
    family = get_family("sisr", ["x2", "x4"], width=8, depth=1, lr_patch=8)
    images = _images()
    settings = [TaskSettings(grow_steps=3, prune_steps=2, finetune_steps=1, batch_size=2, seed=seed)] * 2
    return train_shared(family, settings, images, images, log=lambda m: None)


def test_a_seed_reproduces_the_whole_job_and_another_seed_gives_another() -> None:
    torch.manual_seed(123)  # whatever the global state was before must not matter
    first = _tiny_job(seed=5)
    torch.manual_seed(456)
    second = _tiny_job(seed=5)
    for a, b in zip(first.shared.shared_layers(), second.shared.shared_layers()):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.owner, b.owner)
    assert first.final_metrics == second.final_metrics
    torch.manual_seed(123)
    other = _tiny_job(seed=6)
    for a, b in zip(first.shared.shared_layers(), other.shared.shared_layers()):
        assert not torch.equal(a.weight, b.weight)
    for task in ("x2", "x4"):
        assert first.final_metrics[task]["psnr"] != other.final_metrics[task]["psnr"]


def test_tiny_job_serves_every_scale_and_measures_bicubic() -> None:
    result = _tiny_job(seed=0)
    report = result.as_dict()
    assert [t["name"] for t in report["tasks"]] == ["x2", "x4"]
    for task in report["tasks"]:
        assert set(task["metrics"]) == {"psnr", "ms_ssim", "bicubic_psnr"}
        assert 0 < task["metrics"]["ms_ssim"] <= 1
        assert 0 < task["density"] <= 1 and task["macs"] <= task["dense_macs"]
        # bicubic's figure is the mean over the evaluation images (40 x 48: no crop) of an independent computation
        scale = scale_of(task["name"])
        hr = [image.permute(1, 2, 0).numpy() for image in _images().images]
        expected = np.mean([reference.psnr_y(reference.bicubic_up(reference.bicubic_down(image, scale), scale), image,
                                             scale) for image in hr])
        assert task["metrics"]["bicubic_psnr"] == pytest.approx(expected, abs=1e-4)
    assert report["stored_params"] < report["independent_params"]
