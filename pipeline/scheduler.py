"""One stage of a search (the driver's unit of work for one task): its Optuna study asks for trials, which run on
Ray workers a few at a time, then one finished trial is chosen, whose checkpoint the stage's run keeps for the next
stage to grow from.

:func:`run_stage` is the entry point; a trial itself is :func:`pngrow.pipeline.trial.run_trial` on a worker, which
trains the task (:func:`pngrow.workers.training.train_task`).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import optuna

from .._progress import progress_bar
from ..errors import SearchError, ServiceError, failure_line
from . import names
from .early_stopping import RungReport, TrialStopped, start_rung
from .names import Kind
from .plan import SearchContext
from .records import TrialOutcome, TrialSpec
from .results import StageSummary
from .resume import Recovered, recover_trials
from .study import Candidate, distributions, open_study, pareto_front, retrying, select

__all__ = ["run_stage"]


def run_stage(ctx: SearchContext, index: int, parent: str | None, resumed_run: str | None = None) -> StageSummary:
    """Run the stage of task ``index``: its study's trials (each grows from ``parent``'s checkpoint; None: from
    scratch), then choose a trial and commit it to the stage's run. ``resumed_run``: the stage run a dead driver
    left, whose finished trials are kept."""
    task = ctx.plan.family.tasks[index]
    study_name = f"pngrow-{ctx.search_id}-{index}-{task}"
    study = retrying(lambda: open_study(ctx.config.resolved_optuna_storage(), study_name, ctx.plan.quality,
                                        ctx.plan.quality_direction, ctx.config.costs, ctx.config.seed + index),
                     ctx.storage)
    lineage = {names.SEARCH_ID: ctx.search_id, names.TASK: task, names.STAGE_INDEX: index,
               names.TASK_ORDER: ",".join(ctx.plan.family.tasks[: index + 1]), names.GROWN_FROM_RUN: parent or "",
               names.OPTUNA_STUDY: study_name, **({names.SMOKE_TEST: "true"} if ctx.config.smoke_test else {})}
    recovered = Recovered()
    if resumed_run is None:
        stage_run = ctx.tracking.start_run(f"stage {index + 1}: {task}", {names.KIND: Kind.STAGE, **lineage},
                                           parent=ctx.search_id)
    else:
        stage_run = resumed_run
        ctx.tracking.reopen_run(stage_run)
        recovered = recover_trials(ctx, study, stage_run)
        ctx.log(f"[{task}] resuming the stage: {len(recovered.outcomes)} trials finished before the restart are "
                f"kept, {recovered.stopped} were stopped early, {recovered.failed} failed")
    rung = start_rung(ctx.cluster, ctx.plan.quality, ctx.plan.maximize, ctx.config.early_stopping,
                      recovered.rung_values)
    try:
        summary = _StageRun(ctx, study, stage_run, index, parent, lineage, recovered, rung).run()
    except BaseException:
        ctx.tracking.end_run(stage_run, "FAILED")
        raise
    finally:
        if rung is not None:
            ctx.cluster.end_actor(rung)
    _commit(ctx, summary)
    return summary


def _run_trial(spec: TrialSpec) -> TrialOutcome:
    """:func:`.trial.run_trial`, imported on the worker that runs it: the driver never loads PyTorch."""
    from .trial import run_trial

    return run_trial(spec)


def _commit(ctx: SearchContext, summary: StageSummary) -> None:
    """Copy the chosen trial's checkpoint, settings and figures to the stage run, and end it."""
    chosen, tracking = summary.chosen, ctx.tracking
    tracking.copy_checkpoint(chosen.run_id, summary.run_id)
    for run in (summary.run_id, ctx.search_id):  # the UI's Datasets column: what trained the stage and the search
        tracking.copy_datasets(chosen.run_id, run)
    tracking.log(summary.run_id, params=tracking.run(chosen.run_id).data.params,
                 metrics={**chosen.metric_record(timings=False), "trials_finished": summary.finished,
                          "trials_failed": summary.failed, "trials_stopped_early": summary.stopped,
                          "pareto_front_size": len(summary.front)},
                 tags={names.CHOSEN_TRIAL_RUN: chosen.run_id})
    tracking.end_run(summary.run_id)
    ctx.log(f"[{summary.task}] chose trial run {chosen.run_id} by {ctx.config.rule}: {ctx.plan.quality}="
            f"{chosen.metrics[ctx.plan.quality]:.4g} {ctx.config.cost}={chosen.cost(ctx.config.cost):.4g}")


