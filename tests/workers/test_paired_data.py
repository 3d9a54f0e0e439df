"""Paired SR folders (HR images plus LR_bicubic/X<s>, as EDSR's benchmark release, DIV2K and BasicSR lay them out)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pngrow.workers.data import load_folder


def _write(path: Path, height: int, width: int, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)


def test_benchmark_layout_pairs_each_hr_image_with_its_lr_images(tmp_path: Path) -> None:
    _write(tmp_path / "HR" / "baby.png", 13, 10, 1)
    _write(tmp_path / "HR" / "bird.png", 12, 12, 2)
    _write(tmp_path / "LR_bicubic" / "X2" / "babyx2.png", 6, 5, 11)  # 13 // 2 = 6 rows, 10 // 2 = 5 columns
    _write(tmp_path / "LR_bicubic" / "X2" / "birdx2.png", 6, 6, 12)
    _write(tmp_path / "LR_bicubic" / "X3" / "baby.png", 4, 3, 21)  # the name without the "x3" suffix works too
    _write(tmp_path / "LR_bicubic" / "X3" / "bird.png", 4, 4, 22)
    images = load_folder(tmp_path)
    assert images.names == ("baby.png", "bird.png")
    assert sorted(images.low_res) == [2, 3]
    assert [int(lr[0, 0, 0]) for lr in images.low_res[2]] == [11, 12]  # aligned with the HR images, by name
    assert [tuple(lr.shape) for lr in images.low_res[3]] == [(3, 4, 3), (3, 4, 4)]
    assert images.protocol == "paired LR_bicubic (x2,x3)"
    first = images.limit(1)
    assert first.names == ("baby.png",) and [len(v) for v in first.low_res.values()] == [1, 1]


def test_hr_only_folder_makes_lr_on_the_fly(tmp_path: Path) -> None:
    _write(tmp_path / "a.png", 8, 8, 3)
    images = load_folder(tmp_path)
    assert images.low_res == {} and images.protocol.startswith("bicubic on the fly")


def test_missing_lr_image_is_named(tmp_path: Path) -> None:
    _write(tmp_path / "HR" / "baby.png", 8, 8, 1)
    _write(tmp_path / "HR" / "bird.png", 8, 8, 1)
    _write(tmp_path / "LR_bicubic" / "X2" / "babyx2.png", 4, 4, 1)
    with pytest.raises(ValueError, match=r"no LR image '.*X2/birdx2.png' for 'bird.png'"):
        load_folder(tmp_path)


def test_lr_image_of_the_wrong_size_is_named(tmp_path: Path) -> None:
    _write(tmp_path / "baby.png", 12, 12, 1)
    _write(tmp_path / "LR_bicubic" / "X4" / "babyx4.png", 4, 4, 1)  # 12 // 4 = 3
    with pytest.raises(ValueError, match=r"LR image '.*babyx4.png' is 4x4, not 3x3 \(its HR image 'baby.png'"):
        load_folder(tmp_path)
