"""Checks for YAML mappings and folders that name the bad field, value or path in one line."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

__all__ = ["ConfigError", "check_keys", "typed", "writable_folder"]


def check_keys(mapping: Any, where: str, allowed: set[str], required: set[str] = frozenset()) -> Mapping[str, Any]:
    """``mapping`` as a dict with only ``allowed`` keys and every ``required`` one; ``where`` names it in errors.

    >>> check_keys({"famly": "sisr"}, "config", {"family"})
    Traceback (most recent call last):
    ...
    pngrow.errors.ConfigError: config: unknown field 'famly' (known: family)
    """
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where}: expected a mapping of fields, got {type(mapping).__name__} {mapping!r}")
    unknown = sorted(set(map(str, mapping)) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(mapping))
    if missing:
        raise ConfigError(f"{where}: missing field {missing[0]!r}")
    return mapping


def typed(value: Any, field: str, kind: type | tuple[type, ...]) -> Any:
    """``value`` if it is a ``kind`` (an int is a float too; a bool is never a number), else a one-line error.

    >>> typed("8", "config field 'trials'", int)
    Traceback (most recent call last):
    ...
    pngrow.errors.ConfigError: config field 'trials' is '8', not int
    """
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{field} is {value!r}, not {names}")
    return value


def writable_folder(path: str | Path, what: str) -> Path:
    """``path``, created if missing, once a file could be made in it; else a ``ValueError`` naming it as ``what``.

    >>> writable_folder("/dev/null/pngrow", "output folder")
    Traceback (most recent call last):
    ...
    ValueError: output folder '/dev/null/pngrow' cannot be written: Not a directory
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise ValueError(f"{what} {str(path)!r} cannot be written: {exc.strerror or exc}") from None
    return folder
