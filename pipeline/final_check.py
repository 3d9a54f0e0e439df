"""The last step of a search: evaluate every task on the final model, on a worker, and check that growing later
tasks changed no earlier one (same fingerprint as when committed, same metrics)."""

from __future__ import annotations

from typing import Any

from ..errors import SearchError
from . import names
from .plan import SearchContext
from .records import EvaluationSpec
from .results import StageSummary

__all__ = ["DRIFT_TOLERANCE", "final_check"]

# Largest change of an earlier task's metric allowed between its stage and the final model. Frozen blocks make it
# exactly 0 on the same hardware; different GPU models may pick different kernels, hence a small slack.
DRIFT_TOLERANCE = 1e-3


def final_check(ctx: SearchContext, stages: list[StageSummary]) -> dict[str, dict[str, float]]:
    """Every task's metrics on the final model (the last stage's checkpoint), logged on the search run as
    ``final/<task>/<metric>`` and ``drift/<task>``, with each task's fingerprint as a tag; a
    :class:`SearchError` when a task's fingerprint differs from the committed one or a metric drifted."""
    config, plan, tracking = ctx.config, ctx.plan, ctx.tracking
    spec = EvaluationSpec(tracking_uri=tracking.uri, run_id=stages[-1].run_id, eval_data=config.eval_data,
                          eval_limit=config.eval_limit, threads=config.ray.cpus_per_trial, device=ctx.cluster.device,
                          manifest=plan.manifest)
    evaluation = ctx.cluster.submit(_evaluate_model, spec, name="evaluate_model")
    final: dict[str, dict[str, Any]] = ctx.cluster.result(evaluation)
    committed = {**(plan.base.fingerprints if plan.base else {}), **{s.task: s.chosen.fingerprint for s in stages}}
    for task, fingerprint in committed.items():
        if final[task].pop("fingerprint") != fingerprint:
            raise SearchError(f"task {task!r} changed after later tasks were grown (its fingerprint differs)")
    tracking.log(ctx.search_id, tags={names.fingerprint_tag(t): f for t, f in committed.items()})
    metrics: dict[str, float] = {f"final/{t}/{k}": v for t, m in final.items() for k, v in m.items()}
    for stage in stages:
        drift = max(abs(final[stage.task][k] - v) for k, v in stage.chosen.metrics.items())
        metrics[f"drift/{stage.task}"] = drift
        if drift > DRIFT_TOLERANCE:
            tracking.log(ctx.search_id, metrics=metrics)
            raise SearchError(f"task {stage.task!r} changed by {drift:.3g} after later tasks were grown")
    tracking.log(ctx.search_id, metrics=metrics)
    ctx.log("final model: " + "; ".join(f"{t} {plan.quality}={m[plan.quality]:.4g} density={m['density']:.3f}"
                                        for t, m in final.items()))
    return final


def _evaluate_model(spec: EvaluationSpec) -> dict[str, dict[str, Any]]:
    """:func:`.trial.evaluate_model`, imported on the worker that runs it: the driver never loads PyTorch."""
    from .trial import evaluate_model

    return evaluate_model(spec)
