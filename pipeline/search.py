"""The search driver: one prune-and-grow stage per task, in task order, each an Optuna study whose trials run on
Ray workers; every search, stage and trial is an MLflow run, and the last stage's model is logged as a pyfunc model.

Stage t's trials all grow from the checkpoint that stage t-1 selected (logged on stage t-1's run); the selection
rule picks one finished trial per stage from quality and cost (see :mod:`pngrow.pipeline.study`).

``pngrow search CONFIG`` reads the config (:mod:`.config`), checks it (:func:`.plan.prepare`), then :func:`run_search`
drives the search: for each task :func:`.scheduler.run_stage` runs the stage, whose Optuna study
(:mod:`.study`) asks for trials; each trial is :func:`.trial.run_trial` on a worker, which trains the task
(:func:`pngrow.workers.training.train_task`, the PnG core). Driver and workers hand each other the plain records of
:mod:`.records`: the driver's modules import no PyTorch. :func:`.final_check.final_check` checks the final model.
``pngrow resume`` recovers a dead search (:mod:`.resume`).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ray

from .._progress import Log
from ..errors import ServiceError, failure_line
from . import names
from .cluster import Cluster, RayTarget, probe, ray_target
from .config import SearchConfig, flat_params, public_config
from .data_cache import list_sources, upload_folder
from .final_check import DRIFT_TOLERANCE, final_check
from .names import Kind
from .plan import Base, Plan, SearchContext, prepare
from .preflight import check_artifact_store, check_services
from .results import Laps, SearchResult, StageSummary
from .resume import CONFIG_ARTIFACT, earlier_runs, finished_stage, recorded_config
from .scheduler import run_stage
from .tracking import Tracking
from .uris import is_remote, redact

__all__ = ["DRIFT_TOLERANCE", "SearchResult", "StageSummary", "prepare", "resume_search", "run_search",
           "union_seconds"]

# What a trial's worker imports before its first step, warmed while the search run starts: PyTorch and the PnG core,
# and TorchDynamo, which torch.optim imports when the first optimiser is made (1.2 s on 2 cores).
TRIAL_MODULES = ("pngrow.pipeline.trial", "torch._dynamo")


def run_search(config: SearchConfig, log: Log = print) -> SearchResult:
    """Run a whole search; returns when the final shared model is logged. Failures mark the runs FAILED.

    With ``config.base_model`` the search grows ``config.tasks`` into that released model: its tasks come first,
    unchanged (their fingerprints are checked at the end), and the lineage points at it.
    """
    with tempfile.TemporaryDirectory(prefix="pngrow-base-") as scratch:
        return _drive(prepare(config, Path(scratch)), log)


def resume_search(search_id: str, tracking_uri: str, log: Log = print, optuna_storage: str | None = None,
                  ray_address: str | None = None) -> SearchResult:
    """Continue a search whose driver died: committed stages are kept, the current stage keeps its finished trials
    and runs only the ones still owed, and the dead attempt's unfinished runs are closed as KILLED.

    The search's config comes from its run (``search_config.json``); URIs whose password was redacted there must be
    given again (``optuna_storage``).
    """
    config = recorded_config(Tracking(tracking_uri), search_id, optuna_storage, ray_address)
    with tempfile.TemporaryDirectory(prefix="pngrow-resume-") as scratch:
        return _drive(prepare(config, Path(scratch)), log, resumed=search_id)


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals.

    >>> union_seconds([(0, 2), (1, 3), (5, 6)])
    4
    """
    total, end = 0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _drive(plan: Plan, log: Log, resumed: str | None = None) -> SearchResult:
    """Start (or, with ``resumed``, reopen) the search run, run every stage, check and log the final model."""

    config = plan.config
    laps = Laps()
    check_services(config)
    target = ray_target(config.ray)
    probe(target)  # a Ray address that does not answer: one line, before any run is created
    elsewhere = _workers_elsewhere(target)  # then trials read local data from the search run's artifacts
    plan, tracking = _list_data_and_open_tracking(plan)  # a bad input or store is named before anything starts
    laps.lap("setup")
    cluster = Cluster(config.ray)
    try:
        # the first trials' workers import PyTorch, the family's codec library and MLflow's store while the search
        # run starts
        cluster.warm((*TRIAL_MODULES, *plan.family.lazy_imports, *Tracking.store_modules(tracking.uri)))
        laps.lap("ray")
        plan, search_id = _open_search_run(plan, tracking, elsewhere, resumed, log)
        try:
            laps.lap("search run")
            ctx = SearchContext(plan, tracking, cluster, search_id, log)
            log(f"Ray: {cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs; trials ask for "
                f"{'a GPU' if cluster.device == 'cuda' else 'CPUs'} (device {config.ray.device}), {ctx.parallel} "
                "at a time")
            idle = -config.trials_per_stage % ctx.parallel
            if idle and not config.smoke_test:  # a smoke test's one trial per stage is meant to run alone
                log(f"note: {config.trials_per_stage} trials per stage on {ctx.parallel} slots leave {idle} slot(s) "
                    f"idle while each stage's last trials run; {config.trials_per_stage + idle} would fill them")
            stages = _run_stages(ctx, resumed is not None, laps)
            final = final_check(ctx, stages)
            laps.lap("final check")
            return _finish(ctx, stages, final, laps)
        except BaseException as exc:
            _mark_ended(tracking, search_id, exc, log)
            raise
    finally:
        cluster.close()


