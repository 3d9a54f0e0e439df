"""The benchmarks run from an installed pngrow (``python -m pngrow.bench...``): every module of ``pngrow.bench``
imports outside a checkout, so none reaches into the tests (the tests may import ``bench``, not the other way)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Imports every module of the installed pngrow.bench and prints any tests module that came with them.
_PROBE = """
import importlib, pkgutil, sys
import pngrow.bench
for module in pkgutil.iter_modules(pngrow.bench.__path__, "pngrow.bench."):
    if not module.name.endswith("__main__"):
        importlib.import_module(module.name)
print(" ".join(name for name in sys.modules if name == "tests" or name.startswith("tests.")))
"""


def test_every_bench_module_imports_from_the_installed_package_without_the_tests(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # no checkout on the path
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == ""
