from __future__ import annotations

import os

import mlflow
import pytest

from pngrow.pipeline.tracking import metric_key, using


def test_using_leaves_mlflow_exactly_as_it_found_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with using(f"sqlite:///{tmp_path / 'a.db'}"):
        assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == f"sqlite:///{tmp_path / 'a.db'}"
        assert os.environ["MLFLOW_TRACKING_URI"].endswith("a.db")
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ


def test_metric_keys_are_what_mlflow_accepts() -> None:
    assert metric_key("final", "q4", "psnr") == "final/q4/psnr"
    assert metric_key("drift", "lambda=0.013") == "drift/lambda_0.013"