def _list_data_and_open_tracking(plan: Plan) -> tuple[Plan, Tracking]:
    """The plan with its ``s3://`` data and init listed (trials refuse an object that changed since, see
    :mod:`.data_cache`), and the tracking store, its artifact store checked."""
    config = plan.config
    plan = replace(plan, manifest=list_sources((config.train_data, config.eval_data), (config.init,),
                                               config.data_cache))
    if config.local_artifact_root() or not config.optuna_storage:  # local artifacts or the default SQLite study
        Path(config.workdir).mkdir(parents=True, exist_ok=True)
    tracking = Tracking(config.resolved_tracking_uri(), config.experiment, config.local_artifact_root())
    check_artifact_store(tracking.artifact_location)
    return plan, tracking


def _open_search_run(plan: Plan, tracking: Tracking, elsewhere: bool, resumed: str | None,
                     log: Log) -> tuple[Plan, str]:
    """The plan (its local data uploaded for workers ``elsewhere``) and its search run: a new one, or the
    ``resumed`` one reopened."""
    if resumed is None:
        search_id, plan = _start_search_run(plan, tracking, elsewhere, log)
    else:
        search_id = _reopen_search_run(tracking, resumed)
    log(f"pngrow search {plan.config.name!r}: id {search_id}, tracking {redact(tracking.uri)}"
        + (" (resumed)" if resumed else ""))
    if resumed is not None and elsewhere:  # data uploaded when it started are runs:/ URIs in its config: kept
        try:
            plan = _upload_data(plan, tracking, search_id, log, relog=True)
        except BaseException as exc:
            _mark_ended(tracking, search_id, exc, log)
            raise
    return plan, search_id


def _workers_elsewhere(target: RayTarget) -> bool:
    """Whether the search's Ray may run trials on other machines: it is not one this process starts (a cluster, a
    Ray job's, or one this process had joined already)."""
    return not target.starts_local or ray.is_initialized()


def _start_search_run(plan: Plan, tracking: Tracking, upload_data: bool = False,
                      log: Log | None = None) -> tuple[str, Plan]:
    """A new search run holding the config (params and ``search_config.json``, passwords redacted), the config's
    local init weights (``init/``) and, with ``upload_data``, its local data folders (``data/``, see
    :func:`_upload_data`); the plan returned names those by their ``runs:/`` URI, which trials read."""
    search_id = tracking.start_run(plan.config.name, {names.KIND: Kind.SEARCH, names.FAMILY: plan.config.family,
                                                      names.TASKS: ",".join(plan.family.tasks)})
    try:  # uploaded once: no trial reads the driver's disk
        if plan.config.init and not is_remote(plan.config.init):
            init = tracking.log_file(search_id, plan.config.init, "init")
            plan = replace(plan, config=replace(plan.config, init=init))
        if upload_data:
            plan = _upload_data(plan, tracking, search_id, log)
    except BaseException as exc:
        _mark_ended(tracking, search_id, exc, log or (lambda _: None))
        raise
    config = plan.config
    tags = {names.SEARCH_ID: search_id, names.QUALITY: plan.quality, names.COST: config.cost}
    if plan.base is not None:
        tags[names.GROWN_FROM_MODEL] = plan.base.label
    if config.smoke_test:
        tags[names.SMOKE_TEST] = "true"
    tracking.log(search_id, params=flat_params(config), tags=tags)
    _log_config(plan, tracking, search_id)
    tracking.describe(search_id, describe_search(plan))
    return search_id, plan


