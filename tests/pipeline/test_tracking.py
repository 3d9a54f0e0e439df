from __future__ import annotations

import os
from dataclasses import replace

import mlflow
import pytest

from pngrow.pipeline import names
from pngrow.pipeline.names import Kind
from pngrow.pipeline.tracking import Tracking, metric_key, tag_filter, using
from pngrow.pipeline.records import TrialOutcome


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


def test_a_trial_outcome_reads_back_as_its_trial_logged_it(tmp_path) -> None:
    tracking = Tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", "pngrow", (tmp_path / "artifacts").as_uri())
    run_id = tracking.start_run("x2 trial 0", {names.KIND: Kind.TRIAL, names.TASK: "x2"})
    outcome = TrialOutcome(run_id=run_id, task="x2", metrics={"psnr": 31.25, "ms_ssim": 0.95}, density=0.4,
                           active_params=1234, macs=5_600_000_000, stored_params=2000, fingerprint="f1ng3r",
                           train_started=10.0, train_ended=12.5, trial_seconds=3.0)
    assert not TrialOutcome.recorded(tracking.run(run_id))
    with pytest.raises(ValueError, match="holds no trial outcome"):
        TrialOutcome.from_run(tracking.run(run_id))
    outcome.record(tracking)
    run = tracking.run(run_id)
    assert TrialOutcome.from_run(run) == replace(outcome, train_started=0.0, train_ended=0.0)
    assert run.data.metrics["eval/psnr"] == 31.25 and run.data.metrics["train_seconds"] == 2.5
    assert run.data.tags["pngrow.fingerprint"] == "f1ng3r" and run.data.tags["pngrow.kind"] == "trial"
    assert [r.info.run_id for r in tracking.runs(tag_filter(names.TASK, "x2"))] == [run_id]


def test_tags_must_be_named_from_names(tmp_path) -> None:
    tracking = Tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", "pngrow")
    with pytest.raises(ValueError, match="'kind' is not a pngrow tag name"):
        tracking.start_run("search", {"kind": "search"})
