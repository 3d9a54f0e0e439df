"""The errors pngrow raises for its users' mistakes and for searches that cannot go on; each prints as one line."""

from __future__ import annotations

__all__ = ["ConfigError", "SearchError", "ServiceError", "failure_line"]


class ConfigError(ValueError):
    """A configuration or search-space file with a missing, unknown or badly typed field."""


class SearchError(RuntimeError):
    """A search that cannot go on (every trial of a stage failed, an earlier task changed, a run has no model)."""


class ServiceError(SearchError):
    """A tracking server, database or object store that cannot be reached; the message names it, without secrets.

    ``service`` says which: ``"tracking"``, ``"artifacts"`` or ``"optuna"`` (empty when unknown).
    """

    def __init__(self, message: str, service: str = "") -> None:
        super().__init__(message)
        self.service = service

    def __reduce__(self) -> tuple:  # Ray pickles it back to the driver, service and all
        return (type(self), (str(self), self.service))


def failure_line(error: BaseException, limit: int = 300) -> str:
    """The one line pngrow shows, logs and tags for a failure: the error's type and its message's first line.

    >>> failure_line(ValueError("bad block shape '3'\\nmore detail"))
    "ValueError: bad block shape '3'"
    """
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first}"[:limit] if first else type(error).__name__
