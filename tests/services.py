"""Real services on 127.0.0.1 for the slow tests: the launchers the benchmarks own (:mod:`bench.local_services`:
PostgreSQL, SeaweedFS S3, an MLflow server, a Ray head and nodes), re-used here. Tests may import ``bench``;
``bench`` never imports the tests."""

from __future__ import annotations

from bench.local_services import (BIN, MlflowServer, Postgres, RayHead, RayNode, SeaweedS3, cluster_nodes, free_ports,
                                  short_tempdir)

__all__ = ["BIN", "MlflowServer", "Postgres", "RayHead", "RayNode", "SeaweedS3", "cluster_nodes", "free_ports",
           "short_tempdir"]
