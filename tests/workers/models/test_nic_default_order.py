"""The default NIC job (`pngrow run --family nic`, its default budget and evaluation images) is a codec: its rates
come out ordered, bpp and PSNR both rising with the rate's lambda (issue 18). About 8 minutes on 2 CPU cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pngrow.pipeline.cli import main
from pngrow.workers.models import get_family
from pngrow.workers.models.nic import lambda_of


@pytest.mark.slow
def test_the_default_nic_job_gives_an_ordered_rate_distortion_curve(tmp_path: Path) -> None:
    report = tmp_path / "nic.json"
    assert main(["run", "--family", "nic", "--quiet", "--json", str(report)]) == 0
    tasks = json.loads(report.read_text())["tasks"]
    assert [t["name"] for t in tasks] == list(get_family("nic").tasks)
    by_rate = sorted(tasks, key=lambda t: lambda_of(t["name"]))
    curve = [(t["name"], round(t["metrics"]["bpp"], 4), round(t["metrics"]["psnr"], 2)) for t in by_rate]
    for low, high in zip(by_rate, by_rate[1:]):
        assert low["metrics"]["bpp"] < high["metrics"]["bpp"], f"bpp does not rise with the rate: {curve}"
        assert low["metrics"]["psnr"] < high["metrics"]["psnr"], f"PSNR does not rise with the rate: {curve}"
