from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pngrow.workers.data import PatchSampler, check_folder, default_images, load_folder, load_image


def _save(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_grey_and_rgba_images_become_rgb(tmp_path: Path) -> None:
    grey = load_image(_save(tmp_path / "g.png", np.full((5, 6), 7, np.uint8)))
    rgba = load_image(_save(tmp_path / "a.png", np.full((5, 6, 4), 9, np.uint8)))
    assert grey.shape == rgba.shape == (3, 5, 6)
    assert int(grey[2, 0, 0]) == 7 and int(rgba[0, 0, 0]) == 9


def test_folder_errors_name_the_bad_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no .png"):
        load_folder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image '.*broken.png'"):
        load_folder(tmp_path)


def test_folder_is_sorted_and_filtered(tmp_path: Path) -> None:
    _save(tmp_path / "b.jpg", np.zeros((8, 8, 3), np.uint8))
    _save(tmp_path / "a.png", np.zeros((9, 8, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("x")
    images = load_folder(tmp_path)
    assert images.names == ("a.png", "b.jpg") and images.images[0].shape == (3, 9, 8)
    assert len(images.limit(1)) == 1


def test_sampler_skips_small_images_and_refuses_when_none_fit(tmp_path: Path) -> None:
    _save(tmp_path / "small.png", np.zeros((10, 10, 3), np.uint8))
    _save(tmp_path / "big.png", np.full((40, 50, 3), 255, np.uint8))
    sampler = PatchSampler(load_folder(tmp_path), patch=32)
    assert sampler.skipped == ("small.png",)
    batch = sampler.sample(3, 16)
    assert batch.shape == (3, 3, 16, 16) and torch.all(batch == 1.0)
    with pytest.raises(ValueError, match="at least 64x64"):
        PatchSampler(load_folder(tmp_path), patch=64)


def test_default_images_ship_with_scikit_image() -> None:
    train, evaluation = default_images("train"), default_images("eval")
    assert len(train) == 4 and len(evaluation) == 2
    assert set(train.names).isdisjoint(evaluation.names)
    assert all(im.dtype == torch.uint8 and im.shape[0] == 3 for im in train.images + evaluation.images)


def test_parquet_shards_load_beside_image_files(tmp_path: Path) -> None:
    from pngrow.workers.data import ImageSet, write_shard

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (9, 11, 3), dtype=np.uint8) for _ in range(2)]
    shard = ImageSet("test", ("a", "b"), tuple(torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays))
    write_shard(shard, tmp_path / "part-0.parquet")
    _save(tmp_path / "c.png", arrays[0])
    loaded = load_folder(tmp_path)
    assert loaded.names == ("c.png", "part-0.parquet:a", "part-0.parquet:b")
    assert all(torch.equal(x, y) for x, y in zip(loaded.images[1:], shard.images))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nonsense")
    with pytest.raises(ValueError, match="cannot read Parquet shard '.*bad.parquet'"):
        load_folder(tmp_path)


def test_a_truncated_image_is_refused_by_name_before_and_at_decoding(tmp_path: Path) -> None:
    whole = _save(tmp_path / "whole.png", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = whole.read_bytes()
    whole.unlink()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read image '.*cut.png'"):
        check_folder(tmp_path)
    with pytest.raises(ValueError, match="cannot read image '.*cut.png'"):
        load_folder(tmp_path)