class _StageRun:
    """A stage while its trials run: its Optuna study, the trials in flight, the finished outcomes, the failures,
    the trials its rung (a Ray actor, None without early stopping) stopped."""

    def __init__(self, ctx: SearchContext, study: optuna.Study, stage_run: str, index: int, parent: str | None,
                 lineage: dict[str, Any], recovered: Recovered, rung: Any = None) -> None:
        self.ctx, self.study, self.stage_run, self.index, self.parent = ctx, study, stage_run, index, parent
        self.task = ctx.plan.family.tasks[index]
        self.lineage = lineage
        self.outcomes = recovered.outcomes
        self.failed, self.stopped = recovered.failed, recovered.stopped
        self.rung = rung
        self.asked = len(self.outcomes) + self.failed + self.stopped
        self.pending: dict[Any, tuple[optuna.Trial, str]] = {}
        self.intervals: list[tuple[float, float]] = []
        self.last_error = f"see the trial runs' {names.ERROR} tags"

    def run(self) -> StageSummary:
        """Ask, run and tell trials until the stage's budget is spent; then choose one."""
        total = self.ctx.config.trials_per_stage
        self._retrying(lambda: self.study.enqueue_trial(self.ctx.plan.space.defaults(), skip_if_exists=True))
        dists = distributions(self.ctx.plan.space)
        with progress_bar(total, "trials", f"stage {self.task}", initial=self.asked) as bar:
            while self.asked < total or self.pending:
                while self.asked < total and len(self.pending) < self.ctx.parallel:
                    self._submit(self._retrying(lambda: self.study.ask(dists)))
                ref = self.ctx.cluster.wait_one(list(self.pending))
                bar.update(1)
                self._collect(ref)
        return self._choose()

    def _retrying(self, call: Any) -> Any:
        return retrying(call, self.ctx.storage)

    def _submit(self, trial: optuna.Trial) -> None:
        """Start the trial's run and send the trial to a worker."""
        ctx, config, family = self.ctx, self.ctx.config, self.ctx.plan.family
        self.asked += 1
        settings = asdict(ctx.plan.space.settings(trial.params, seed=config.seed + self.index))
        run_id = ctx.tracking.start_run(f"{self.task} trial {trial.number}",
                                        {names.KIND: Kind.TRIAL, **self.lineage, names.OPTUNA_TRIAL: trial.number},
                                        parent=self.stage_run)
        self._retrying(lambda: trial.set_user_attr("mlflow_run_id", run_id))
        spec = TrialSpec(tracking_uri=ctx.tracking.uri, run_id=run_id, family=family.name, tasks=family.tasks,
                         arch=family.arch, task=self.task, parent_run=self.parent, settings=settings,
                         train_data=config.train_data, eval_data=config.eval_data, eval_limit=config.eval_limit,
                         init=config.init if self.parent is None else None, threads=config.ray.cpus_per_trial,
                         device=ctx.cluster.device,
                         latency_rounds=config.latency_rounds if config.measures_latency else 0,
                         latency_size=config.latency_size or None, device_setting=config.ray.device, rung=self.rung,
                         manifest=ctx.plan.manifest)
        self.pending[ctx.cluster.submit(_run_trial, spec, name="run_trial")] = (trial, run_id)

    def _collect(self, ref: Any) -> None:
        """Tell the study how a trial that came back did, and end its run."""
        trial, run_id = self.pending.pop(ref)
        try:
            outcome: TrialOutcome = self.ctx.cluster.result(ref)
        except ServiceError:  # the tracking server or artifact store is gone: no later trial could log either
            raise
        except TrialStopped as stop:
            self._stopped(trial, run_id, stop)
            return
        except Exception as exc:  # a trial's failure (diverged, worker lost) fails the trial, not the search
            self._failed(trial, run_id, exc)
            return
        plan = self.ctx.plan
        self.outcomes[trial.number] = outcome
        self.intervals.append((outcome.train_started, outcome.train_ended))
        self._record_rung(trial, outcome.rung)
        self._retrying(lambda: self.study.tell(trial, outcome.objective_values(plan.quality, self.ctx.config.costs)))
        self.ctx.tracking.end_run(run_id)
        self.ctx.log(f"[{self.task}] trial {trial.number} ({self._ended()}/"
                     f"{self.ctx.config.trials_per_stage}) {_describe(trial.params)}: "
                     f"{plan.quality}={outcome.metrics[plan.quality]:.4g} density={outcome.density:.3f}"
                     + (f" {outcome.speedup:.2f}x faster compacted" if math.isfinite(outcome.latency_ms) else "")
                     + f" in {outcome.trial_seconds:.1f} s")

    def _ended(self) -> int:
        return len(self.outcomes) + self.failed + self.stopped

    def _stopped(self, trial: optuna.Trial, run_id: str, stop: TrialStopped) -> None:
        """Record a trial its rung stopped: KILLED in MLflow with the reason, then PRUNED in Optuna with its value
        at the rung (in this order, so that a restart in between finds the run stopped and prunes the trial)."""
        self.stopped += 1
        self.intervals.append(stop.interval)
        self.ctx.tracking.log(run_id, tags={names.STOPPED_EARLY: stop.reason})
        self.ctx.tracking.end_run(run_id, "KILLED")
        self._record_rung(trial, stop.rung)
        self._retrying(lambda: trial.set_user_attr("stopped_early", stop.reason))
        self._retrying(lambda: self.study.tell(trial, state=optuna.trial.TrialState.PRUNED))
        self.ctx.log(f"[{self.task}] trial {trial.number} ({self._ended()}/{self.ctx.config.trials_per_stage}) "
                     f"{_describe(trial.params)}: stopped early, {stop.reason}")

    def _record_rung(self, trial: optuna.Trial, rung: RungReport | None) -> None:
        """Put the trial's quality at the rung, and the step, on its Optuna trial (user attributes ``rung_step``
        and ``rung_<quality>``). Not an intermediate value: Optuna's ``Trial.report`` refuses multi-objective
        studies, and its TPE sampler fails on a PRUNED trial holding intermediate values in one."""
        quality = self.ctx.plan.quality
        if rung is None or quality not in rung.metrics:
            return
        for key, value in (("rung_step", rung.step), (f"rung_{quality}", rung.metrics[quality])):
            self._retrying(lambda key=key, value=value: trial.set_user_attr(key, value))

    def _failed(self, trial: optuna.Trial, run_id: str, exc: Exception) -> None:
        self.failed += 1
        self.last_error = failure_line(exc)
        self._retrying(lambda: self.study.tell(trial, state=optuna.trial.TrialState.FAIL))
        self.ctx.tracking.log(run_id, tags={names.ERROR: failure_line(exc, 5000)})
        self.ctx.tracking.end_run(run_id, "FAILED")
        self.ctx.log(f"[{self.task}] trial {trial.number} failed: {self.last_error}")

    def _choose(self) -> StageSummary:
        """The stage's summary, with the trial the selection rule picks from the finished ones."""
        plan, config = self.ctx.plan, self.ctx.config
        candidates = [Candidate(n, o.metrics[plan.quality], o.cost(config.cost), o.run_id, o.relative_latency)
                      for n, o in self.outcomes.items()]
        try:
            chosen = select(config.rule, candidates, plan.maximize, config.tolerance)
        except ValueError as exc:
            raise SearchError(f"stage {self.index + 1} ({self.task}): {exc}; every trial failed, the last with "
                              f"{self.last_error}") from None
        return StageSummary(task=self.task, run_id=self.stage_run, study=self.study.study_name,
                            chosen=self.outcomes[chosen.number], finished=len(self.outcomes), failed=self.failed,
                            front=pareto_front(candidates, plan.maximize), train_intervals=self.intervals,
                            stopped=self.stopped)


def _describe(params: dict[str, Any]) -> str:
    """Trial parameters for a log line.

    >>> _describe({"lr": 0.00123456, "block_shape": "4x4"})
    'lr=0.00123 block_shape=4x4'
    """
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
