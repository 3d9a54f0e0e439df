"""Resuming a search whose driver died, from what its MLflow runs and Optuna study recorded: the config, the stages
already committed, and the current stage's trials (finished ones kept, cut-off ones closed).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import optuna
from mlflow.entities import Run

from ..errors import ConfigError
from . import names
from .config import SearchConfig, config_from_fields
from .early_stopping import RungReport
from .names import Kind
from .plan import SearchContext
from .records import TrialOutcome
from .results import StageSummary
from .tracking import Tracking
from .uris import redact

__all__ = ["CONFIG_ARTIFACT", "Recovered", "earlier_runs", "finished_stage", "recorded_config", "recover_trials"]

CONFIG_ARTIFACT = "search_config.json"  # the search run's config, passwords redacted


def recorded_config(tracking: Tracking, search_id: str, optuna_storage: str | None = None,
                    ray_address: str | None = None) -> SearchConfig:
    """The config search ``search_id`` ran with, pointed at ``tracking``; ``optuna_storage`` must be given again
    when the recorded one had a password, ``ray_address`` replaces the recorded cluster."""
    try:
        run = tracking.run(search_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own error types for a missing run
        raise ConfigError(f"search {search_id!r} does not exist at {redact(tracking.uri)!r}") from None
    if run.data.tags.get(names.KIND) != Kind.SEARCH:
        raise ConfigError(f"run {search_id!r} is not a pngrow search")
    if run.info.status == "FINISHED":
        raise ConfigError(f"search {search_id!r} has finished; there is nothing to resume")
    recorded = tracking.load_dict(search_id, CONFIG_ARTIFACT)
    recorded.pop("search_space_resolved", None)
    config = config_from_fields(recorded, f"{CONFIG_ARTIFACT} of search {search_id!r}")
    config = replace(config, tracking_uri=tracking.uri, optuna_storage=optuna_storage or config.optuna_storage,
                     experiment=tracking.experiment_name(run.info.experiment_id),
                     ray=replace(config.ray, address=ray_address or config.ray.address))
    if "***" in (config.optuna_storage or ""):
        raise ConfigError(f"search {search_id!r} used an Optuna storage with a password, which is not recorded: "
                          "give it again with --optuna-storage")
    return config


def earlier_runs(tracking: Tracking, search_id: str) -> tuple[str | None, dict[int, Run]]:
    """The base run's id (None without one) and the stage runs by stage index that a dead attempt left."""
    search = tracking.run(search_id)
    base = None
    for run in tracking.children(search, Kind.BASE):
        base = run.info.run_id
    return base, {int(run.data.tags[names.STAGE_INDEX]): run for run in tracking.children(search, Kind.STAGE)}


def finished_stage(tracking: Tracking, stage: Run) -> StageSummary:
    """The summary of a stage committed before the restart, from its runs."""
    trials = tracking.children(stage, Kind.TRIAL)
    chosen = tracking.run(stage.data.tags[names.CHOSEN_TRIAL_RUN])
    return StageSummary(task=stage.data.tags[names.TASK], run_id=stage.info.run_id,
                        study=stage.data.tags[names.OPTUNA_STUDY], chosen=TrialOutcome.from_run(chosen),
                        finished=sum(t.info.status == "FINISHED" for t in trials),
                        failed=sum(t.info.status == "FAILED" for t in trials),
                        stopped=sum(t.info.status == "KILLED" and names.STOPPED_EARLY in t.data.tags for t in trials))


@dataclass
class Recovered:
    """What a dead driver left of a stage: the finished outcomes by Optuna trial number, how many trials failed and
    how many their rung stopped early, and every value the stage's rung had been told, by trial run."""

    outcomes: dict[int, TrialOutcome] = field(default_factory=dict)
    failed: int = 0
    stopped: int = 0
    rung_values: dict[str, float] = field(default_factory=dict)


def recover_trials(ctx: SearchContext, study: optuna.Study, stage_run: str) -> Recovered:
    """Keep the finished trials of a stage a dead driver left (also those whose worker finished after the driver
    died: their run holds the outcome) and the ones its rung stopped early (KILLED in MLflow, PRUNED in Optuna);
    close the unfinished ones as KILLED (MLflow) and FAIL (Optuna)."""
    recovered = Recovered()
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    for run in ctx.tracking.children(ctx.tracking.run(stage_run), Kind.TRIAL):
        number = int(run.data.tags[names.OPTUNA_TRIAL])
        running = states.get(number) == optuna.trial.TrialState.RUNNING
        rung = RungReport.from_run(run)
        if rung is not None and ctx.plan.quality in rung.metrics:
            recovered.rung_values[run.info.run_id] = rung.metrics[ctx.plan.quality]
        if run.info.status in ("FINISHED", "RUNNING") and TrialOutcome.recorded(run):
            outcome = recovered.outcomes[number] = TrialOutcome.from_run(run)
            if running:
                study.tell(number, outcome.objective_values(ctx.plan.quality, ctx.config.costs))
            if run.info.status == "RUNNING":
                ctx.tracking.end_run(run.info.run_id)
        elif names.STOPPED_EARLY in run.data.tags and run.info.status in ("KILLED", "RUNNING"):
            recovered.stopped += 1
            _close_stopped(ctx, study, run, number, running)
        elif run.info.status == "FAILED":
            recovered.failed += 1
        else:
            _close(ctx, study, run, number, running)
    return recovered


def _close_stopped(ctx: SearchContext, study: optuna.Study, run: Run, number: int, running: bool) -> None:
    """End a trial its rung stopped that the dead driver had not closed: KILLED in MLflow, PRUNED in Optuna."""
    if run.info.status == "RUNNING":
        ctx.tracking.end_run(run.info.run_id, "KILLED")
    if running:
        study.tell(number, state=optuna.trial.TrialState.PRUNED)


def _close(ctx: SearchContext, study: optuna.Study, run: Run, number: int, running: bool) -> None:
    """Close a trial the restart cut off: KILLED in MLflow, FAIL in Optuna."""
    ctx.tracking.log(run.info.run_id, tags={names.ERROR: "its driver died; the search was resumed without it"})
    ctx.tracking.end_run(run.info.run_id, "KILLED")
    if running:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    ctx.log(f"trial run {run.info.run_id} (Optuna trial {number}) was cut off by the restart: KILLED")
