"""What a search returns: a summary per stage and the search's totals."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .records import TrialOutcome
from .study import Candidate

__all__ = ["Laps", "SearchResult", "StageSummary"]


class Laps:
    """Where a search's wall time went: each :meth:`lap` names the seconds since the one before.

    >>> laps = Laps(start=0.0)
    >>> laps.lap("setup", now=1.5); laps.lap("stage x2", now=4.0); laps.seconds
    {'setup': 1.5, 'stage x2': 2.5}
    """

    def __init__(self, start: float | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.started = self._last = time.time() if start is None else start

    def lap(self, name: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


@dataclass(kw_only=True)
class StageSummary:
    """One stage of a search: its MLflow run, the trial chosen, how many finished, failed or were stopped early, the
    Pareto front, and when this driver's trials trained (epoch-second intervals; empty for a stage committed before
    a restart)."""

    task: str
    run_id: str
    study: str
    chosen: TrialOutcome
    finished: int
    failed: int
    front: list[Candidate] = field(default_factory=list)
    train_intervals: list[tuple[float, float]] = field(default_factory=list)
    stopped: int = 0  # trials the stage's rung stopped early


@dataclass(kw_only=True)
class SearchResult:
    """A finished search. ``overhead`` is the share of wall time during which no trial was training."""

    search_id: str
    name: str
    stages: list[StageSummary]
    final_metrics: dict[str, dict[str, float]]
    model_uri: str
    wall_seconds: float
    train_seconds: float  # union of all trials' training intervals
    overhead: float
    utilisation: float  # summed training time over (wall time x parallel trial slots)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # the wall time by part, in order (see Laps)

    @property
    def trials(self) -> int:
        return sum(s.finished + s.failed + s.stopped for s in self.stages)
