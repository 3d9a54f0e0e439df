"""The search driver: one prune-and-grow stage per task, in task order, each an Optuna study whose trials run on
Ray workers; every search, stage and trial is an MLflow run, and the last stage's model is logged as a pyfunc model.

Stage t's trials all grow from the checkpoint that stage t-1 selected (logged on stage t-1's run); the selection
rule picks one finished trial per stage from quality and cost (see :mod:`pngrow.pipeline.study`).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import optuna

from .._progress import progress_bar
from ..errors import ConfigError, SearchError, ServiceError
from ..search_spaces import SearchSpace, load_search_space
from ..workers.data import check_folder
from ..workers.models import Family, get_family
from ..workers.png import parse_block_shape
from .cluster import Cluster
from .config import RayOptions, SearchConfig, redact
from .preflight import check_artifact_store, check_services
from .study import RULES, Candidate, distributions, open_study, pareto_front, retrying, select
from .tracking import Tracking
from .trial import EvaluationSpec, TrialOutcome, TrialSpec, evaluate_model, run_trial

__all__ = ["DRIFT_TOLERANCE", "SearchResult", "StageSummary", "prepare", "resume_search", "run_search",
           "union_seconds"]

Log = Callable[[str], None]
# Largest change of an earlier task's metric allowed between its stage and the final model. Frozen blocks make it
# exactly 0 on the same hardware; different GPU models may pick different kernels, hence a small slack.
DRIFT_TOLERANCE = 1e-3


@dataclass
class StageSummary:
    """One stage of a search: its MLflow run, the trial chosen, how many finished or failed, the Pareto front."""

    task: str
    run_id: str
    study: str
    chosen: TrialOutcome
    finished: int
    failed: int
    front: list[Candidate] = field(default_factory=list)


@dataclass
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
        return sum(s.finished + s.failed for s in self.stages)


@dataclass(frozen=True)
class _Plan:
    config: SearchConfig
    family: Family  # with every task: the base model's, then the searched ones
    space: SearchSpace
    quality: str
    maximize: bool
    base: _Base | None = None


@dataclass(frozen=True)
class _Base:
    """A released model the search grows into: its checkpoint, version label and tasks' fingerprints."""

    folder: Path
    label: str
    fingerprints: dict[str, str]
    source_run: str


def _resolve_base(config: SearchConfig, scratch: Path) -> tuple[_Base, Family]:
    from ..workers.models import load_model
    from .api import resolve_checkpoint

    folder, label = resolve_checkpoint(config.base_model or "", scratch, config.resolved_tracking_uri())
    base_family, shared = load_model(folder)
    if config.family != base_family.name:
        raise ConfigError(f"base model {config.base_model!r} is a {base_family.name} model, not {config.family}")
    clash = sorted(set(config.tasks) & set(shared.task_names))
    if clash:
        raise ConfigError(f"task {clash[0]!r} is already in base model {config.base_model!r}")
    source_run = ""
    if label.startswith("models:/"):
        name, _, version = label.removeprefix("models:/").partition("/")
        source_run = Tracking(config.resolved_tracking_uri()).client.get_model_version(name, version).run_id or ""
    family = get_family(base_family.name, shared.task_names + config.tasks, **base_family.arch)
    return _Base(folder, label, {t: shared.fingerprint(t) for t in shared.task_names}, source_run), family


def prepare(config: SearchConfig, scratch: Path | None = None) -> _Plan:
    """Check that the config's family, tasks, space, objectives and rule fit together, before any service starts.

    With ``config.base_model``, the base is fetched into ``scratch`` and the family covers its tasks too.
    """
    family = get_family(config.family, config.tasks, **config.arch)
    base = None
    if config.base_model:
        if scratch is None:
            raise ValueError("growing a base model needs a scratch folder to fetch it into")
        base, family = _resolve_base(config, scratch)
    space = load_search_space(config.search_space or config.family)
    if space.family != family.name:
        raise ConfigError(f"search space {space.name!r} is for family {space.family!r}, not {family.name!r}")
    quality = config.quality or family.quality_metric
    if quality not in family.metric_directions:
        raise ConfigError(f"quality objective {quality!r} is not one of {family.name}'s metrics: "
                          f"{', '.join(family.metric_directions)}")
    if config.rule not in RULES:
        raise ConfigError(f"selection rule {config.rule!r} is not one of {', '.join(sorted(RULES))}")
    _check_block_shapes(family, space)
    for name, source in (("train", config.train_data), ("eval", config.eval_data)):
        if source and "://" not in source:
            try:
                check_folder(source)
            except ValueError as exc:
                raise ConfigError(f"data {name}: {exc}") from None
    if config.init and not Path(config.init).is_file():
        raise ConfigError(f"init weights {config.init!r} do not exist")
    return _Plan(config, family, space, quality, family.metric_directions[quality] == "maximize", base)


