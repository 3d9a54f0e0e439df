"""Searches survive faults: a trial whose loss becomes NaN, a trial worker killed by its PID, a driver killed by its
PID mid-stage, then resumed, and the Optuna database, tracking server or object store lost mid-search. The crashes
run on the embedded default (in-process Ray, SQLite) and again on the cluster stack of the search tests. The
searches and resumes this process runs itself share one in-process Ray (``joined_ray``); the drivers it kills start
their own."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pngrow.pipeline.cli import main
from pngrow.workers.models import load_model

pytestmark = pytest.mark.slow


def _config(folder: Path, tasks: str = "[x2, x3]", lr: str = "{type: float, low: 5.0e-4, high: 2.0e-3, log: true}",
            steps: str = "grow_steps: 60, prune_steps: 15, finetune_steps: 15", retries: int = 0) -> Path:
    (folder / "space.yaml").write_text(
        f"family: sisr\nparameters:\n  prune_ratio: {{type: float, low: 0.3, high: 0.6, default: 0.5}}\n"
        f"  lr: {lr}\nfixed: {{{steps}, batch_size: 2}}\n"
    )
    path = folder / "search.yaml"
    path.write_text(
        f"name: faults\nfamily: sisr\ntasks: {tasks}\narch: {{width: 8, depth: 2, lr_patch: 12}}\n"
        f"data: {{eval_limit: 1}}\nsearch_space: {folder / 'space.yaml'}\n"
        f"budget: {{trials_per_stage: 3, parallel_trials: 2}}\nray: {{max_retries: {retries}}}\n"
    )
    return path


def _client(folder: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{folder / 'pngrow-runs' / 'mlflow.db'}")


def _runs(client: MlflowClient, filter_string: str = "") -> list:
    experiment = client.get_experiment_by_name("pngrow")
    return [] if experiment is None else client.search_runs([experiment.experiment_id], filter_string)


def _driver_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a pngrow subprocess, without a tracking URI and with ``extra`` on top."""
    return {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **(extra or {})}


def _start_driver(folder: Path, config: Path, *args: str, env: dict[str, str] | None = None,
                  capture: bool = False) -> subprocess.Popen:
    """``pngrow search CONFIG ARGS --quiet`` as its own process session (``env`` added to the environment), its
    stderr in ``driver.log``, or readable as text from the process with ``capture``."""
    stderr = subprocess.PIPE if capture else (folder / "driver.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "pngrow", "search", str(config), *args, "--quiet"], cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=stderr, env=_driver_env(env), start_new_session=True,
                            text=capture)


def _fingerprint(client: MlflowClient, run_id: str, task: str, folder: Path) -> str:
    """``task``'s fingerprint in the checkpoint of ``run_id``, computed from its weights."""
    _, shared = load_model(client.download_artifacts(run_id, "checkpoint", str(folder)))
    return shared.fingerprint(task)