def _log_config(plan: Plan, tracking: Tracking, search_id: str) -> None:
    """The config as the search run's ``search_config.json`` (what a resume reads), passwords redacted."""
    tracking.log_dict(search_id, {**public_config(plan.config), "search_space_resolved": plan.space.name},
                      CONFIG_ARTIFACT)


def _upload_data(plan: Plan, tracking: Tracking, search_id: str, log: Log | None = None,
                 relog: bool = False) -> Plan:
    """The plan with each local data folder (train, eval) uploaded once to the search run (``data/<split>/``, see
    :func:`.data_cache.upload_folder`) and named by its ``runs:/`` URI, for Ray workers on machines without the
    driver's disk; the search run is tagged with each folder uploaded. ``s3://`` data and earlier uploads are kept.
    With ``relog`` (a resumed search), a plan that changed is recorded again as the run's config."""

    config, uploaded = plan.config, {}
    for split, source in (("train", config.train_data), ("eval", config.eval_data)):
        if source and not is_remote(source):
            if source not in uploaded:
                if log is not None:
                    log(f"data {split}: uploading {source!r} to the search run, for the Ray cluster's workers")
                uploaded[source] = upload_folder(source, tracking, search_id, split)
            tracking.log(search_id, tags={names.uploaded_data_tag(split): str(Path(source).absolute())})
    if not uploaded:
        return plan
    plan = replace(plan, config=replace(config, train_data=uploaded.get(config.train_data, config.train_data),
                                        eval_data=uploaded.get(config.eval_data, config.eval_data)))
    if relog:
        _log_config(plan, tracking, search_id)
    return plan


def describe_search(plan: Plan) -> str:
    """What was searched, in a few Markdown lines: the run's description in the MLflow UI."""
    config, space = plan.config, plan.space
    searched = ", ".join(f"`{name}`" for name in space.parameters) or "nothing (fixed settings)"
    grown = f" into `{plan.base.label}`" if plan.base is not None else ""
    stopping = config.early_stopping
    stops = (f" A trial whose {plan.quality} at the end of growing is outside the best {stopping.keep:.0%} of the "
             f"stage's so far stops there (early stopping).") if stopping else ""
    return (f"**pngrow search `{config.name}`**: {config.family} tasks {', '.join(config.tasks)}{grown}, one stage "
            f"per task in that order.\n\nEach stage searches {searched} (space `{space.name}`) over "
            f"{config.trials_per_stage} trials for {plan.quality} against {', '.join(config.costs)}, and hands on "
            f"the trial `{config.rule}` picks (tolerance {config.tolerance:g}).{stops}"
            + ("\n\n**Smoke test** (`--smoke-test`): a few training steps per stage, to check the search runs; its "
               "model is not for promotion." if config.smoke_test else ""))


def _reopen_search_run(tracking: Tracking, search_id: str) -> str:
    """The search run of a dead driver, RUNNING again, its attempt counted and its error cleared."""
    tracking.reopen_run(search_id)
    attempts = int(tracking.run(search_id).data.tags.get(names.ATTEMPTS, "1")) + 1
    tracking.log(search_id, tags={names.ATTEMPTS: attempts, names.ERROR: ""})
    return search_id