def _check_block_shapes(family: Family, space: SearchSpace) -> None:
    """Every block shape the space can pick leaves each shared layer at least 2 blocks, so pruning can free one."""
    if "block_shape" in space.parameters:
        shapes = list(space.parameters["block_shape"].choices)
    else:
        shapes = [space.settings({}, seed=0).block_shape]
    layers = family.wrap(family.build_model()).shared_layers()
    for shape in shapes:
        parsed = parse_block_shape(shape)
        for layer in layers:
            if layer.grid(parsed).num_blocks < 2:
                raise ConfigError(f"block shape {'x'.join(map(str, parsed))} does not fit the {family.name} model: "
                                  f"layer {layer.name!r} ({layer.plane[0]}x{layer.plane[1]} channels) would be one "
                                  "block, which pruning cannot split")


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


def _public(config: SearchConfig) -> dict[str, Any]:
    """The config as a dict with every URI's password redacted (what MLflow may record). The Optuna storage and the
    workdir are recorded resolved, so that ``pngrow resume`` finds them from any folder."""
    data = asdict(config)
    data["optuna_storage"] = config.resolved_optuna_storage()
    data["workdir"] = str(Path(config.workdir).resolve())
    for key in ("tracking_uri", "optuna_storage", "train_data", "eval_data", "base_model"):
        data[key] = redact(data[key])
    data["ray"]["address"] = redact(data["ray"]["address"])
    return data


def _flat_params(config: SearchConfig) -> dict[str, Any]:
    params = {k: v for k, v in _public(config).items() if k not in ("ray", "arch", "tasks")}
    params.update({f"arch.{k}": v for k, v in config.arch.items()})
    params.update({f"ray.{k}": v for k, v in _public(config)["ray"].items()})
    params["tasks"] = ",".join(config.tasks)
    return params


def run_search(config: SearchConfig, log: Log = print) -> SearchResult:
    """Run a whole search; returns when the final shared model is logged. Failures mark the runs FAILED.

    With ``config.base_model`` the search grows ``config.tasks`` into that released model: its tasks come first,
    unchanged (their fingerprints are checked at the end), and the lineage points at it.
    """
    with tempfile.TemporaryDirectory(prefix="pngrow-base-") as scratch:
        return _run_search(prepare(config, Path(scratch)), log)