def _kill_with_all_it_started(driver: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started, its in-process Ray's daemons and trial workers included
    (some leave its session), as the loss of its machine would: a trial training then is cut off."""
    import psutil

    processes = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
    os.killpg(driver.pid, signal.SIGKILL)
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    driver.wait(30)


def _wait_for(what: str, check, process: subprocess.Popen, timeout: float = 240):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the driver ended before {what}"
        try:
            found = check()
        except Exception:  # noqa: BLE001 - the store may be mid-creation
            found = None
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _lose_service_mid_search(folder: Path, config: Path, args: list[str], env: dict[str, str], client: MlflowClient,
                             stop_service) -> str:  # noqa: ANN001
    """Run ``pngrow search CONFIG ARGS`` as a driver process (``env`` added to the environment), call
    ``stop_service()`` once a trial trains, and return the driver's stderr; the driver must end with status 2."""
    driver = _start_driver(folder, config, *args, env=env, capture=True)
    _wait_for("a trial training", lambda: _runs(client, "tags.`pngrow.kind` = 'trial'"), driver)
    stop_service()
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 2, err
    return err


def test_a_nan_trial_fails_alone_and_the_stage_goes_on(joined_ray, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    # The first trial runs the defaults: a learning rate of 1e30 makes its loss NaN at once.
    config = _config(tmp_path, tasks="[x2]", lr="{type: categorical, choices: [1.0e30, 1.0e-3], default: 1.0e30}",
                     steps="grow_steps: 20, prune_steps: 5, finetune_steps: 5")
    assert main(["search", str(config)]) == 0
    assert "trial 0 failed: FloatingPointError: task 'x2': training loss became nan" in capsys.readouterr().out
    trials = _runs(_client(tmp_path), "tags.`pngrow.kind` = 'trial'")
    failed = [t for t in trials if t.info.status == "FAILED"]
    assert failed and all("training loss became nan" in t.data.tags["pngrow.error"] for t in failed)
    assert len(trials) == 3 and any(t.info.status == "FINISHED" for t in trials)
    search = _runs(_client(tmp_path), "tags.`pngrow.kind` = 'search'")[0]
    assert search.info.status == "FINISHED"


def test_a_killed_trial_worker_fails_that_trial_only(tmp_path: Path) -> None:
    driver = _start_driver(tmp_path, _config(tmp_path, tasks="[x2]"))
    client = _client(tmp_path)

    def training_trial():  # noqa: ANN202
        for run in _runs(client, "tags.`pngrow.kind` = 'trial' and attributes.status = 'RUNNING'"):
            if "pngrow.worker_pid" in run.data.tags and client.get_metric_history(run.info.run_id, "train/l1"):
                return run
        return None

    victim = _wait_for("a trial training", training_trial, driver)
    os.kill(int(victim.data.tags["pngrow.worker_pid"]), signal.SIGKILL)
    assert driver.wait(300) == 0, (tmp_path / "driver.log").read_text()[-2000:]
    trials = {t.info.run_id: t for t in _runs(client, "tags.`pngrow.kind` = 'trial'")}
    assert trials[victim.info.run_id].info.status == "FAILED"
    assert "Worker" in trials[victim.info.run_id].data.tags["pngrow.error"]  # Ray's WorkerCrashedError
    assert sum(t.info.status == "FINISHED" for t in trials.values()) == 2
    assert _runs(client, "tags.`pngrow.kind` = 'search'")[0].info.status == "FINISHED"


def test_a_killed_driver_resumes_without_redoing_finished_work(joined_ray, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path)
    driver = _start_driver(tmp_path, config)
    client = _client(tmp_path)

    def second_stage_trial_finished_and_one_training():  # noqa: ANN202
        stages = _runs(client, "tags.`pngrow.kind` = 'stage' and tags.`pngrow.stage_index` = '1'")
        if stages:
            trials = _runs(client, f"tags.`mlflow.parentRunId` = '{stages[0].info.run_id}'")
            training = [t for t in trials if t.info.status == "RUNNING" and "pngrow.fingerprint" not in t.data.tags]
            return stages[0] if training and any(t.info.status == "FINISHED" for t in trials) else None
        return None

    _wait_for("a finished trial in stage 2 and one training", second_stage_trial_finished_and_one_training, driver)
    _kill_with_all_it_started(driver)
    before = {t.info.run_id: t.info.status for t in _runs(client, "tags.`pngrow.kind` = 'trial'")}
    cut_off = [r for r, s in before.items() if s == "RUNNING"]
    search_id = _runs(client, "tags.`pngrow.kind` = 'search'")[0].info.run_id
    stage1 = _runs(client, "tags.`pngrow.kind` = 'stage' and tags.`pngrow.stage_index` = '0'")[0]
    assert stage1.info.status == "FINISHED"

    assert main(["resume", search_id, "--quiet"]) == 0
    search = client.get_run(search_id)
    assert search.info.status == "FINISHED" and search.data.tags["pngrow.attempts"] == "2"
    after = {t.info.run_id: t for t in _runs(client, "tags.`pngrow.kind` = 'trial'")}
    # Finished trials were kept, not re-run; the ones the crash cut off are KILLED; nothing is left RUNNING.
    assert all(after[r].info.status == "FINISHED" for r, s in before.items() if s == "FINISHED")
    cut_off = [r for r in cut_off if "pngrow.fingerprint" not in after[r].data.tags]
    assert cut_off and all(after[r].info.status == "KILLED" for r in cut_off)
    assert not [r for r in _runs(client) if r.info.status == "RUNNING"]
    stage1_trials = [t for t in after.values() if t.data.tags["pngrow.stage_index"] == "0"]
    assert len(stage1_trials) == 3
    stage2_finished = [t for t in after.values() if t.data.tags["pngrow.stage_index"] == "1"
                       and t.info.status == "FINISHED"]
    assert len(stage2_finished) == 3
    # The committed stage is bit-identical to an uninterrupted search with the same seeds.
    assert main(["search", str(config), "--quiet"]) == 0
    fresh = [r for r in _runs(client, "tags.`pngrow.kind` = 'search'") if r.info.run_id != search_id][0]
    assert fresh.data.tags["pngrow.fingerprint.x2"] == search.data.tags["pngrow.fingerprint.x2"]
    final = _fingerprint(client, search.data.tags["pngrow.final_stage_run"], "x2", tmp_path / "final")
    assert final == search.data.tags["pngrow.fingerprint.x2"]


def test_losing_the_optuna_database_mid_search_fails_cleanly_then_resumes(joined_ray, tmp_path: Path,
                                                                          monkeypatch) -> None:
    from tests.services import Postgres, short_tempdir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    root = short_tempdir("pngrow-pg-")
    database = Postgres(root)
    database.start(["optuna"])
    try:
        config = _config(tmp_path, tasks="[x2]")
        storage = database.url("optuna")
        client = _client(tmp_path)
        # The database goes away while trials train. pngrow retries for about a minute; twice here (1 + 2 s).
        env = {"PNGROW_OPTUNA_MAX_RETRIES": "2"}
        err = _lose_service_mid_search(tmp_path, config, ["--optuna-storage", storage], env, client, database.stop)
        assert err.strip().splitlines()[-1].startswith(
            f"pngrow: error: Optuna storage 'postgresql://pngrow:***@127.0.0.1:{database.port}/optuna' stopped answering")
        assert database.password not in err
        search = _runs(client, "tags.`pngrow.kind` = 'search'")[0]
        assert search.info.status == "FAILED" and "stopped answering" in search.data.tags["pngrow.error"]

        database.restart()
        assert main(["resume", search.info.run_id, "--optuna-storage", storage, "--quiet"]) == 0
        assert client.get_run(search.info.run_id).info.status == "FINISHED"
        assert not [r for r in _runs(client) if r.info.status == "RUNNING"]
    finally:
        database.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_losing_the_tracking_server_mid_search_fails_cleanly_then_resumes(joined_ray, tmp_path: Path,
                                                                          monkeypatch) -> None:
    from tests.services import MlflowServer, short_tempdir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    root = short_tempdir("pngrow-mlflow-")
    server = MlflowServer(root, f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"), {})
    server.start()
    try:
        config = _config(tmp_path, tasks="[x2]")
        # MLflow's client retries with backoff on its own; shorter here so that the test does not wait minutes.
        env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
        client = MlflowClient(server.uri)
        # The tracking server goes away while trials train and log.
        err = _lose_service_mid_search(tmp_path, config, ["--tracking-uri", server.uri], env, client, server.stop)
        assert err.strip().splitlines()[-1].startswith(
            f"pngrow: error: MLflow tracking server '{server.uri}' stopped answering"), err

        server.restart()
        search = _runs(client, "tags.`pngrow.kind` = 'search'")[0]
        assert search.info.status == "RUNNING"  # it could not be marked while the server was gone
        assert main(["resume", search.info.run_id, "--tracking-uri", server.uri, "--quiet"]) == 0
        search = client.get_run(search.info.run_id)
        assert search.info.status == "FINISHED" and search.data.tags["pngrow.attempts"] == "2"
        assert not [r for r in _runs(client) if r.info.status == "RUNNING"]
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_losing_the_artifact_store_mid_search_fails_cleanly_then_resumes(tmp_path: Path, monkeypatch) -> None:
    from tests.services import MlflowServer, SeaweedS3, short_tempdir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    root = short_tempdir("pngrow-s3-")
    store = SeaweedS3(root / "s3", bucket="pngrow")
    store.root.mkdir()
    store.start()
    server = MlflowServer(root, f"sqlite:///{root / 'mlflow.db'}", "s3://pngrow/mlflow", store.env())
    try:
        server.start()
        config = _config(tmp_path, tasks="[x2]")
        # boto3 retries on its own (AWS_MAX_ATTEMPTS); fewer here so that the test does not wait long. The store's
        # credentials go to the pngrow processes only: boto3's default session in this one keeps the first it sees.
        env = {**store.env(), "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"}
        client = MlflowClient(server.uri)
        # The object store goes away before the trials upload their checkpoints.
        err = _lose_service_mid_search(tmp_path, config, ["--tracking-uri", server.uri], env, client, store.stop)
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"pngrow: error: artifact store '{store.endpoint}' stopped answering"), err
        assert store.secret_key not in err
        search = _runs(client, "tags.`pngrow.kind` = 'search'")[0]
        assert search.info.status == "FAILED" and "stopped answering" in search.data.tags["pngrow.error"]

        store.restart()
        resumed = subprocess.run([sys.executable, "-m", "pngrow", "resume", search.info.run_id, "--tracking-uri",
                                  server.uri, "--quiet"], cwd=tmp_path, env=_driver_env(env), capture_output=True,
                                 text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert client.get_run(search.info.run_id).info.status == "FINISHED"
        assert not [r for r in _runs(client) if r.info.status == "RUNNING"]
    finally:
        server.stop()
        store.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_killed_worker_and_a_killed_driver_on_real_services(services, tmp_path: Path, monkeypatch) -> None:
    """The two crashes above on the cluster stack: PostgreSQL for Optuna, an MLflow server with S3 artifacts, and a Ray
    head in its own process, whose worker (not the driver's child) is killed; resume then reads the committed stage
    back from S3."""
    storage = services.postgres.url("optuna_faults")
    cluster = ["--tracking-uri", services.mlflow.uri, "--optuna-storage", storage, "--ray-address",
               services.ray.address, "--workdir", str(tmp_path / "w")]
    driver = _start_driver(tmp_path, _config(tmp_path), *cluster, env=services.env())
    client = MlflowClient(services.mlflow.uri)
    started_ms = int(time.time() * 1000) - 1000
    search_id = _wait_for("the search run", lambda: [
        r.info.run_id for r in _runs(client, f"tags.`pngrow.kind` = 'search' and attributes.start_time > {started_ms}")
    ], driver)[0]

    def ours(filter_string: str) -> list:
        return _runs(client, f"tags.`pngrow.search_id` = '{search_id}' and {filter_string}")

    def training_trial():  # noqa: ANN202
        for run in ours("tags.`pngrow.kind` = 'trial' and attributes.status = 'RUNNING'"):
            if "pngrow.worker_pid" in run.data.tags and client.get_metric_history(run.info.run_id, "train/l1"):
                return run
        return None

    victim = _wait_for("a stage 1 trial training", training_trial, driver)
    os.kill(int(victim.data.tags["pngrow.worker_pid"]), signal.SIGKILL)

    def second_stage_trial_finished():  # noqa: ANN202
        trials = ours("tags.`pngrow.kind` = 'trial' and tags.`pngrow.stage_index` = '1'")
        return any(t.info.status == "FINISHED" for t in trials)

    _wait_for("a finished trial in stage 2", second_stage_trial_finished, driver, timeout=400)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(30)
    before = {t.info.run_id: t.info.status for t in ours("tags.`pngrow.kind` = 'trial'")}
    stage1 = ours("tags.`pngrow.kind` = 'stage' and tags.`pngrow.stage_index` = '0'")[0]
    for key, value in services.s3.env().items():  # to read checkpoints from the object store here
        monkeypatch.setenv(key, value)
    committed = _fingerprint(client, stage1.info.run_id, "x2", tmp_path / "committed")

    resumed = subprocess.run([sys.executable, "-m", "pngrow", "resume", search_id, *cluster, "--quiet"],
                             cwd=tmp_path, env=_driver_env(services.env()), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (tmp_path / "w").exists(), "a search on services must not fall back to local files"
    search = client.get_run(search_id)
    assert search.info.status == "FINISHED" and search.data.tags["pngrow.attempts"] == "2"
    after = {t.info.run_id: t for t in ours("tags.`pngrow.kind` = 'trial'")}
    assert after[victim.info.run_id].info.status == "FAILED"
    assert "Worker" in after[victim.info.run_id].data.tags["pngrow.error"]  # Ray's WorkerCrashedError
    assert all(after[r].info.status == "FINISHED" for r, s in before.items() if s == "FINISHED")
    assert not ours("attributes.status = 'RUNNING'")
    # Stage 1 kept its three trials (one failed); stage 2 owed only the trials the crash cut off.
    assert sorted(t.info.status for t in after.values() if t.data.tags["pngrow.stage_index"] == "0") == [
        "FAILED", "FINISHED", "FINISHED"]
    assert sum(t.info.status == "FINISHED" and t.data.tags["pngrow.stage_index"] == "1" for t in after.values()) == 3
    # The committed task came back from the object store bit-identical: the final model's x2, computed here from its
    # checkpoint, is the x2 of stage 1's checkpoint as the killed driver left it, and the search records that.
    final = _fingerprint(client, search.data.tags["pngrow.final_stage_run"], "x2", tmp_path / "final")
    assert final == committed and search.data.tags["pngrow.fingerprint.x2"] == committed
