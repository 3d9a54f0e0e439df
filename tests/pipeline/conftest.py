from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Iterator

import pytest

from tests.services import MlflowServer, Postgres, RayHead, SeaweedS3, short_tempdir


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
        for service in reversed(started):
            service.stop()
        shutil.rmtree(root, ignore_errors=True)
