"""``pngrow status``: searches in the tracking store, each with its stages and trials, read from MLflow runs."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from mlflow.entities import Run

from . import names
from .names import Kind
from .tracking import Tracking, tag_filter

__all__ = ["SearchStatus", "format_status", "search_status"]


@dataclass(frozen=True)
class SearchStatus:
    """One search as MLflow records it."""

    search_id: str
    name: str
    state: str  # MLflow's run status: RUNNING, FINISHED, FAILED, KILLED
    started: float  # epoch seconds
    tasks: list[str]
    stages_done: int
    current_task: str | None  # the stage in progress
    trials_done: int
    trials_failed: int
    trials_running: int
    error: str
    trials_stopped: int = 0  # stopped early by their stage's rung


def search_status(tracking: Tracking, limit: int = 20) -> list[SearchStatus]:
    """The newest ``limit`` searches of the tracking experiment."""
    searches = tracking.runs(tag_filter(names.KIND, Kind.SEARCH))[:limit]
    out = []
    for run in searches:
        search_id = run.info.run_id
        children = tracking.runs(tag_filter(names.SEARCH_ID, search_id), [run.info.experiment_id])
        stages = [r for r in children if r.data.tags.get(names.KIND) == Kind.STAGE]
        trials = [r for r in children if r.data.tags.get(names.KIND) == Kind.TRIAL]
        running = [s for s in stages if s.info.status == "RUNNING"]
        out.append(SearchStatus(
            search_id=search_id,
            name=run.info.run_name or "",
            state=run.info.status,
            started=run.info.start_time / 1000,
            tasks=run.data.tags.get(names.TASKS, "").split(","),
            stages_done=sum(s.info.status == "FINISHED" for s in stages),
            current_task=running[0].data.tags.get(names.TASK) if running else None,
            trials_done=sum(t.info.status == "FINISHED" for t in trials),
            trials_failed=sum(t.info.status in ("FAILED", "KILLED") and not _stopped_early(t) for t in trials),
            trials_running=sum(t.info.status == "RUNNING" for t in trials),
            error=run.data.tags.get(names.ERROR, ""),
            trials_stopped=sum(t.info.status == "KILLED" and _stopped_early(t) for t in trials),
        ))
    return out


def _stopped_early(trial: Run) -> bool:
    """Whether the trial's stage's rung stopped it early."""
    return names.STOPPED_EARLY in trial.data.tags


def format_status(searches: list[SearchStatus]) -> str:
    """A table of searches, newest first.

    >>> print(format_status([]))
    no searches yet
    """
    if not searches:
        return "no searches yet"
    rows = [["search id", "name", "state", "started", "stages", "now", "trials ok/stopped/failed/running"]]
    for s in searches:
        started = dt.datetime.fromtimestamp(s.started).strftime("%Y-%m-%d %H:%M")
        rows.append([s.search_id, s.name, s.state, started, f"{s.stages_done}/{len(s.tasks)} ({','.join(s.tasks)})",
                     s.current_task or "-", f"{s.trials_done}/{s.trials_stopped}/{s.trials_failed}/{s.trials_running}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"{s.search_id}: {s.error.splitlines()[0]}" for s in searches if s.error]
    return "\n".join(lines)
