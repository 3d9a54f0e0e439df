"""Searches on a real Ray cluster of separate processes: the cluster and codec examples submitted as Ray jobs through
the Jobs API (the job's driver joins the head's cluster), and spread over worker nodes that each declare a GPU (trials
run on different nodes at once, and train on the CPU with a warning, since these GPUs have no CUDA behind them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import mlflow
import pytest
import yaml

from pngrow.pipeline.registry import promote
from pngrow.pipeline.tracking import Tracking
from tests.services import BIN, RayHead, SeaweedS3, short_tempdir

if TYPE_CHECKING:
    from tests.pipeline.conftest import GpuCluster, Services

REPO = Path(__file__).resolve().parents[2]
# The examples run as Ray jobs: the cluster's (on the real services) and the codec's. tiny-sisr runs embedded and
# on a running head in test_search_local and test_search_services, and every example's plan is checked in
# test_config, so running all five here (3.3 minutes of a 2-core suite) added time, not coverage.
JOB_EXAMPLES = [REPO / "search_spaces" / "examples" / f"{name}.yaml" for name in ("cluster-sisr", "tiny-nic")]

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


def _photos_in_s3(s3: SeaweedS3, bucket: str, train: str, evaluation: str) -> None:
    """scikit-image's photos as PNGs in ``bucket`` (made here), as a user's data would be: whole under ``train``,
    their 120x120 centres under ``evaluation`` (so that a full-size EDSR evaluates in a few seconds)."""
    import io

    from PIL import Image
    from skimage import data

    client = s3.client()
    client.create_bucket(Bucket=bucket)
    for name in ("astronaut", "coffee", "chelsea"):
        photo = Image.fromarray(getattr(data, name)())
        left, top = (photo.width - 120) // 2, (photo.height - 120) // 2
        for prefix, image in ((train, photo), (evaluation, photo.crop((left, top, left + 120, top + 120)))):
            body = io.BytesIO()
            image.save(body, format="PNG")
            client.put_object(Bucket=bucket, Key=f"{prefix}/{name}.png", Body=body.getvalue())


def _wait_for_jobs(client: Any, jobs: dict[str, str], seconds: float) -> None:
    """Until every job (name -> submission id) of the Jobs API ``client`` has ended; their logs' tails if not."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + seconds
    ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while not all(client.get_job_status(job) in ended for job in jobs.values()):
        assert time.monotonic() < deadline, {name: client.get_job_logs(job)[-2000:] for name, job in jobs.items()}
        time.sleep(3)


