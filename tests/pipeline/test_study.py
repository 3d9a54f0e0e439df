from __future__ import annotations

import optuna
import pytest

from pngrow.pipeline.study import RULES, Candidate, distributions, open_study, pareto_front, select
from pngrow.search_spaces import load_search_space

A = Candidate(0, 30.0, 0.9, "a")
B = Candidate(1, 29.95, 0.5, "b")
C = Candidate(2, 29.0, 0.3, "c")


def test_rules_trade_quality_for_cost_as_stated() -> None:
    assert select("best_quality", [A, B, C], maximize=True, tolerance=0.1).run_id == "a"
    assert select("sparsest_within", [A, B, C], maximize=True, tolerance=0.1).run_id == "b"
    assert select("sparsest_within", [A, B, C], maximize=True, tolerance=1.0).run_id == "c"
    assert select("sparsest_within", [A, B, C], maximize=True, tolerance=0.0).run_id == "a"
    # Lower is better for a rate-distortion loss: C is the best and the cheapest.
    assert select("best_quality", [A, B, C], maximize=False, tolerance=0.0).run_id == "c"
    assert set(RULES) >= {"best_quality", "sparsest_within"}


def test_select_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="selection rule 'cheapest' is not one of best_quality, sparsest_within"):
        select("cheapest", [A], True, 0.1)
    with pytest.raises(ValueError, match="no trial of the stage finished"):
        select("best_quality", [], True, 0.1)


def test_pareto_front_keeps_only_undominated_trials() -> None:
    dominated = Candidate(3, 28.0, 0.95, "d")
    assert [c.run_id for c in pareto_front([A, B, C, dominated], maximize=True)] == ["c", "b", "a"]
    # Minimising, D (lowest loss) and C (cheapest) are the front; A and B are beaten by C on both.
    assert [c.run_id for c in pareto_front([A, B, C, dominated], maximize=False)] == ["c", "d"]


def test_study_asks_within_the_space_and_starts_from_the_defaults() -> None:
    space = load_search_space("sisr-tiny")
    study = open_study("sqlite:///:memory:", "s", "maximize", seed=0)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    study.enqueue_trial(space.defaults())
    dists = distributions(space)
    first = study.ask(dists)
    assert first.params == space.defaults()
    for _ in range(5):
        trial = study.ask(dists)
        assert all(space.parameters[k].contains(v) for k, v in trial.params.items())
        study.tell(trial, [30.0, 0.5])
