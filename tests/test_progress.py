from __future__ import annotations

import io
import sys

import pytest

from pngrow._progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_are_silent_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(3, "tiles") as bar:
        assert bar.disable
        bar.update(3)
    assert sys.stderr.getvalue() == ""


def test_bars_draw_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress_bar(3, "tiles", file=terminal) as bar:
        assert not bar.disable
        bar.update(3)
    assert "0/3" in terminal.getvalue() and "tiles" in terminal.getvalue()
    with progress_bar(3, "tiles", enabled=False) as quiet:
        assert quiet.disable
