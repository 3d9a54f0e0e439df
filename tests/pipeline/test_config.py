from __future__ import annotations

from pathlib import Path

import pytest

from pngrow.errors import ConfigError
from pngrow.pipeline.config import (RayOptions, SearchConfig, as_smoke_test, flat_params, load_config,
                                    public_config)

EXAMPLES = Path(__file__).parents[2] / "search_spaces" / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load_and_plan(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every example, as written and as its ``--smoke-test``, passes the checks a search makes before any service
    starts (family, tasks, space, objectives, rule, block shapes, data). Which examples also run as Ray jobs:
    tests/pipeline/test_multinode.py."""
    from pngrow.pipeline.plan import prepare

    monkeypatch.setenv("PNGROW_DB", "postgresql://u:p@db/optuna")
    monkeypatch.setenv("PNGROW_CACHE", str(tmp_path / "cache"))
    config = load_config(path)
    assert config.tasks and config.trials_per_stage >= 1
    for checked in (config, as_smoke_test(config)):
        plan = prepare(checked)
        assert list(plan.family.tasks) == config.tasks and plan.space.family == config.family


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
        ("family: sisr\ntasks: [x2]\nbudget: {parallel_trials: '2'}", "'parallel_trials' is '2', not a whole number or "
                                                                 "'auto'"),
        ("family: sisr\ntasks: [x2]\nbudget: {parallel_trials: 0}", "'parallel_trials' is 0, must be at least 1"),
        ("family: sisr\ntasks: [x2]\nobjectives: {cost: flops}", "'cost' names 'flops', not one of density, "
                                                                "stored_params, latency"),
        ("family: sisr\ntasks: [x2]\nobjectives: {cost: [latency, latency]}", "list of distinct costs"),
        ("family: sisr\ntasks: [x2]\nobjectives: {cost: []}", "name one cost"),
        ("family: sisr\ntasks: [x2]\nobjectives: {latency: {rounds: 0}}", "'rounds' is 0, must be at least 1"),
        ("family: sisr\ntasks: [x2]\nobjectives: {latency: {size: -64}}", "'size' is -64, must not be negative"),
        ("family: sisr\ntasks: [x2]\nobjectives: {latency: {warmup: 2}}", "latency': unknown field 'warmup'"),
        ("family: sisr\ntasks: [x2]\nselect: {tolerance: -1}", "'tolerance' is -1.0, must not be negative"),
        ("family: sisr\ntasks: [x2]\nray: {gpus: 1}", "ray': unknown field 'gpus'"),
        ("family: sisr\ntasks: [x2]\nray: {gpus_per_trial: -1}", "ray field 'gpus_per_trial' is -1.0, must not"),
        ("family: sisr\ntasks: [x2]\nray: {gpus_per_trial: -0.5}", "'gpus_per_trial' is -0.5, must not be negative"),
        ("family: sisr\ntasks: [x2]\nray: {cpus_per_trial: -2}", "field 'cpus_per_trial' is -2, must be at least 1"),
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


def test_a_config_with_no_gpus_per_trial_is_allowed(tmp_path: Path) -> None:
    path = tmp_path / "search.yaml"
    path.write_text("family: sisr\ntasks: [x2]\nray: {gpus_per_trial: 0, cpus_per_trial: 3}\n")
    assert (load_config(path).ray.gpus_per_trial, load_config(path).ray.cpus_per_trial) == (0.0, 3)


def test_what_mlflow_records_of_a_config_has_no_password(tmp_path: Path) -> None:
    config = SearchConfig(family="sisr", tasks=["x2", "x3"], arch={"width": 8}, workdir=str(tmp_path),
                          optuna_storage="postgresql://u:s3cret@db/optuna", tracking_uri="http://u:pw@mlflow:5000",
                          ray=RayOptions(address="ray://u:tok@head:10001"))
    public = public_config(config)
    assert "s3cret" not in str(public) and "pw@" not in str(public) and "tok@" not in str(public)
    assert public["optuna_storage"] == "postgresql://u:***@db/optuna" and public["workdir"] == str(tmp_path)
    params = flat_params(config)
    assert params["tasks"] == "x2,x3" and params["arch.width"] == 8
    assert params["ray.address"] == "ray://u:***@head:10001"
    assert "ray" not in params and "arch" not in params and "s3cret" not in str(params)


def test_latency_costs_and_their_input_are_read_and_checked_against_the_family(tmp_path: Path) -> None:
    from pngrow.pipeline.plan import prepare

    path = tmp_path / "search.yaml"
    path.write_text("family: nic\ntasks: [q2]\nobjectives: {cost: [latency, stored_params], latency: {size: 128}}\n")
    config = load_config(path)
    assert config.costs == ("latency", "stored_params") and config.cost == "latency" and config.measures_latency
    assert config.latency_size == 128 and config.latency_rounds == 10
    prepare(config)  # 128 is a multiple of the codec's stride
    path.write_text("family: nic\ntasks: [q2]\nobjectives: {cost: latency, latency: {size: 100}}\n")
    with pytest.raises(ConfigError, match="latency input size 100 does not fit the nic model: it must be a positive "
                                          "multiple of 64"):
        prepare(load_config(path))
    path.write_text("family: sisr\ntasks: [x2]\nselect: {rule: fastest_within}\n")
    assert load_config(path).measures_latency  # the rule reads latencies, so trials measure them
    path.write_text("family: sisr\ntasks: [x2]\nobjectives: {cost: density}\n")
    assert not load_config(path).measures_latency
    path.write_text("family: sisr\ntasks: [x2]\nobjectives: {cost: density, latency: {rounds: 3}}\n")
    config = load_config(path)  # timed for the record, though density is what is optimised
    assert config.measures_latency and config.costs == ("density",) and config.latency_rounds == 3


def test_parallel_trials_defaults_to_every_slot_of_the_cluster(tmp_path: Path) -> None:
    path = tmp_path / "search.yaml"
    path.write_text("family: sisr\ntasks: [x2]\n")
    assert load_config(path).parallel_trials is None  # auto: as many at once as the cluster's nodes hold
    path.write_text("family: sisr\ntasks: [x2]\nbudget: {parallel_trials: auto}\n")
    assert load_config(path).parallel_trials is None
    path.write_text("family: sisr\ntasks: [x2]\nbudget: {parallel_trials: 3}\n")
    assert load_config(path).parallel_trials == 3


def test_a_space_that_can_pair_tasks_needs_a_family_that_declares_channel_pairs(tmp_path: Path) -> None:
    from pngrow.pipeline.plan import prepare

    space = tmp_path / "space.yaml"
    space.write_text("family: nic\nparameters:\n  paired: {type: categorical, choices: [false, true]}\n")
    path = tmp_path / "search.yaml"
    path.write_text(f"family: nic\ntasks: [q2]\nsearch_space: {space}\n")
    with pytest.raises(ConfigError, match=f"search space '{space}': paired: true needs channel pairs, and the nic "
                                          "model declares none"):
        prepare(load_config(path))
    space.write_text("family: nic\nparameters: {lr: {type: float, low: 1.0e-4, high: 1.0e-3}}\nfixed: {paired: false}\n")
    prepare(load_config(path))
    path.write_text("family: sisr\ntasks: [x2]\nsearch_space: sisr-tiny\n")
    prepare(load_config(path))  # sisr declares each residual block's two convolutions
