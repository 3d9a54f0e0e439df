from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import onnx
from pngrow.pipeline.cli import main
from tests.tiny_models import TINY_RUN


@pytest.mark.slow
def test_each_task_is_timed_in_both_runtimes_and_written(tmp_path: Path, capsys) -> None:
    assert main(["run", "--family", "sisr", "--tasks", "x2,x3", "--arch", "width=8", "--arch", "depth=1", "--arch",
                 "lr_patch=8", "--out", str(tmp_path / "sisr"), *TINY_RUN]) == 0
    capsys.readouterr()
    out = tmp_path / "speed.json"
    assert onnx.main([str(tmp_path / "sisr"), "--tasks", "x3", "--size", "32", "--rounds", "2", "--json",
                      str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| task | ORT dense ms") and table[2].startswith("| x3 |") and len(table) == 3
    (row,) = json.loads(out.read_text())
    assert row["task"] == "x3" and 0 <= row["max_difference"] <= 1e-4
    for key in ("ort_ms", "ort_dense_ms", "torch_ms", "torch_dense_ms"):
        assert math.isfinite(row[key]) and row[key] > 0
    assert row["ort_speedup"] == pytest.approx(row["ort_dense_ms"] / row["ort_ms"])


@pytest.mark.parametrize("args, message", [(["--rounds", "0"], "--rounds 0 must be at least 1"),
                                           (["--opset", "99"], "opset 99 is not supported by ONNX Runtime"),
                                           (["--threads", "0"], "--threads 0 must be at least 1")])
def test_a_bad_option_is_one_line(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as ended:
        onnx.main([str(tmp_path), *args])
    assert ended.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]
