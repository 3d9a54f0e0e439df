"""Every docstring example in the package runs as written (imported as ``pngrow.*``, as users import it)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import pngrow

MODULES = ["pngrow", *(m.name for m in pkgutil.walk_packages(pngrow.__path__, "pngrow."))]
# pngrow's subpackages live in sibling folders (pyproject's package-dir), so walk each one too.
for _package in ("pngrow.workers", "pngrow.pipeline", "pngrow.search_spaces"):
    _module = importlib.import_module(_package)
    MODULES += [_package, *(m.name for m in pkgutil.walk_packages(_module.__path__, f"{_package}."))]
MODULES = sorted({name for name in MODULES if not name.endswith("__main__")})


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
