from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.services import MlflowServer, Postgres, RayHead, RayNode, SeaweedS3, cluster_nodes, short_tempdir


@dataclass
class Services:
    postgres: Postgres
    s3: SeaweedS3
    mlflow: MlflowServer
    ray: RayHead

    def env(self) -> dict[str, str]:
        """What a driver needs: S3 credentials and endpoint, and the Ray head's token."""
        return {**self.s3.env(), **self.ray.env()}


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    root = short_tempdir("pngrow-svc-")
    started: list = []
    try:
        postgres = Postgres(root / "pg")
        postgres.root.mkdir()
        # each test's Optuna studies kept apart
        postgres.start(["mlflow", "optuna", "optuna_faults", "optuna_nodes", "optuna_jobs"])
        started.append(postgres)
        s3 = SeaweedS3(root / "s3", bucket="pngrow")
        s3.root.mkdir()
        s3.start()
        started.append(s3)
        mlflow = MlflowServer(root, postgres.url("mlflow"), "s3://pngrow/mlflow", s3.env())
        mlflow.start()
        started.append(mlflow)
        ray = RayHead(root / "ray")
        ray.root.mkdir()
        ray.start()
        started.append(ray)
        yield Services(postgres, s3, mlflow, ray)
    finally:
        _stop_together(started)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def joined_ray() -> Iterator[None]:
    """This process joined to one in-process Ray for a module's in-process searches. A process already connected to
    Ray keeps its connection (:class:`pngrow.pipeline.cluster.Cluster`), so each search skips starting Ray and its
    trial workers' imports. The tests of the embedded default (which starts its own Ray) do without it."""
    import ray

    with pytest.MonkeyPatch.context() as patch:  # Ray's workers inherit this process's environment
        for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
            patch.delenv(name, raising=False)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@dataclass
class GpuCluster:
    """A Ray head with one CPU and two worker nodes of one CPU and one (logical) GPU each, as separate processes."""

    root: Path
    head: RayHead
    nodes: list[RayNode]
    gpu_nodes: set[str]  # the worker nodes' Ray node ids


@pytest.fixture(scope="session")
def _gpu_cluster_session() -> Iterator[GpuCluster]:
    root = short_tempdir("pngrow-gpu-")
    head = RayHead(root / "ray", num_cpus=1)
    head.root.mkdir()
    nodes = [RayNode(head, root / f"node{i}.log", num_cpus=1, num_gpus=1) for i in range(2)]
    try:
        head.start()
        for node in nodes:
            node.start()
        gpu_nodes = {node_id for node_id, resources in cluster_nodes(head, 3).items() if resources.get("GPU")}
        assert len(gpu_nodes) == 2
        yield GpuCluster(root, head, nodes, gpu_nodes)
    finally:
        _stop_together([*nodes, head])
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def gpu_cluster(_gpu_cluster_session: GpuCluster) -> GpuCluster:
    """The session's GPU cluster, started once, with any worker node an earlier test killed started again."""
    cluster = _gpu_cluster_session
    lost = [node for node in cluster.nodes if not _raylet_runs(node)]
    for node in lost:
        node.stop()
        node.start()
    if lost:
        cluster.gpu_nodes = {node_id for node_id, resources in cluster_nodes(cluster.head, 3).items()
                             if resources.get("GPU")}
    return cluster


def _raylet_runs(node: RayNode) -> bool:
    """Whether the node's ``ray start`` process still runs its raylet (a test may have killed it)."""
    import psutil

    if node.process is None or node.process.poll() is not None:
        return False
    return any(child.name() == "raylet" for child in psutil.Process(node.process.pid).children(recursive=True))


def _stop_together(services: list) -> None:
    """Stop each service (by its PID) at the same time: a Ray node or head can take seconds to end."""
    with ThreadPoolExecutor(max(1, len(services))) as pool:
        list(pool.map(lambda service: service.stop(), services))
