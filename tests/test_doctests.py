"""Every docstring example in the package runs as written (imported as ``pngrow.*``, as users import it), and every
example written runs: a module whose examples doctest does not find fails, as does a walk that finds no module."""

from __future__ import annotations

import doctest
import functools
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import pngrow

REPO = Path(__file__).resolve().parents[1]
# pngrow's subpackages live in sibling folders (pyproject's package-dir), so walk each one too.
PACKAGES = {"pngrow": "pngrow", "pngrow.workers": "workers", "pngrow.pipeline": "pipeline",
            "pngrow.search_spaces": "search_spaces"}
MODULES = ["pngrow", *(m.name for m in pkgutil.walk_packages(pngrow.__path__, "pngrow."))]
for _package in ("pngrow.workers", "pngrow.pipeline", "pngrow.search_spaces"):
    _module = importlib.import_module(_package)
    MODULES += [_package, *(m.name for m in pkgutil.walk_packages(_module.__path__, f"{_package}."))]
MODULES = sorted({name for name in MODULES if not name.endswith("__main__")})


def _written_examples(module) -> int:  # noqa: ANN001
    """How many examples the module's source holds to run: its lines that start with ``>>>``, but ``+SKIP``."""
    return sum(line.lstrip().startswith(">>>") and "doctest: +SKIP" not in line
               for line in inspect.getsource(module).splitlines())


def _doctests(module) -> list[doctest.DocTest]:  # noqa: ANN001
    """doctest's own finds, and the docstrings of ``functools.cached_property`` attributes, which it skips."""
    finder = doctest.DocTestFinder()
    tests = finder.find(module)
    classes = [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module.__name__]
    for cls in classes:
        for name, value in vars(cls).items():
            if isinstance(value, functools.cached_property):
                tests += finder.find(value.func, f"{module.__name__}.{cls.__qualname__}.{name}", module=module,
                                     globs=vars(module))
    return tests


def test_every_module_of_the_package_is_searched() -> None:
    on_disk = set()
    for package, folder in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            if parts[-1:] != ("__main__",):
                on_disk.add(".".join((package, *parts)))
    assert set(MODULES) == on_disk


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in _doctests(module):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    assert result.attempted == _written_examples(module), f"{name}: examples written but not run"
