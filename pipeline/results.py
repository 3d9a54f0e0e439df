"""What a search returns: a summary per stage and the search's totals."""

from __future__ import annotations

from dataclasses import dataclass, field

from .records import TrialOutcome
from .study import Candidate

__all__ = ["SearchResult", "StageSummary"]


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

    @property
    def trials(self) -> int:
        return sum(s.finished + s.failed + s.stopped for s in self.stages)