@pytest.mark.slow
def test_the_cluster_and_codec_examples_run_as_ray_jobs(services: Services, root: Path) -> None:
    """``ray job submit --working-dir . -- pngrow search search_spaces/examples/X.yaml --smoke-test``, for each of
    :data:`JOB_EXAMPLES` at once, through the Jobs API of a head started on its own (4 CPUs and 4 logical GPUs,
    with no CUDA behind them): each job's driver joins the head's cluster. The cluster example runs on the real
    services (its data in S3, Optuna on PostgreSQL, MLflow on a server with S3 artifacts); the codec example on its
    embedded default's SQLite stores."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    head = RayHead(root / "ray", num_cpus=4, num_gpus=4, dashboard=True)
    head.root.mkdir()
    head.start()
    try:
        _photos_in_s3(services.s3, "pngrow-data", "div2k/train", "set5")  # cluster-sisr.yaml's data
        client = JobSubmissionClient(head.dashboard_url, headers={"Authorization": f"Bearer {head.token}"})
        jobs = {}
        for example in JOB_EXAMPLES:
            stores = (f"--tracking-uri {services.mlflow.uri}" if example.stem == "cluster-sisr"  # not mlflow.internal
                      else f"--tracking-uri sqlite:///{root}/{example.stem}/mlflow.db --workdir {root}/{example.stem}")
            jobs[example.stem] = client.submit_job(
                entrypoint=f"{BIN / 'pngrow'} search {example.relative_to(REPO)} --smoke-test "
                           f"--json {root}/{example.stem}.json {stores}",
                runtime_env={"working_dir": str(REPO), "env_vars": {
                    **services.s3.env(), "PNGROW_DB": services.postgres.url("optuna_jobs"),
                    "PNGROW_CACHE": str(root / "cache")}})
        _wait_for_jobs(client, jobs, 540)
        for name, job in jobs.items():
            logs = client.get_job_logs(job)
            assert client.get_job_status(job) == JobStatus.SUCCEEDED, (name, logs[-3000:])
            assert "Ray: 4 CPUs, 4 GPUs; trials ask for a GPU (device auto)" in logs  # the head's cluster, joined
            config = yaml.safe_load((REPO / "search_spaces/examples" / f"{name}.yaml").read_text())
            summary = json.loads((root / f"{name}.json").read_text())
            assert [s["task"] for s in summary["stages"]] == config["tasks"]
            assert set(summary["final_metrics"]) == set(config["tasks"])
            uri = services.mlflow.uri if name == "cluster-sisr" else f"sqlite:///{root}/{name}/mlflow.db"
            tracking = mlflow.MlflowClient(uri)
            search = tracking.get_run(summary["search_id"])
            assert search.info.status == "FINISHED" and search.data.tags["pngrow.smoke_test"] == "true"
            assert search.info.run_name == f"{config['name']}-smoke-test"
            trials = tracking.search_runs([search.info.experiment_id], "tags.`pngrow.kind` = 'trial' and "
                                          f"tags.`pngrow.search_id` = '{search.info.run_id}'")
            assert summary["trials"] == len(trials) == len(config["tasks"])  # one trial per stage
            driver_node = client.get_job_info(job).driver_node_id
            assert {t.data.tags["pngrow.ray_node"] for t in trials} == {driver_node}  # the head, the job's only node
            assert all(t.data.tags["pngrow.device_warning"].endswith("training on the CPU") for t in trials)
            if name == "cluster-sisr":
                with pytest.raises(ValueError, match=r"is the model of smoke test \w+ \(pngrow search --smoke-test\)"):
                    promote(Tracking(uri, "pngrow-sisr"), search.info.run_id, "never-registered")
                assert search.info.artifact_uri.startswith("s3://pngrow/mlflow/")
                sources = [json.loads(d.dataset.source)["uri"] for t in trials for d in t.inputs.dataset_inputs]
                assert sources and all(source.startswith("s3://pngrow-data/") for source in sources)
    finally:
        head.stop()


@pytest.mark.slow
def test_trials_spread_over_worker_nodes_and_fall_back_to_the_cpu(gpu_cluster: GpuCluster, root: Path) -> None:
    head, gpu_nodes = gpu_cluster.head, gpu_cluster.gpu_nodes
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


@pytest.mark.slow
def test_a_local_data_folder_reaches_a_clusters_trials_through_the_artifact_store(gpu_cluster: GpuCluster,
                                                                                  root: Path) -> None:
    from PIL import Image

    train = root / "local" / "train"  # a paired SR folder on the driver's disk
    for name, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        for sub, size, suffix in (("HR", 48, ""), ("LR_bicubic/X2", 24, "x2")):
            (train / sub).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (size, size), colour).save(train / sub / f"{name}{suffix}.png")
    head = gpu_cluster.head
    (root / "space.yaml").write_text(SPACE)
    search = _search(root, "uploaded", "{cpus_per_trial: 1, device: cpu}").replace(
        "data: {eval_limit: 1}", f"data: {{train: {train}, eval_limit: 1, cache: {root}/cache}}").replace(
        "trials_per_stage: 2, parallel_trials: auto", "trials_per_stage: 1, parallel_trials: 1")
    (root / "search.yaml").write_text(search)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.run([str(BIN / "pngrow"), "search", "search.yaml", "--ray-address", head.address],
                            capture_output=True, text=True, timeout=600, cwd=root, env={**env, **head.env()})
    assert driver.returncode == 0, driver.stderr[-3000:]
    assert f"data train: uploading '{train}' to the search run" in driver.stdout
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
