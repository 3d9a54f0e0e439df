"""Searches on a real Ray cluster of separate processes: submitted as a Ray job through the Jobs API (the job's
driver joins the head's cluster), and spread over worker nodes that each declare a GPU (trials run on different
nodes at once, and train on the CPU with a warning, since these GPUs have no CUDA behind them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import mlflow
import pytest

from tests.services import BIN, RayHead, RayNode, cluster_nodes, short_tempdir

SPACE = ("family: sisr\nparameters:\n  prune_ratio: {type: float, low: 0.3, high: 0.6, default: 0.5}\n"
         "fixed: {grow_steps: 10, prune_steps: 4, finetune_steps: 4, batch_size: 4, block_shape: 4x4, lr: 1.0e-3}\n")


def _search(root: Path, name: str, ray: str) -> str:
    """A tiny one-task search whose MLflow and Optuna stores are SQLite files under ``root``."""
    return (f"name: {name}\nfamily: sisr\ntasks: [x2]\narch: {{width: 16, depth: 2, lr_patch: 16}}\n"
            f"data: {{eval_limit: 1}}\nsearch_space: space.yaml\n"
            f"budget: {{trials_per_stage: 2, parallel_trials: auto}}\n"
            f"tracking: {{uri: 'sqlite:///{root}/mlflow.db'}}\nworkdir: {root}/runs\nray: {ray}\n")


def _trials(root: Path) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("pngrow")
    return client.search_runs([experiment.experiment_id], "tags.`pngrow.kind` = 'trial'")


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tempdir("pngrow-mn-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_a_search_submitted_as_a_ray_job_runs_on_the_heads_cluster(root: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    head = RayHead(root / "ray", num_cpus=2, dashboard=True)
    head.root.mkdir()
    head.start()
    try:
        job = root / "job"
        job.mkdir()
        (job / "space.yaml").write_text(SPACE)
        # An address in the config is used as given; here there is none, so the job's driver joins the job's cluster
        # (RAY_ADDRESS), and num_cpus (which Ray refuses when joining a cluster) is not passed.
        (job / "search.yaml").write_text(_search(root, "as-a-job", "{num_cpus: 7, cpus_per_trial: 1}"))
        # The Jobs API asks for the head's token (this process read its Ray auth settings when it imported Ray).
        client = JobSubmissionClient(head.dashboard_url, headers={"Authorization": f"Bearer {head.token}"})
        job_id = client.submit_job(entrypoint=f"{BIN / 'pngrow'} search search.yaml --json {root}/summary.json",
                                   runtime_env={"working_dir": str(job)})
        deadline = time.monotonic() + 300
        while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
            time.sleep(2)
        logs = client.get_job_logs(job_id)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
        assert "Ray: 2 CPUs, 0 GPUs; trials ask for CPUs (device auto), 2 at a time" in logs  # the head's 2 CPUs, not 7
        driver_node = client.get_job_info(job_id).driver_node_id
        summary = json.loads((root / "summary.json").read_text())
        trials = _trials(root)
        assert len(trials) == 2 and summary["trials"] == 2
        assert {t.data.tags["pngrow.ray_node"] for t in trials} == {driver_node}  # the head, the job's only node
        assert all(t.info.status == "FINISHED" and "pngrow.device_warning" not in t.data.tags for t in trials)
    finally:
        head.stop()


@pytest.mark.slow
def test_trials_spread_over_worker_nodes_and_fall_back_to_the_cpu(root: Path) -> None:
    head = RayHead(root / "ray", num_cpus=1)
    head.root.mkdir()
    nodes = [RayNode(head, root / f"node{i}.log", num_cpus=1, num_gpus=1) for i in range(2)]
    try:
        head.start()
        for node in nodes:
            node.start()
        gpu_nodes = {node for node, resources in cluster_nodes(head, 3).items() if resources.get("GPU")}
        assert len(gpu_nodes) == 2
        (root / "space.yaml").write_text(SPACE)
        (root / "search.yaml").write_text(_search(root, "multinode", "{gpus_per_trial: 1, device: auto}"))
        # The driver is its own process, as a user runs it, with the head's token.
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        driver = subprocess.run([str(BIN / "pngrow"), "search", "search.yaml", "--ray-address", head.address],
                                capture_output=True, text=True, timeout=600, cwd=root, env={**env, **head.env()})
        assert driver.returncode == 0, driver.stderr[-3000:]
        assert "Ray: 3 CPUs, 2 GPUs; trials ask for a GPU (device auto), 2 at a time" in driver.stdout
        trials = _trials(root)
        assert len(trials) == 2
        ran_on = [t.data.tags["pngrow.ray_node"] for t in trials]
        assert set(ran_on) == gpu_nodes  # a GPU node each, so at once (the head has no GPU)
        for trial in trials:
            assert trial.info.status == "FINISHED"
            warning = trial.data.tags["pngrow.device_warning"]
            assert warning.startswith("Ray assigned GPU 0 on node ") and warning.endswith("training on the CPU")
        # With device cuda the same trials fail, each with one line naming the device; so does the stage.
        (root / "cuda.yaml").write_text(_search(root, "cuda", "{gpus_per_trial: 1, device: cuda}"))
        driver = subprocess.run([str(BIN / "pngrow"), "search", "cuda.yaml", "--ray-address", head.address, "--quiet"],
                                capture_output=True, text=True, timeout=300, cwd=root, env={**env, **head.env()})
        assert driver.returncode == 2, driver.stderr[-3000:]
        (line,) = [line for line in driver.stderr.splitlines() if line.startswith("pngrow: error:")]
        assert "every trial failed, the last with RuntimeError: device 'cuda' is not available: Ray assigned GPU 0" \
            in line
        failed = [t for t in _trials(root) if t.info.status == "FAILED"]
        assert len(failed) == 2 and all("device 'cuda' is not available" in t.data.tags["pngrow.error"] for t in failed)
    finally:
        for node in nodes:
            node.stop()
        head.stop()


@pytest.mark.slow
def test_a_local_data_folder_reaches_a_clusters_trials_through_the_artifact_store(root: Path) -> None:
    from PIL import Image

    train = root / "local" / "train"  # a paired SR folder on the driver's disk
    for name, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        for sub, size, suffix in (("HR", 48, ""), ("LR_bicubic/X2", 24, "x2")):
            (train / sub).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (size, size), colour).save(train / sub / f"{name}{suffix}.png")
    head = RayHead(root / "ray", num_cpus=1)
    head.root.mkdir()
    try:
        head.start()
        (root / "space.yaml").write_text(SPACE)
        search = _search(root, "uploaded", "{cpus_per_trial: 1}").replace(
            "data: {eval_limit: 1}", f"data: {{train: {train}, eval_limit: 1, cache: {root}/cache}}").replace(
            "trials_per_stage: 2, parallel_trials: auto", "trials_per_stage: 1, parallel_trials: 1")
        (root / "search.yaml").write_text(search)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        driver = subprocess.run([str(BIN / "pngrow"), "search", "search.yaml", "--ray-address", head.address],
                                capture_output=True, text=True, timeout=600, cwd=root, env={**env, **head.env()})
        assert driver.returncode == 0, driver.stderr[-3000:]
        assert f"data train: uploading '{train}' to the search run" in driver.stdout
    finally:
        head.stop()
    (trial,) = _trials(root)
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    search = client.get_run(trial.data.tags["pngrow.search_id"])
    assert search.data.tags["pngrow.uploaded_data.train"] == str(train)  # which local folder was uploaded
    uri = search.data.params["train_data"]
    digest = uri.rsplit("/", 1)[-1]
    assert uri == f"runs:/{search.info.run_id}/data/train/{digest}"
    stored = client.download_artifacts(search.info.run_id, f"data/train/{digest}", str(root / "stored"))
    assert sorted(str(p.relative_to(stored)) for p in Path(stored).rglob("*.png")) == [
        "HR/a.png", "HR/b.png", "LR_bicubic/X2/ax2.png", "LR_bicubic/X2/bx2.png"]
    # The trial read the uploaded copy, fetched into the node's cache under its digest, not the driver's folder.
    (training,) = [d.dataset for d in trial.inputs.dataset_inputs
                   if any(t.key == "mlflow.data.context" and t.value == "training" for t in d.tags)]
    assert json.loads(training.source)["tags"]["mlflow.source.name"] == uri
    assert sorted(p.name for p in (root / "cache" / "uploads" / digest / "HR").iterdir()) == ["a.png", "b.png"]
