"""Tiny shared models trained in seconds with `pngrow run --out`, for the tests that restore images with them."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pngrow.pipeline.cli import main

TINY_RUN = ["--grow-steps", "2", "--prune-steps", "2", "--finetune-steps", "1", "--batch-size", "2",
            "--eval-limit", "1", "--quiet"]


def tiny_models(root: Path, nic_tasks: str = "q6,q2", sisr_tasks: str = "x2,x3", sisr_width: int = 8,
                extra: Sequence[str] = TINY_RUN) -> dict[str, Path]:
    """A NIC model (N=M=16) and a SISR model (one residual block) saved under ``root``: {"nic": ..., "sisr": ...}."""
    assert main(["run", "--family", "nic", "--tasks", nic_tasks, "--arch", "N=16", "--arch", "M=16", "--arch",
                 "patch=64", "--out", str(root / "nic"), *extra]) == 0
    assert main(["run", "--family", "sisr", "--tasks", sisr_tasks, "--arch", f"width={sisr_width}", "--arch",
                 "depth=1", "--arch", "lr_patch=8", "--out", str(root / "sisr"), *extra]) == 0
    return {"nic": root / "nic", "sisr": root / "sisr"}
