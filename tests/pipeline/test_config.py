from __future__ import annotations

from pathlib import Path

import pytest

from pngrow.errors import ConfigError
from pngrow.pipeline.config import SearchConfig, load_config

EXAMPLES = Path(__file__).parents[2] / "search_spaces" / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNGROW_DB", "postgresql://u:p@db/optuna")
    config = load_config(path)
    assert config.tasks and config.trials_per_stage >= 1


def test_the_tiny_example_runs_locally_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config(EXAMPLES / "tiny-sisr.yaml", {"workdir": str(tmp_path)})
    assert (config.family, config.tasks, config.search_space) == ("sisr", ["x2", "x3"], "sisr-tiny")
    assert config.resolved_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert config.resolved_optuna_storage() == f"sqlite:///{tmp_path}/optuna.db"
    assert config.local_artifact_root() == (tmp_path / "artifacts").as_uri()
    assert config.ray.address is None


def test_a_tracking_server_owns_its_artifacts() -> None:
    config = SearchConfig(family="sisr", tasks=["x2"], tracking_uri="http://mlflow:5000")
    assert config.local_artifact_root() is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("family: sisr", "missing field 'tasks'"),
        ("family: sisr\ntasks: x2", "field 'tasks' is 'x2', not list"),
        ("family: sisr\ntasks: []", "field 'tasks' is \\[\\], not a non-empty list"),
        ("family: sisr\ntasks: [x2]\nbudget: {trials: 3}", "budget': unknown field 'trials'"),
        ("family: sisr\ntasks: [x2]\nbudget: {trials_per_stage: 0}", "'trials_per_stage' is 0, must be at least 1"),
        ("family: sisr\ntasks: [x2]\nbudget: {parallel_trials: '2'}", "'parallel_trials' is '2', not int"),
        ("family: sisr\ntasks: [x2]\nobjectives: {cost: flops}", "'cost' is 'flops', not one of density"),
        ("family: sisr\ntasks: [x2]\nselect: {tolerance: -1}", "'tolerance' is -1.0, must not be negative"),
        ("family: sisr\ntasks: [x2]\nray: {gpus: 1}", "ray': unknown field 'gpus'"),
        ("family: sisr\ntasks: [x2]\ndata: {eval_limit: 0}", "'eval_limit' is 0, must be at least 1"),
        ("family: sisr\ntasks: [x2]\nseeds: 1", "unknown field 'seeds'"),
    ],
)
def test_invalid_configs_fail_with_one_line_naming_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "search.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_environment_variables_fill_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "search.yaml"
    path.write_text("family: sisr\ntasks: [x2]\noptuna_storage: postgresql://u:${DB_PASSWORD}@db/optuna\n")
    monkeypatch.setenv("DB_PASSWORD", "s3cret")
    assert load_config(path).optuna_storage == "postgresql://u:s3cret@db/optuna"
    monkeypatch.delenv("DB_PASSWORD")
    with pytest.raises(ConfigError, match=r"field 'optuna_storage' uses \$\{DB_PASSWORD\}, which is not set"):
        load_config(path)
