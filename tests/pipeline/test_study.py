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
    with pytest.raises(ValueError, match="selection rule 'cheapest' is not one of best_quality, fastest_within, sparsest_within"):
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
    study = open_study("sqlite:///:memory:", "s", "psnr", "maximize", ["density"], seed=0)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert study.metric_names == ["psnr", "density"]  # what the Optuna dashboard shows
    study.enqueue_trial(space.defaults())
    dists = distributions(space)
    first = study.ask(dists)
    assert first.params == space.defaults()
    for _ in range(5):
        trial = study.ask(dists)
        assert all(space.parameters[k].contains(v) for k, v in trial.params.items())
        study.tell(trial, [30.0, 0.5])


def test_retrying_outlasts_a_short_outage_and_names_a_long_one() -> None:
    import sqlalchemy.exc

    from pngrow.errors import ConfigError, ServiceError
    from pngrow.pipeline.study import retry_delays, retrying

    calls = []

    def flaky(fails: int):  # noqa: ANN202
        def call() -> str:
            calls.append(1)
            if len(calls) <= fails:
                raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection\nmore"))
            return "answered"
        return call

    assert retrying(flaky(2), "postgresql://u:***@db/optuna", delays=(0.0, 0.0)) == "answered" and len(calls) == 3
    calls.clear()
    with pytest.raises(ServiceError, match=r"^Optuna storage 'postgresql://u:\*\*\*@db/optuna' stopped answering: "
                                           r"OperationalError: .*server closed the connection") as info:
        retrying(flaky(5), "postgresql://u:***@db/optuna", delays=(0.0, 0.0))
    assert len(calls) == 3 and info.value.service == "optuna" and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"^PNGROW_OPTUNA_MAX_RETRIES='two' is not a number of retries"):
        retry_delays({"PNGROW_OPTUNA_MAX_RETRIES": "two"})


def test_a_study_with_two_costs_has_three_named_objectives(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    open_study(storage, "three", "psnr", "maximize", ["latency", "stored_params"], seed=0)
    loaded = optuna.load_study(study_name="three", storage=storage)  # as optuna-dashboard reads it
    assert loaded.metric_names == ["psnr", "latency", "stored_params"]
    assert loaded.directions[1:] == [optuna.study.StudyDirection.MINIMIZE] * 2


def test_fastest_within_takes_the_lowest_latency_near_the_best_and_needs_latencies() -> None:
    from pngrow.pipeline.study import select

    fast = Candidate(0, 29.95, 0.9, "fast", relative_latency=0.5)
    sparse = Candidate(1, 30.0, 0.3, "sparse", relative_latency=0.9)
    too_bad = Candidate(2, 28.0, 0.1, "bad", relative_latency=0.1)
    assert select("fastest_within", [fast, sparse, too_bad], True, 0.1).run_id == "fast"
    assert select("sparsest_within", [fast, sparse, too_bad], True, 0.1).run_id == "sparse"
    with pytest.raises(ValueError, match="needs every trial's latency"):
        select("fastest_within", [Candidate(0, 30.0, 0.5, "x")], True, 0.1)


def test_the_optuna_dashboard_shows_each_objective_by_name(tmp_path) -> None:
    import io
    import json
    import sys

    import optuna_dashboard

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    open_study(storage, "stage", "psnr", "maximize", ["latency", "stored_params"], seed=0)
    app = optuna_dashboard.wsgi(storage)  # the dashboard's own server, asked as its web page asks it

    def get(path: str) -> dict:
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
                   "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
                   "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr}
        status = []
        body = b"".join(app(environ, lambda code, headers, exc_info=None: status.append(code)))
        assert status == ["200 OK"]
        return json.loads(body)

    [summary] = get("/api/studies")["study_summaries"]
    assert get(f"/api/studies/{summary['study_id']}")["objective_names"] == ["psnr", "latency", "stored_params"]
