"""The errors pngrow raises for its users' mistakes and for searches that cannot go on; each prints as one line."""

from __future__ import annotations

__all__ = ["ConfigError", "SearchError", "ServiceError"]


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
