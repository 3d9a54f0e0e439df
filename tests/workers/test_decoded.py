"""Image sets decoded once per node into a mapped pixel file (``workers/decoded.py``): shared by the node's
processes, flat in a process's private memory, redone after a killed decode, and bad input named in one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pngrow.workers.data import ImageSet, PatchSampler, load_folder, write_shard
from pngrow.workers.decoded import MAX_PIXELS, set_key


def _photos(folder: Path, count: int, height: int = 96, width: int = 128, start: int = 0) -> Path:
    """``count`` smooth colour images (cheap to encode), each different."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        g = torch.Generator().manual_seed(i)
        small = torch.rand(1, 3, max(2, height // 16), max(2, width // 16), generator=g)
        image = torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear")[0]
        Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return folder


def _in_subprocess(script: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh Python process (another worker of the node) with ``env`` added."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


# Loads FOLDER with CACHE in this process, counting the images it decodes; prints the count and the set's digest.
_COUNTING_LOAD = """
    import sys
    from pngrow.workers import decoded
    from pngrow.workers.data import load_folder
    count = 0
    real = decoded.decode_array
    def counting(*args, **kwargs):
        global count
        count += 1
        return real(*args, **kwargs)
    decoded.decode_array = counting
    images = load_folder(sys.argv[1] if len(sys.argv) > 1 else "{folder}", "{cache}")
    print(count, images.digest, len(images))
"""


def test_another_process_of_the_node_maps_the_set_and_decodes_nothing(tmp_path: Path) -> None:
    folder = _photos(tmp_path / "photos", 6)
    cache = tmp_path / "cache"
    first = _in_subprocess(_COUNTING_LOAD.format(folder=folder, cache=cache))
    second = _in_subprocess(_COUNTING_LOAD.format(folder=folder, cache=cache))
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    (decodes, digest, count), (again, same, _) = first.stdout.split(), second.stdout.split()
    assert (int(decodes), int(count), int(again)) == (6, 6, 0)
    # The pixels mapped are the images' pixels: the set's digest is the one of the images decoded in memory.
    arrays = [np.asarray(Image.open(p)).transpose(2, 0, 1).copy() for p in sorted(folder.iterdir())]
    in_memory = ImageSet("x", tuple(p.name for p in sorted(folder.iterdir())), tuple(map(torch.from_numpy, arrays)))
    assert same == digest == in_memory.digest


def test_processes_racing_for_a_set_decode_it_once(tmp_path: Path) -> None:
    folder = _photos(tmp_path / "photos", 8)
    script = textwrap.dedent(_COUNTING_LOAD.format(folder=folder, cache=tmp_path / "cache"))
    racing = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [process.communicate(timeout=300)[0].split() for process in racing]
    assert [process.returncode for process in racing] == [0, 0, 0]
    assert sum(int(decodes) for decodes, _, _ in outputs) == 8
    assert len({digest for _, digest, _ in outputs}) == 1


def _anonymous_kib(pid: int | str = "self") -> int:
    """A process's anonymous (private heap) memory, from the kernel's accounting."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise AssertionError("no Anonymous line in smaps_rollup")


_MEMORY = """
    import sys
    import numpy as np
    from pngrow.workers.data import PatchSampler, load_folder
    from tests.workers.test_decoded import _anonymous_kib

    def read_all(folder):  # patches from every image, then every pixel summed: every page of the set is read
        images = load_folder(folder, sys.argv[3])
        sampler = PatchSampler(images, 64, seed=0)
        for _ in range(100):
            sampler.sample(16, 64)
        assert sum(int(image.numpy().sum(dtype=np.uint64)) for image in images.images) > 0
        return images, _anonymous_kib()

    small, before = read_all(sys.argv[1])
    large, after = read_all(sys.argv[2])
    print(after - before, (sum(i.numel() for i in large.images) - sum(i.numel() for i in small.images)) // 1024)
"""


def test_a_worker_s_private_memory_stays_flat_as_the_set_grows(tmp_path: Path) -> None:
    """A worker that reads every pixel of a set of 24 images of 1.2 MB after one of 6 (both decoded by another worker
    of the node) grows its anonymous memory (its heap) by a few allocations (about 2 MB seen), not by the 20 MB more
    pixels it read: they are the page cache's, mapped."""
    small, large = _photos(tmp_path / "small", 6, 512, 768), _photos(tmp_path / "large", 24, 512, 768, start=6)
    for folder in (small, large):
        assert _in_subprocess(_COUNTING_LOAD.format(folder=folder, cache=tmp_path / "cache")).returncode == 0
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_MEMORY), str(small), str(large),
                           str(tmp_path / "cache")], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    grown, more_pixels = map(int, done.stdout.split())
    assert more_pixels == 18 * 1152
    assert grown < more_pixels / 4, f"{grown} KiB of private memory grown reading {more_pixels} KiB more pixels"


def test_a_killed_decode_leaves_nothing_valid_and_is_redone(tmp_path: Path) -> None:
    folder, cache = _photos(tmp_path / "photos", 5), tmp_path / "cache"
    slow = """
        import sys, time
        from pngrow.workers import decoded
        from pngrow.workers.data import load_folder
        real = decoded.decode_array
        def slowly(*args, **kwargs):
            print("decoding", flush=True)
            time.sleep(0.5)
            return real(*args, **kwargs)
        decoded.decode_array = slowly
        decoded.decoded_set(sys.argv[1], decoded.Path(sys.argv[2]), threads=1)
    """
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(slow), str(folder), str(cache)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "decoding"
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    entries = cache / "decoded"
    assert not (entries / set_key(folder)).exists()
    assert [p.name for p in entries.iterdir() if p.is_dir()][0].startswith(f".{set_key(folder)}.")  # its scratch
    again = _in_subprocess(_COUNTING_LOAD.format(folder=folder, cache=cache))
    assert again.returncode == 0, again.stderr
    assert int(again.stdout.split()[0]) == 5
    assert [p.name for p in entries.iterdir() if p.is_dir()] == [set_key(folder)]  # the dead scratch is gone


def test_parquet_shards_and_image_files_decode_into_one_set(tmp_path: Path) -> None:
    folder = _photos(tmp_path / "photos", 2)
    arrays = [np.random.default_rng(i).integers(0, 256, (3, 9, 11), dtype=np.uint8) for i in range(3)]
    write_shard(ImageSet("t", ("a", "b", "c"), tuple(map(torch.from_numpy, arrays))), folder / "part-0.parquet")
    images = load_folder(folder, tmp_path / "cache")
    assert images.names == ("0000.png", "0001.png", "part-0.parquet:a", "part-0.parquet:b", "part-0.parquet:c")
    assert all(np.array_equal(x.numpy(), y) for x, y in zip(images.images[2:], arrays))


def test_div2k_s_release_layout_is_a_paired_folder(tmp_path: Path) -> None:
    """DIV2K as it unzips: DIV2K_train_HR/0001.png beside DIV2K_train_LR_bicubic/X2/0001x2.png."""
    root = tmp_path / "div2k"
    _photos(root / "DIV2K_train_HR", 2, 48, 64)
    lr = _photos(root / "DIV2K_train_LR_bicubic" / "X2", 2, 24, 32)
    for image in lr.iterdir():
        image.rename(lr / f"{image.stem}x2.png")
    (root / "readme.txt").write_text("not an image")
    images = load_folder(root, tmp_path / "cache")
    assert images.names == ("0000.png", "0001.png")
    assert [x.shape for x in images.images] == [(3, 48, 64)] * 2
    (scale, low), = images.low_res.items()
    assert scale == 2 and np.array_equal(low[1].numpy(), np.array(Image.open(lr / "0001x2.png")).transpose(2, 0, 1))


def test_a_changed_folder_is_decoded_again(tmp_path: Path) -> None:
    folder, cache = _photos(tmp_path / "photos", 3), tmp_path / "cache"
    before = load_folder(folder, cache)
    _photos(folder, 1, start=3)
    after = load_folder(folder, cache)
    assert (len(before), len(after)) == (3, 4) and before.digest != after.digest


def test_a_corrupt_image_among_many_is_named(tmp_path: Path) -> None:
    folder = _photos(tmp_path / "photos", 30)
    data = (folder / "0017.png").read_bytes()
    (folder / "0017.png").write_bytes(data[: len(data) // 2])  # truncated: its header still reads
    with pytest.raises(ValueError, match=r"^cannot read image '.*0017.png': ") as caught:
        load_folder(folder, tmp_path / "cache")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "cache" / "decoded" / set_key(folder)).exists()


def test_an_image_over_100_megapixels_is_refused_by_its_header(tmp_path: Path) -> None:
    folder = _photos(tmp_path / "photos", 2)
    Image.new("1", (12000, 9000)).save(folder / "huge.png")  # 108 megapixels, 13 MB in memory as bits
    with pytest.raises(ValueError) as caught:
        load_folder(folder, tmp_path / "cache")
    assert str(caught.value) == (f"image '{folder / 'huge.png'}' is 12000x9000 (108.0 megapixels), over the "
                                 f"{MAX_PIXELS // 10**6}-megapixel limit")


def test_a_full_cache_disk_is_one_line_naming_the_cache_folder(tmp_path: Path) -> None:
    cache = tmp_path / "small-disk"
    cache.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(cache)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        folder = _photos(tmp_path / "photos", 4, 512, 768)  # 4.7 MB of pixels for a 1 MB disk
        with pytest.raises(ValueError) as caught:
            load_folder(folder, cache)
        assert re.fullmatch(rf"cache folder '{cache}' has 1\.0 MB free and 4\.7 MB are needed; the decoded images "
                            rf"of '{folder}' cannot be written there \(set data.cache or PNGROW_CACHE elsewhere\)",
                            str(caught.value)), str(caught.value)
        assert not [p for p in (cache / "decoded").iterdir() if p.is_dir()]  # no entry, no scratch left
    finally:
        subprocess.run(["umount", str(cache)], check=True)


def test_the_sampler_reads_patches_from_mapped_images(tmp_path: Path) -> None:
    images = load_folder(_photos(tmp_path / "photos", 3, 80, 90), tmp_path / "cache")
    index = json.loads(next((tmp_path / "cache" / "decoded").glob("*/index.json")).read_text())
    assert [name for name, *_ in index["images"]] == list(images.names)
    batch = PatchSampler(images, 64, seed=1).sample(5, 48)
    assert batch.shape == (5, 3, 48, 48) and 0 < float(batch.mean()) < 1
