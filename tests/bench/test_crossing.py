from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from bench import crossing
from pngrow import load_shared_model
from pngrow.pipeline.cli import main
from pngrow.pipeline.onnx_codec import load_task
from pngrow.workers.bitstream import BOUNDARY_MARGIN
from tests.tiny_models import TINY_RUN


@pytest.mark.slow
def test_each_rate_crosses_both_ways_and_a_refusal_is_counted(tmp_path: Path, capsys) -> None:
    assert main(["run", "--family", "nic", "--tasks", "q6,q2", "--arch", "N=16", "--arch", "M=16", "--arch",
                 "patch=64", "--out", str(tmp_path / "nic"), *TINY_RUN]) == 0
    assert main(["export", str(tmp_path / "nic"), "--task", "q2", "--out", str(tmp_path / "onnx")]) == 0
    (tmp_path / "photos").mkdir()
    Image.fromarray(skimage.data.chelsea()[:150, :200]).save(tmp_path / "photos" / "chelsea.png")
    Image.fromarray(skimage.data.coffee()[100:300, 200:456]).save(tmp_path / "photos" / "coffee.png")
    capsys.readouterr()
    out = tmp_path / "crossing.json"
    assert crossing.main([str(tmp_path / "nic"), str(tmp_path / "onnx"), "--tasks", "q2", "--images",
                          str(tmp_path / "photos"), "--json", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| rate | images | crossings") and table[2].startswith("| q2 | 2 | 4 | 0 | **0** |")
    (row,) = json.loads(out.read_text())
    assert (row["crossings"], row["refused"], row["misdecoded"]) == (4, 0, 0) and 0 <= row["identical"] <= 2
    assert 0 < row["pinned_bytes_median"] <= row["pinned_bytes_max"]
    assert 0 < row["pinned_bpp_median"] < row["bpp_median"] and 0 <= row["disagreement"] < BOUNDARY_MARGIN
    codec = load_task(tmp_path / "onnx" / "q2")
    codec.scale_table = codec.scale_table * np.float32(0.9)  # every index moves (see test_export): refused both ways
    model = load_shared_model(str(tmp_path / "nic"), progress=False)
    assert crossing._cross_image(codec, model, skimage.data.chelsea()[:150, :200])[0] == ["refused", "refused"]


@pytest.mark.parametrize(("args", "message"), [(["--threads", "0"], "--threads 0 must be at least 1"),
                                               (["--images", "{empty}"], "holds no PNG image")])
def test_a_bad_option_is_one_line(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as ended:
        crossing.main([str(tmp_path), str(tmp_path), *[a.format(empty=tmp_path) for a in args]])
    assert ended.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]
