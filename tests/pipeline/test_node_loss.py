"""A worker node dies mid-stage: on a Ray head plus two GPU worker nodes, with the real services (PostgreSQL, S3
artifacts behind an MLflow server), the raylet of the node running a trial is killed while that trial trains. Only
that trial is affected: with ``ray.max_retries: 1`` Ray reruns it on the surviving node, in the same MLflow run, and
the search finishes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from mlflow import MlflowClient

from tests.services import BIN, RayHead, RayNode, short_tempdir

pytestmark = pytest.mark.slow

SPACE = ("family: sisr\nparameters:\n  prune_ratio: {type: float, low: 0.3, high: 0.6, default: 0.5}\n"
         "fixed: {grow_steps: 600, prune_steps: 100, finetune_steps: 100, batch_size: 4, block_shape: 4x4, "
         "lr: 1.0e-3}\n")


def _config(name: str, services, head: RayHead) -> str:
    return (f"name: {name}\nfamily: sisr\ntasks: [x2]\narch: {{width: 16, depth: 2, lr_patch: 16}}\n"
            f"data: {{eval_limit: 1}}\nsearch_space: space.yaml\nbudget: {{trials_per_stage: 3, parallel_trials: 2}}\n"
            f"tracking: {{uri: '{services.mlflow.uri}'}}\noptuna_storage: '{services.postgres.url('optuna_nodes')}'\n"
            f"ray: {{address: '{head.address}', gpus_per_trial: 1, device: auto, max_retries: 1}}\n")


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tempdir("pngrow-nl-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _trials(client: MlflowClient, search_id: str | None = None) -> list:
    experiment = client.get_experiment_by_name("pngrow")
    if experiment is None:
        return []
    query = "tags.`pngrow.kind` = 'trial'" + (f" and tags.`pngrow.search_id` = '{search_id}'" if search_id else "")
    return client.search_runs([experiment.experiment_id], query, max_results=1000)


def _training_on(client: MlflowClient, nodes: dict[str, RayNode], before: set[str], driver: subprocess.Popen,
                 timeout: float = 240) -> tuple[str, str]:
    """(run id, node id) of this search's first trial seen training on a worker node."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the search ended before any trial trained on a worker node"
        for run in _trials(client):
            node = run.data.tags.get("pngrow.ray_node")
            if run.info.run_id not in before and node in nodes and any(k.startswith("train/") for k in run.data.metrics):
                return run.info.run_id, node
        time.sleep(0.5)
    raise AssertionError("no trial started training on a worker node")


def _kill_raylet(node: RayNode) -> None:
    """SIGKILL the node's raylet, as a machine losing its Ray daemon would."""
    children = psutil.Process(node.process.pid).children(recursive=True)  # type: ignore[union-attr]
    (raylet,) = [p for p in children if p.name() == "raylet"]
    os.kill(raylet.pid, signal.SIGKILL)


def test_killing_a_worker_nodes_raylet_mid_stage_loses_only_its_trial(services, gpu_cluster, root: Path) -> None:
    head, nodes, gpu_nodes = gpu_cluster.head, gpu_cluster.nodes, gpu_cluster.gpu_nodes
    client = MlflowClient(services.mlflow.uri)
    (root / "space.yaml").write_text(SPACE)
    (root / "search.yaml").write_text(_config("node-loss", services, head))
    before = {run.info.run_id for run in _trials(client)}
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **services.s3.env(), **head.env()}
    with open(root / "driver.log", "w") as log:
        driver = subprocess.Popen([str(BIN / "pngrow"), "search", "search.yaml", "--quiet"], cwd=root, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        by_node = _node_processes(nodes)
        assert set(by_node) == gpu_nodes
        victim_run, victim_node = _training_on(client, by_node, before, driver)
        first_pid = client.get_run(victim_run).data.tags["pngrow.worker_pid"]
        _kill_raylet(by_node[victim_node])
        killed_at = time.monotonic()
        assert driver.wait(600) == 0, (root / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    recovered_in = time.monotonic() - killed_at
    search_id = client.get_run(victim_run).data.tags["pngrow.search_id"]
    trials = _trials(client, search_id)
    assert len(trials) == 3 and all(t.info.status in {"FINISHED", "FAILED"} for t in trials)  # none left RUNNING
    # Ray reran the victim (max_retries: 1) on the surviving node, in another worker process: its run holds
    # both attempts' training curves, the first cut off, the second whole.
    victim = client.get_run(victim_run)
    assert victim.info.status == "FINISHED", victim.data.tags.get("pngrow.error")
    assert victim.data.tags["pngrow.ray_node"] != victim_node
    assert victim.data.tags["pngrow.worker_pid"] != first_pid
    steps = [m.step for m in client.get_metric_history(victim_run, "train/l1")]
    assert len(steps) > len(set(steps)) and steps.count(min(steps)) == 2, steps
    others = [t for t in trials if t.info.run_id != victim_run]
    assert all(t.info.status == "FINISHED" and t.data.tags["pngrow.ray_node"] != victim_node for t in others)
    assert all(t.info.artifact_uri.startswith("s3://") for t in trials)  # checkpoints only through S3
    search = client.get_run(search_id)
    assert search.info.status == "FINISHED"
    chosen = client.get_run(client.search_runs(
        [search.info.experiment_id], f"tags.`pngrow.search_id` = '{search_id}' and tags.`pngrow.kind` = 'stage'"
    )[0].data.tags["pngrow.chosen_trial_run"])
    assert chosen.info.status == "FINISHED"
    print(f"victim trial {victim.info.status}; search finished {recovered_in:.0f} s after the kill")


def _node_processes(nodes: list[RayNode]) -> dict[str, RayNode]:
    """Each worker node by its Ray node id (its raylet's ``--node_id`` argument)."""
    ids: dict[str, RayNode] = {}
    for node in nodes:
        children = psutil.Process(node.process.pid).children(recursive=True)  # type: ignore[union-attr]
        (raylet,) = [p for p in children if p.name() == "raylet"]
        (arg,) = [a for a in raylet.cmdline() if a.startswith("--node_id=")]
        ids[arg.split("=", 1)[1]] = node
    return ids
