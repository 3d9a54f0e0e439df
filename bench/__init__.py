"""Benchmarks: PnG against separate dense models and a fully shared model (``python -m bench --help``)."""

from __future__ import annotations

import argparse

__all__ = ["require_at_least"]


def require_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, least: int, *names: str) -> None:
    """End with ``parser``'s one-line error on the first option of ``names`` whose value in ``args`` is below
    ``least``; an option left out (None) passes.

    >>> require_at_least(argparse.ArgumentParser(), argparse.Namespace(rounds=3, size=None), 1, "rounds", "size")
    """
    for name in names:
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} {value} must be at least {least}")