def _mark_ended(tracking: Tracking, search_id: str, exc: BaseException, log: Log) -> None:
    """Mark the search run FAILED (KILLED on Ctrl-C) with the failure line, unless the tracking server is gone."""
    if isinstance(exc, ServiceError) and exc.service == "tracking":
        return
    try:
        tracking.log(search_id, tags={names.ERROR: failure_line(exc, 5000)})
        tracking.end_run(search_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
    except ServiceError as lost:
        log(f"could not mark search {search_id} as ended: {lost}")


def _run_stages(ctx: SearchContext, resumed: bool, laps: Laps) -> list[StageSummary]:
    """Every stage in task order, each grown from the one before (or the base), each a lap; a resumed search keeps
    the stages committed before the restart."""
    base_run, earlier = earlier_runs(ctx.tracking, ctx.search_id) if resumed else (None, {})
    parent = base_run or (_log_base(ctx, ctx.plan.base) if ctx.plan.base else None)
    stages: list[StageSummary] = []
    for task in ctx.config.tasks:
        index = ctx.plan.family.tasks.index(task)
        stage = earlier.get(index)
        if stage is not None and stage.info.status == "FINISHED":
            stages.append(finished_stage(ctx.tracking, stage))
            ctx.log(f"[{task}] committed before the restart: stage run {stage.info.run_id}")
        else:
            stages.append(run_stage(ctx, index, parent, stage.info.run_id if stage is not None else None))
        parent = stages[-1].run_id
        laps.lap(f"stage {task}")
    return stages


def _log_base(ctx: SearchContext, base: Base) -> str:
    """A run holding the base model's checkpoint, which the first new stage grows from."""
    tasks = ctx.plan.family.tasks[: len(base.fingerprints)]
    run = ctx.tracking.start_run(f"base: {base.label}", {
        names.KIND: Kind.BASE, names.SEARCH_ID: ctx.search_id, names.TASK_ORDER: ",".join(tasks),
        names.GROWN_FROM_MODEL: base.label, names.SOURCE_RUN: base.source_run}, parent=ctx.search_id)
    ctx.tracking.log_checkpoint(run, base.folder)
    ctx.tracking.end_run(run)
    return run


def _finish(ctx: SearchContext, stages: list[StageSummary], final: dict[str, dict[str, float]],
            laps: Laps) -> SearchResult:
    """Log the last stage's model as the search's pyfunc model, the search's timings and report; end its run."""
    tracking, search_id = ctx.tracking, ctx.search_id
    with tempfile.TemporaryDirectory(prefix="pngrow-model-") as tmp:
        model_uri = tracking.log_shared_model(search_id, tracking.download_checkpoint(stages[-1].run_id, tmp))
    laps.lap("model")
    wall = time.time() - laps.started
    intervals = [interval for stage in stages for interval in stage.train_intervals]
    trained = union_seconds(intervals)
    result = SearchResult(search_id=search_id, name=ctx.config.name, stages=stages, final_metrics=final,
                          model_uri=model_uri, wall_seconds=wall, train_seconds=trained, overhead=1 - trained / wall,
                          utilisation=sum(b - a for a, b in intervals) / (wall * ctx.parallel),
                          phase_seconds=laps.seconds)
    tracking.log(search_id, metrics={"wall_seconds": wall, "train_seconds_union": trained,
                                     "orchestration_overhead": result.overhead,
                                     "slot_utilisation": result.utilisation, "trials": result.trials,
                                     **{f"phase_seconds/{name}": s for name, s in laps.seconds.items()}},
                 tags={names.FINAL_STAGE_RUN: stages[-1].run_id})
    _log_report(ctx)
    tracking.end_run(search_id)
    return result


def _log_report(ctx: SearchContext) -> None:
    """Draw the search's pictures into its run (``report/``); a drawing failure is logged, not fatal."""
    from .report import build_report

    with tempfile.TemporaryDirectory(prefix="pngrow-report-") as tmp:
        try:
            build_report(ctx.tracking, ctx.tracking.run(ctx.search_id), Path(tmp))
        except Exception as exc:  # noqa: BLE001 - the model is logged already; pictures must not lose it
            ctx.tracking.log(ctx.search_id, tags={names.REPORT_ERROR: failure_line(exc, 5000)})
            ctx.log(f"could not draw the report: {failure_line(exc)}")
            return
        ctx.tracking.log_folder(ctx.search_id, tmp, "report")
