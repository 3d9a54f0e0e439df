"""The search's driver reads and writes plain records (pngrow.pipeline.records) and never imports the worker code:
importing every driver module loads no PyTorch. A fresh interpreter tells, since the test session has torch loaded."""

from __future__ import annotations

import subprocess
import sys

DRIVER = ["search", "scheduler", "results", "resume", "final_check", "report", "status", "records", "early_stopping"]

# Imports each driver module in turn and prints the first one after which torch is loaded ('' when none is).
_PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module("pngrow.pipeline." + name)
    if "torch" in sys.modules:
        print(name)
        break
"""


def test_importing_the_driver_loads_no_torch() -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE, *DRIVER], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", f"importing pngrow.pipeline.{done.stdout.strip()} loads torch"
