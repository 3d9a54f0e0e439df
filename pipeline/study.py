"""Optuna, thinly: one multi-objective study per stage, and the rules that pick the trial a stage hands on."""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TypeVar

import optuna

from ..errors import ConfigError, ServiceError, failure_line
from ..search_spaces import SearchSpace

__all__ = ["RULES", "Candidate", "distributions", "open_study", "pareto_front", "register_rule", "retrying", "select"]

T = TypeVar("T")
# Waits between attempts at an Optuna storage call: about a minute in all before the search gives up.
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
MAX_RETRIES_VARIABLE = "PNGROW_OPTUNA_MAX_RETRIES"  # keeps only the first N waits (as MLflow's and boto3's own)


def retry_delays(environ: Mapping[str, str] = os.environ) -> tuple[float, ...]:
    """The waits before each retry: :data:`RETRY_DELAYS`, only their first ``PNGROW_OPTUNA_MAX_RETRIES`` if set.

    >>> retry_delays({}), retry_delays({"PNGROW_OPTUNA_MAX_RETRIES": "2"})
    ((1.0, 2.0, 4.0, 8.0, 16.0, 30.0), (1.0, 2.0))
    """
    value = environ.get(MAX_RETRIES_VARIABLE)
    if value is None:
        return RETRY_DELAYS
    if not value.isdigit():
        raise ConfigError(f"{MAX_RETRIES_VARIABLE}={value!r} is not a number of retries (0 or more)")
    return RETRY_DELAYS[: int(value)]


def retrying(call: Callable[[], T], storage: str, delays: tuple[float, ...] | None = None) -> T:
    """``call()``, retried with backoff (``delays``, else :func:`retry_delays`) while the Optuna database is
    unreachable; then a :class:`ServiceError` naming ``storage`` (redact it first), so that the search fails cleanly
    and can be resumed."""
    import sqlalchemy.exc

    lost = (sqlalchemy.exc.OperationalError, optuna.exceptions.StorageInternalError)
    for delay in retry_delays() if delays is None else delays:
        try:
            return call()
        except lost:
            time.sleep(delay)
    try:
        return call()
    except lost as exc:
        reason = failure_line(exc.__cause__ or exc)
        raise ServiceError(f"Optuna storage {storage!r} stopped answering: {reason}", "optuna") from None


@dataclass(frozen=True)
class Candidate:
    """A finished trial as the selection rules see it: its quality, its cost (lower is better), its run, and its
    compacted latency relative to its dense model's (NaN when the search did not time trials)."""

    number: int
    quality: float
    cost: float
    run_id: str
    relative_latency: float = math.nan


Rule = Callable[[list[Candidate], bool, float], Candidate]
RULES: dict[str, Rule] = {}


def register_rule(name: str) -> Callable[[Rule], Rule]:
    """Function decorator adding a selection rule ``rule(candidates, maximize, tolerance)`` under ``name``."""

    def decorate(rule: Rule) -> Rule:
        RULES[name] = rule
        return rule

    return decorate


def _sign(maximize: bool) -> float:
    return 1.0 if maximize else -1.0


@register_rule("best_quality")
def best_quality(candidates: list[Candidate], maximize: bool, tolerance: float) -> Candidate:
    """The best quality; the lower cost breaks ties. ``tolerance`` is not used."""
    return max(candidates, key=lambda c: (_sign(maximize) * c.quality, -c.cost))


@register_rule("sparsest_within")
def sparsest_within(candidates: list[Candidate], maximize: bool, tolerance: float) -> Candidate:
    """The lowest cost among trials whose quality is within ``tolerance`` (metric units) of the best.

    >>> a, b = Candidate(0, 30.0, 0.9, "a"), Candidate(1, 29.95, 0.5, "b")
    >>> sparsest_within([a, b], maximize=True, tolerance=0.1).run_id, sparsest_within([a, b], True, 0.01).run_id
    ('b', 'a')
    """
    best = best_quality(candidates, maximize, tolerance)
    near = [c for c in candidates if _sign(maximize) * (best.quality - c.quality) <= tolerance]
    return min(near, key=lambda c: (c.cost, -_sign(maximize) * c.quality))


@register_rule("fastest_within")
def fastest_within(candidates: list[Candidate], maximize: bool, tolerance: float) -> Candidate:
    """The fastest trial against its own dense model (the lowest relative latency) among trials whose quality is
    within ``tolerance`` of the best; needs trials that timed their compacted task (a ``latency`` cost).

    >>> a, b = Candidate(0, 30.0, 0.9, "a", relative_latency=0.6), Candidate(1, 29.95, 0.5, "b", relative_latency=0.9)
    >>> fastest_within([a, b], maximize=True, tolerance=0.1).run_id
    'a'
    """
    if any(math.isnan(c.relative_latency) for c in candidates):
        raise ValueError("rule fastest_within needs every trial's latency: add latency to objectives.cost")
    best = best_quality(candidates, maximize, tolerance)
    near = [c for c in candidates if _sign(maximize) * (best.quality - c.quality) <= tolerance]
    return min(near, key=lambda c: (c.relative_latency, -_sign(maximize) * c.quality))


def select(rule: str, candidates: list[Candidate], maximize: bool, tolerance: float) -> Candidate:
    """Apply the registered ``rule``; raises ``ValueError`` when it is unknown or no trial finished."""
    if rule not in RULES:
        raise ValueError(f"selection rule {rule!r} is not one of {', '.join(sorted(RULES))}")
    if not candidates:
        raise ValueError("no trial of the stage finished, so there is nothing to select")
    return RULES[rule](candidates, maximize, tolerance)


def pareto_front(candidates: list[Candidate], maximize: bool) -> list[Candidate]:
    """The candidates no other one beats on both quality and cost, by increasing cost.

    >>> front = pareto_front([Candidate(0, 30, 0.5, "a"), Candidate(1, 29, 0.6, "b"), Candidate(2, 31, 0.9, "c")], True)
    >>> [c.run_id for c in front]
    ['a', 'c']
    """
    s = _sign(maximize)

    def dominated(c: Candidate) -> bool:
        return any(s * o.quality >= s * c.quality and o.cost <= c.cost and (o.quality, o.cost) != (c.quality, c.cost)
                   for o in candidates)

    return sorted((c for c in candidates if not dominated(c)), key=lambda c: c.cost)


def distributions(space: SearchSpace) -> dict[str, optuna.distributions.BaseDistribution]:
    """Optuna distributions of a search space's parameters."""
    result: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, p in space.parameters.items():
        if p.kind == "categorical":
            result[name] = optuna.distributions.CategoricalDistribution(list(p.choices))
        elif p.kind == "int":
            result[name] = optuna.distributions.IntDistribution(
                int(p.low), int(p.high), log=p.log)  # type: ignore[arg-type]
        else:
            result[name] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)  # type: ignore[arg-type]
    return result


def open_study(storage: str, name: str, quality: str, quality_direction: str, costs: Sequence[str],
               seed: int) -> optuna.Study:
    """The stage's study (created, or loaded when it exists): objectives ``quality`` then each cost (minimised),
    named so that the Optuna dashboard shows them by name."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        directions=[quality_direction, *("minimize" for _ in costs)],
        sampler=optuna.samplers.TPESampler(seed=seed),
        load_if_exists=True,
    )
    with warnings.catch_warnings():  # experimental since Optuna 3.2, and what optuna-dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([quality, *costs])
    return study
