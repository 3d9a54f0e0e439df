"""How long work tells of its progress: log lines (a :data:`Log` the caller passes in) and progress bars, drawn only
when standard error is a terminal (quiet in logs and CI)."""

from __future__ import annotations

import sys
from typing import Any, Callable

from tqdm import tqdm

__all__ = ["Log", "progress_bar"]

Log = Callable[[str], None]  # where a job, a search or a command writes its progress lines (``print``, a logger)


def progress_bar(total: int, unit: str, description: str = "", enabled: bool = True, file: Any = None,
                 initial: int = 0) -> Any:
    """A tqdm bar of ``total`` ``unit`` on standard error; disabled (updates are no-ops) off a terminal or when
    not ``enabled``."""
    stream = file or sys.stderr
    return tqdm(total=total, unit=f" {unit}", desc=description, disable=not (enabled and stream.isatty()),
                leave=False, dynamic_ncols=True, file=stream, initial=initial)
