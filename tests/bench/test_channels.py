from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import channels


def test_every_output_count_is_timed_and_written(tmp_path: Path, capsys) -> None:
    out = tmp_path / "times.json"
    assert channels.main(["--channels", "24", "--size", "12", "--step", "8", "--rounds", "2", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("3x3 conv, 24 inputs, 12x12, cpu")
    assert [line.split()[0] for line in lines[1:]] == ["24", "16", "8"]
    assert "1.00 of the full layer's time" in lines[1]
    written = json.loads(out.read_text())
    assert list(written) == ["24", "16", "8"] and all(math.isfinite(v) and v > 0 for v in written.values())


@pytest.mark.parametrize("args, message", [(["--step", "0"], "--step 0 must be at least 1"),
                                           (["--channels", "-4"], "--channels -4 must be at least 1"),
                                           (["--device", "bogus"], "--device 'bogus': RuntimeError: ")])
def test_a_bad_count_or_device_is_one_line(capsys, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as ended:
        channels.main(args)
    assert ended.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]