def resume_search(search_id: str, tracking_uri: str, log: Log = print, optuna_storage: str | None = None,
                  ray_address: str | None = None) -> SearchResult:
    """Continue a search whose driver died: committed stages are kept, the current stage keeps its finished trials
    and runs only the ones still owed, and the dead attempt's unfinished runs are closed as KILLED.

    The search's config comes from its run (``search_config.json``); URIs whose password was redacted there must be
    given again (``optuna_storage``).
    """
    tracking = Tracking(tracking_uri)
    try:
        run = tracking.run(search_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own error types for a missing run
        raise ConfigError(f"search {search_id!r} does not exist at {redact(tracking_uri)!r}") from None
    if run.data.tags.get("pngrow.kind") != "search":
        raise ConfigError(f"run {search_id!r} is not a pngrow search")
    if run.info.status == "FINISHED":
        raise ConfigError(f"search {search_id!r} has finished; there is nothing to resume")
    with tempfile.TemporaryDirectory(prefix="pngrow-resume-") as scratch:
        recorded = json.loads(Path(tracking.client.download_artifacts(search_id, "search_config.json",
                                                                      scratch)).read_text())
        recorded.pop("search_space_resolved", None)
        ray = RayOptions(**{**recorded.pop("ray"), **({"address": ray_address} if ray_address else {})})
        config = SearchConfig(**{**recorded, "ray": ray, "tracking_uri": tracking_uri,
                                 "optuna_storage": optuna_storage or recorded["optuna_storage"]})
        if "***" in (config.optuna_storage or ""):
            raise ConfigError(f"search {search_id!r} used an Optuna storage with a password, which is not recorded: "
                              "give it again with --optuna-storage")
        experiment = tracking.client.get_experiment(run.info.experiment_id).name
        config = replace(config, experiment=experiment)
        return _run_search(prepare(config, Path(scratch)), log, resumed=search_id)


def _run_search(plan: _Plan, log: Log, resumed: str | None = None) -> SearchResult:
    config = plan.config
    start = time.time()
    check_services(config)
    if config.local_artifact_root() or not config.optuna_storage:  # local artifacts or the default SQLite study
        Path(config.workdir).mkdir(parents=True, exist_ok=True)
    tracking = Tracking(config.resolved_tracking_uri(), config.experiment, config.local_artifact_root())
    check_artifact_store(tracking.client.get_experiment(tracking.experiment_id).artifact_location)
    if resumed is None:
        search_id = tracking.start_run(config.name, {"kind": "search", "family": config.family,
                                                     "tasks": ",".join(plan.family.tasks)})
        tracking.log(search_id, params=_flat_params(config),
                     tags={"search_id": search_id, "quality": plan.quality, "cost": config.cost})
        if plan.base is not None:
            tracking.log(search_id, tags={"grown_from_model": plan.base.label})
        tracking.client.log_dict(search_id, {**_public(config), "search_space_resolved": plan.space.name},
                                 "search_config.json")
    else:
        search_id = resumed
        tracking.client.update_run(search_id, "RUNNING")
        attempts = int(tracking.run(search_id).data.tags.get("pngrow.attempts", "1")) + 1
        tracking.log(search_id, tags={"attempts": attempts, "error": ""})
    log(f"pngrow search {config.name!r}: id {search_id}, tracking {redact(tracking.uri)}"
        + (" (resumed)" if resumed else ""))
    cluster: Cluster | None = None
    try:
        cluster = Cluster(config.ray)
        log(f"Ray: {cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs; trials train on {cluster.device}, "
            f"{min(config.parallel_trials, cluster.slots)} at a time")
        stages: list[StageSummary] = []
        intervals: list[tuple[float, float]] = []
        earlier = _earlier_runs(tracking, search_id) if resumed else {}
        parent = earlier.get("base") or (_log_base(plan, tracking, search_id) if plan.base else None)
        for task in config.tasks:
            index = plan.family.tasks.index(task)
            stage = earlier.get(index)
            if stage is not None and stage.info.status == "FINISHED":
                stages.append(_finished_stage(tracking, stage))
                log(f"[{task}] committed before the restart: stage run {stage.info.run_id}")
            else:
                stages.append(_run_stage(plan, tracking, cluster, search_id, index, parent, intervals, log,
                                         stage.info.run_id if stage is not None else None))
            parent = stages[-1].run_id
        final = _final_check(plan, tracking, cluster, search_id, stages, log)
        with tempfile.TemporaryDirectory(prefix="pngrow-model-") as tmp:
            model_uri = tracking.log_shared_model(search_id, tracking.download_checkpoint(stages[-1].run_id, tmp))
        wall = time.time() - start
        trained = union_seconds(intervals)
        slots = min(config.parallel_trials, cluster.slots)
        result = SearchResult(search_id, config.name, stages, final, model_uri, wall, trained, 1 - trained / wall,
                              sum(b - a for a, b in intervals) / (wall * slots))
        tracking.log(search_id, metrics={"wall_seconds": wall, "train_seconds_union": trained,
                                         "orchestration_overhead": result.overhead,
                                         "slot_utilisation": result.utilisation, "trials": result.trials},
                     tags={"final_stage_run": stages[-1].run_id})
        _log_report(tracking, search_id, log)
        tracking.end_run(search_id)
        return result
    except BaseException as exc:
        if not (isinstance(exc, ServiceError) and exc.service == "tracking"):
            try:
                tracking.log(search_id, tags={"error": f"{type(exc).__name__}: {exc}"[:5000]})
                tracking.end_run(search_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            except ServiceError as lost:
                log(f"could not mark search {search_id} as ended: {lost}")
        raise
    finally:
        if cluster is not None:
            cluster.close()


def _log_report(tracking: Tracking, search_id: str, log: Log) -> None:
    """Draw the search's pictures into its run (``report/``); a drawing failure is logged, not fatal."""
    from .report import build_report

    with tempfile.TemporaryDirectory(prefix="pngrow-report-") as tmp:
        try:
            build_report(tracking, tracking.run(search_id), Path(tmp))
        except Exception as exc:  # noqa: BLE001 - the model is logged already; pictures must not lose it
            tracking.log(search_id, tags={"report_error": f"{type(exc).__name__}: {exc}"[:5000]})
            log(f"could not draw the report: {type(exc).__name__}: {exc}")
            return
        tracking.client.log_artifacts(search_id, tmp, "report")


def _log_base(plan: _Plan, tracking: Tracking, search_id: str) -> str:
    """A run holding the base model's checkpoint, which the first new stage grows from."""
    assert plan.base is not None
    tasks = plan.family.tasks[: len(plan.base.fingerprints)]
    run = tracking.start_run(f"base: {plan.base.label}", {"kind": "base", "search_id": search_id,
                                                          "task_order": ",".join(tasks),
                                                          "grown_from_model": plan.base.label,
                                                          "source_run": plan.base.source_run}, parent=search_id)
    tracking.log_checkpoint(run, plan.base.folder)
    tracking.end_run(run)
    return run


def _run_stage(plan: _Plan, tracking: Tracking, cluster: Cluster, search_id: str, index: int, parent: str | None,
               intervals: list[tuple[float, float]], log: Log, stage_run: str | None = None) -> StageSummary:
    config, task = plan.config, plan.family.tasks[index]
    study_name = f"pngrow-{search_id}-{index}-{task}"
    storage = redact(config.resolved_optuna_storage()) or ""
    study = retrying(lambda: open_study(config.resolved_optuna_storage(), study_name,
                                        "maximize" if plan.maximize else "minimize", config.seed + index), storage)
    lineage = {"search_id": search_id, "task": task, "stage_index": index,
               "task_order": ",".join(plan.family.tasks[: index + 1]), "grown_from_run": parent or "",
               "optuna_study": study_name}
    outcomes: dict[int, TrialOutcome] = {}
    failed = 0
    if stage_run is None:
        stage_run = tracking.start_run(f"stage {index + 1}: {task}", {"kind": "stage", **lineage}, parent=search_id)
    else:
        tracking.client.update_run(stage_run, "RUNNING")
        outcomes, failed = _recover_trials(plan, tracking, study, stage_run, log)
        log(f"[{task}] resuming the stage: {len(outcomes)} trials finished before the restart are kept, "
            f"{failed} failed")
    try:
        summary = _search_trials(plan, tracking, cluster, study, stage_run, index, parent, lineage, intervals, log,
                                 outcomes, failed)
    except BaseException:
        tracking.end_run(stage_run, "FAILED")
        raise
    chosen = summary.chosen
    tracking.copy_checkpoint(chosen.run_id, stage_run)
    chosen_params = tracking.run(chosen.run_id).data.params
    tracking.log(stage_run, params=chosen_params,
                 metrics={**{f"eval/{k}": v for k, v in chosen.metrics.items()}, "density": chosen.density,
                          "stored_params": chosen.stored_params, "active_params": chosen.active_params,
                          "trials_finished": summary.finished, "trials_failed": summary.failed,
                          "pareto_front_size": len(summary.front)},
                 tags={"chosen_trial_run": chosen.run_id})
    tracking.end_run(stage_run)
    log(f"[{task}] chose trial run {chosen.run_id} by {config.rule}: {plan.quality}="
        f"{chosen.metrics[plan.quality]:.4g} {config.cost}={chosen.cost(config.cost):.4g}")
    return summary


def _search_trials(plan: _Plan, tracking: Tracking, cluster: Cluster, study: optuna.Study, stage_run: str, index: int,
                   parent: str | None, lineage: dict[str, Any], intervals: list[tuple[float, float]],
                   log: Log, outcomes: dict[int, TrialOutcome], failed: int) -> StageSummary:
    config, task = plan.config, plan.family.tasks[index]
    dists = distributions(plan.space)
    storage = redact(config.resolved_optuna_storage()) or ""
    retrying(lambda: study.enqueue_trial(plan.space.defaults(), skip_if_exists=True), storage)
    pending: dict[Any, tuple[optuna.Trial, str]] = {}
    asked = len(outcomes) + failed
    last_error = "see the trial runs' pngrow.error tags"
    parallel = min(config.parallel_trials, cluster.slots)
    with progress_bar(config.trials_per_stage, "trials", f"stage {task}", initial=asked) as bar:
        while asked < config.trials_per_stage or pending:
            while asked < config.trials_per_stage and len(pending) < parallel:
                trial = retrying(lambda: study.ask(dists), storage)
                asked += 1
                settings = asdict(plan.space.settings(trial.params, seed=config.seed + index))
                run_id = tracking.start_run(f"{task} trial {trial.number}",
                                            {"kind": "trial", **lineage, "optuna_trial": trial.number},
                                            parent=stage_run)
                retrying(lambda: trial.set_user_attr("mlflow_run_id", run_id), storage)
                spec = TrialSpec(tracking.uri, run_id, plan.family.name, plan.family.tasks, plan.family.arch, task,
                                 parent, settings, config.train_data, config.eval_data, config.eval_limit,
                                 config.init if parent is None else None, config.ray.cpus_per_trial, cluster.device)
                pending[cluster.submit(run_trial, spec)] = (trial, run_id)
            ref = cluster.wait_one(list(pending))
            trial, run_id = pending.pop(ref)
            bar.update(1)
            try:
                outcome: TrialOutcome = cluster.result(ref)
            except ServiceError:  # the tracking server or artifact store is gone: no later trial could log either
                raise
            except Exception as exc:  # a trial's failure (diverged, worker lost) fails the trial, not the search
                failed += 1
                last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                retrying(lambda: study.tell(trial, state=optuna.trial.TrialState.FAIL), storage)
                tracking.log(run_id, tags={"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:5000]})
                tracking.end_run(run_id, "FAILED")
                log(f"[{task}] trial {trial.number} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                continue
            outcomes[trial.number] = outcome
            intervals.append((outcome.train_started, outcome.train_ended))
            values = [outcome.metrics[plan.quality], outcome.cost(config.cost)]
            retrying(lambda: study.tell(trial, values), storage)
            tracking.end_run(run_id)
            log(f"[{task}] trial {trial.number} ({len(outcomes) + failed}/{config.trials_per_stage}) "
                f"{_describe(trial.params)}: {plan.quality}={outcome.metrics[plan.quality]:.4g} "
                f"density={outcome.density:.3f} in {outcome.trial_seconds:.1f} s")
    candidates = [Candidate(n, o.metrics[plan.quality], o.cost(config.cost), o.run_id) for n, o in outcomes.items()]
    try:
        chosen = select(config.rule, candidates, plan.maximize, config.tolerance)
    except ValueError as exc:
        raise SearchError(f"stage {index + 1} ({task}): {exc}; every trial failed, the last with "
                          f"{last_error}") from None
    front = pareto_front(candidates, plan.maximize)
    return StageSummary(task, stage_run, study.study_name, outcomes[chosen.number], len(outcomes), failed, front)


def _earlier_runs(tracking: Tracking, search_id: str) -> dict[Any, Any]:
    """The stage runs (by stage index) and the base run ("base") a dead attempt of the search left."""
    search = tracking.run(search_id)
    found: dict[Any, Any] = {}
    for run in tracking.children(search, "base"):
        found["base"] = run.info.run_id
    for run in tracking.children(search, "stage"):
        found[int(run.data.tags["pngrow.stage_index"])] = run
    return found


def _outcome(run: Any) -> TrialOutcome:
    """A finished trial as its MLflow run recorded it."""
    metrics, tags = run.data.metrics, run.data.tags
    return TrialOutcome(
        run.info.run_id, tags["pngrow.task"], {k[len("eval/"):]: v for k, v in metrics.items() if k.startswith("eval/")},
        metrics["density"], int(metrics["active_params"]), int(round(metrics["gmacs"] * 1e9)),
        int(metrics["stored_params"]), tags["pngrow.fingerprint"], 0.0, 0.0, metrics.get("trial_seconds", 0.0),
    )


def _finished_stage(tracking: Tracking, stage: Any) -> StageSummary:
    trials = tracking.children(stage, "trial")
    chosen = tracking.run(stage.data.tags["pngrow.chosen_trial_run"])
    return StageSummary(stage.data.tags["pngrow.task"], stage.info.run_id, stage.data.tags["pngrow.optuna_study"],
                        _outcome(chosen), sum(t.info.status == "FINISHED" for t in trials),
                        sum(t.info.status == "FAILED" for t in trials))


def _recover_trials(plan: _Plan, tracking: Tracking, study: optuna.Study, stage_run: str,
                    log: Log) -> tuple[dict[int, TrialOutcome], int]:
    """Keep the finished trials of a stage a dead driver left (also those whose worker finished after the driver
    died: their run has the final fingerprint); close the unfinished ones as KILLED (MLflow) and FAIL (Optuna).
    Returns the finished outcomes by Optuna trial number and the count of trials that failed."""
    outcomes: dict[int, TrialOutcome] = {}
    failed = 0
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    for run in tracking.children(tracking.run(stage_run), "trial"):
        number = int(run.data.tags["pngrow.optuna_trial"])
        if run.info.status in ("FINISHED", "RUNNING") and "pngrow.fingerprint" in run.data.tags:
            outcome = outcomes[number] = _outcome(run)
            if states.get(number) == optuna.trial.TrialState.RUNNING:
                study.tell(number, [outcome.metrics[plan.quality], outcome.cost(plan.config.cost)])
            if run.info.status == "RUNNING":
                tracking.end_run(run.info.run_id)
        elif run.info.status == "FAILED":
            failed += 1
        else:
            tracking.log(run.info.run_id, tags={"error": "its driver died; the search was resumed without it"})
            tracking.end_run(run.info.run_id, "KILLED")
            if states.get(number) == optuna.trial.TrialState.RUNNING:
                study.tell(number, state=optuna.trial.TrialState.FAIL)
            log(f"trial run {run.info.run_id} (Optuna trial {number}) was cut off by the restart: KILLED")
    return outcomes, failed


def _describe(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _final_check(plan: _Plan, tracking: Tracking, cluster: Cluster, search_id: str, stages: list[StageSummary],
                 log: Log) -> dict[str, dict[str, float]]:
    """Evaluate every task on the final model (on a worker) and check that no earlier task changed: each task's
    fingerprint is the one it had when committed (or in the base model), and its metrics are the same."""
    config = plan.config
    spec = EvaluationSpec(tracking.uri, stages[-1].run_id, config.eval_data, config.eval_limit,
                          config.ray.cpus_per_trial, cluster.device)
    final: dict[str, dict[str, Any]] = cluster.result(cluster.submit(evaluate_model, spec))
    committed = {**(plan.base.fingerprints if plan.base else {}), **{s.task: s.chosen.fingerprint for s in stages}}
    for task, fingerprint in committed.items():
        if final[task].pop("fingerprint") != fingerprint:
            raise SearchError(f"task {task!r} changed after later tasks were grown (its fingerprint differs)")
    tracking.log(search_id, tags={f"fingerprint.{t}": f for t, f in committed.items()})
    metrics: dict[str, float] = {f"final/{t}/{k}": v for t, m in final.items() for k, v in m.items()}
    for stage in stages:
        drift = max(abs(final[stage.task][k] - v) for k, v in stage.chosen.metrics.items())
        metrics[f"drift/{stage.task}"] = drift
        if drift > DRIFT_TOLERANCE:
            tracking.log(search_id, metrics=metrics)
            raise SearchError(f"task {stage.task!r} changed by {drift:.3g} after later tasks were grown")
    tracking.log(search_id, metrics=metrics)
    log("final model: " + "; ".join(f"{t} {plan.quality}={m[plan.quality]:.4g} density={m['density']:.3f}"
                                    for t, m in final.items()))
    return final
