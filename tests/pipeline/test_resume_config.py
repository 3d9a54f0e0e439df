"""``pngrow resume`` reads the config a search recorded through the same checks as a config file: a recorded config
round-trips whole, and one with a bad field is refused in one line naming it, before anything starts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pngrow.pipeline import names
from pngrow.pipeline.cli import main
from pngrow.pipeline.config import EarlyStopping, RayOptions, SearchConfig, public_config
from pngrow.pipeline.names import Kind
from pngrow.pipeline.resume import CONFIG_ARTIFACT, recorded_config
from pngrow.pipeline.tracking import Tracking


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Tracking:
    """One MLflow store (SQLite) for every search run of this module: making one takes seconds."""
    folder = tmp_path_factory.mktemp("resume-config")
    return Tracking(f"sqlite:///{folder / 'mlflow.db'}", "pngrow", (folder / "artifacts").as_uri())


def _recorded_search(tracking: Tracking, recorded: dict) -> str:
    """A search run, as a driver that died left it, holding ``recorded`` as its config."""
    search_id = tracking.start_run("search", {names.KIND: Kind.SEARCH})
    tracking.log_dict(search_id, recorded, CONFIG_ARTIFACT)
    return search_id


def test_a_recorded_config_reads_back_as_the_search_ran_it(tracking: Tracking, tmp_path: Path) -> None:
    config = SearchConfig(family="sisr", tasks=["x2", "x3"], arch={"width": 8}, costs=("density", "latency"),
                          early_stopping=EarlyStopping(keep=0.25, min_trials=3), parallel_trials=2, eval_limit=1,
                          ray=RayOptions(cpus_per_trial=2, device="cpu"), workdir=str(tmp_path), smoke_test=True)
    search_id = _recorded_search(tracking, {**public_config(config), "search_space_resolved": "sisr"})
    assert recorded_config(tracking, search_id) == replace(config, tracking_uri=tracking.uri,
                                                           optuna_storage=config.resolved_optuna_storage())


@pytest.mark.parametrize(("bad", "message"), [
    ({"trials_per_stage": 0}, "field 'trials_per_stage' is 0, must be at least 1"),
    ({"trails_per_stage": 8}, "unknown field 'trails_per_stage' (known: arch, base_model, "),
    ({"early_stopping": {"keep": 2.0, "min_trials": 2}}, "field 'early_stopping' field 'keep' is 2.0, must be between"),
    ({"ray": {"device": "gpu"}}, "ray field 'device' is 'gpu', not one of auto, cpu, cuda"),
])
def test_a_recorded_config_with_a_bad_field_is_refused_in_one_line_on_resume(
        tracking: Tracking, tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: dict, message: str) -> None:
    recorded = {**public_config(SearchConfig(family="sisr", tasks=["x2"], workdir=str(tmp_path))), **bad}
    search_id = _recorded_search(tracking, recorded)
    assert main(["resume", search_id, "--tracking-uri", tracking.uri]) == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pngrow: error:")]
    assert error.startswith(f"pngrow: error: {CONFIG_ARTIFACT} of search {search_id!r}") and message in error
