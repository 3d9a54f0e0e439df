"""The tiny example search, end to end, against real services: PostgreSQL, SeaweedFS S3, an MLflow server on them,
and a Ray head in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import optuna
import psycopg
import pytest
import skimage.data
import torch
import yaml
from mlflow import MlflowClient

from pngrow.pipeline.cli import main
from pngrow.pipeline.shared_model import _image_array
from pngrow.workers.data import default_images
from pngrow.workers.models import load_model

EXAMPLE = Path(__file__).parents[2] / "search_spaces" / "examples" / "tiny-sisr.yaml"
pytestmark = pytest.mark.slow


def _runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list:
    return client.search_runs([experiment_id], filter_string, max_results=1000)


def test_tiny_search_on_real_services(services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for key, value in services.env().items():
        monkeypatch.setenv(key, value)
    summary_file = tmp_path / "summary.json"
    # The driver is its own process, as a user runs it: a Ray driver process connects to one cluster only.
    args = [sys.executable, "-m", "pngrow", "search", str(EXAMPLE), "--tracking-uri", services.mlflow.uri,
            "--optuna-storage", services.postgres.url("optuna"), "--ray-address", services.ray.address,
            "--workdir", str(tmp_path / "w"), "--json", str(summary_file), "--quiet"]
    driver = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert driver.returncode == 0, driver.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    assert not (tmp_path / "w").exists(), "a search on services must not fall back to local files"

    # MLflow: one search run, a stage run per task, three trial runs per stage, with lineage.
    client = MlflowClient(tracking_uri=services.mlflow.uri, registry_uri=services.mlflow.uri)
    search = client.get_run(summary["search_id"])
    assert search.info.status == "FINISHED" and search.data.tags["pngrow.kind"] == "search"
    experiment = search.info.experiment_id
    stages = sorted(_runs(client, experiment, f"tags.`mlflow.parentRunId` = '{search.info.run_id}'"),
                    key=lambda r: int(r.data.tags["pngrow.stage_index"]))
    assert [s.data.tags["pngrow.task"] for s in stages] == ["x2", "x3"]
    assert [s.data.tags["pngrow.task_order"] for s in stages] == ["x2", "x2,x3"]
    assert stages[0].data.tags["pngrow.grown_from_run"] == ""
    assert stages[1].data.tags["pngrow.grown_from_run"] == stages[0].info.run_id
    trial_ids = set()
    evaluation = default_images("eval").limit(yaml.safe_load(EXAMPLE.read_text())["data"]["eval_limit"])
    for stage in stages:
        assert stage.info.status == "FINISHED" and stage.data.tags["pngrow.search_id"] == search.info.run_id
        trials = _runs(client, experiment, f"tags.`mlflow.parentRunId` = '{stage.info.run_id}'")
        assert len(trials) == 3 and all(t.info.status == "FINISHED" for t in trials)
        assert stage.data.tags["pngrow.chosen_trial_run"] in {t.info.run_id for t in trials}
        for trial in trials:
            trial_ids.add(trial.info.run_id)
            assert trial.data.tags["pngrow.kind"] == "trial"
            assert trial.data.tags["pngrow.grown_from_run"] == stage.data.tags["pngrow.grown_from_run"]
            assert {"prune_ratio", "block_shape", "lr", "grow_steps"} <= set(trial.data.params)
            history = client.get_metric_history(trial.info.run_id, "train/l1")
            assert len(history) >= 5 and all(np.isfinite(m.value) for m in history)
            assert "eval/psnr" in trial.data.metrics and 0 < trial.data.metrics["density"] <= 1
        # The stage's figure is its checkpoint's: evaluated again here, in this process, on the same images.
        family, shared = load_model(client.download_artifacts(stage.info.run_id, "checkpoint",
                                                              str(tmp_path / stage.info.run_id)))
        evaluated = family.evaluate(shared.eval(), stage.data.tags["pngrow.task"], evaluation)["psnr"]
        assert stage.data.metrics["eval/psnr"] == pytest.approx(evaluated, abs=1e-3)
        assert summary["stages"][stage_index(stage)]["metrics"]["psnr"] == pytest.approx(evaluated, abs=1e-3)
    for task in ("x2", "x3"):
        # trained, the model beats what it starts from (with the bicubic skip, an untrained one is bicubic)
        assert search.data.metrics[f"final/{task}/psnr"] > search.data.metrics[f"final/{task}/bicubic_psnr"]
        assert search.data.metrics[f"drift/{task}"] == 0.0

    # S3: every trial's and stage's checkpoint, and the pyfunc model, are in the bucket.
    keys = [o["Key"] for page in services.s3.client().get_paginator("list_objects_v2").paginate(Bucket="pngrow")
            for o in page.get("Contents", [])]
    for run_id in trial_ids | {s.info.run_id for s in stages}:
        assert any(run_id in k and k.endswith("checkpoint/weights.safetensors") for k in keys), run_id
        assert any(run_id in k and k.endswith("checkpoint/model.json") for k in keys), run_id
    assert any(k.endswith("MLmodel") for k in keys)
    for picture in ("sharing.png", "quality_cost.png", "pareto_x2.png", "pareto_x3.png"):
        assert any(search.info.run_id in k and k.endswith(f"report/{picture}") for k in keys), picture

    # Optuna: one study per stage in PostgreSQL, three complete trials each, two objectives.
    storage = services.postgres.url("optuna")
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert [s.data.tags["pngrow.optuna_study"] for s in stages] == sorted(names, key=lambda n: n.split("-")[2])
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
        assert all(len(t.values) == 2 and t.user_attrs["mlflow_run_id"] in trial_ids for t in study.trials)
    with psycopg.connect(storage) as conn:
        assert conn.execute("select count(*) from trials").fetchone()[0] == 6

    # No secret reaches MLflow: not in any run's params or tags, not in any text artifact, not in the output.
    secrets = [services.postgres.password, services.s3.secret_key]
    records = [json.dumps([r.data.params, r.data.tags]) for r in _runs(client, experiment, "")]
    for key in keys:
        if key.endswith((".json", ".yaml", "MLmodel", ".txt")):
            records.append(services.s3.client().get_object(Bucket="pngrow", Key=key)["Body"].read().decode())
    records.append(json.dumps(summary))
    records += [driver.stdout, driver.stderr]
    assert records and not [s for s in secrets for r in records if s in r]
    assert "postgresql://pngrow:***@" in search.data.params["optuna_storage"]

    # Status shows the finished search; promote registers it, and the alias loads a model that restores each task.
    assert main(["status", "--tracking-uri", services.mlflow.uri]) == 0
    status = capsys.readouterr().out
    assert search.info.run_id in status and "FINISHED" in status and "2/2 (x2,x3)" in status and "6/0/0" in status
    assert main(["promote", summary["search_id"], "--name", "tiny-sisr", "--tracking-uri", services.mlflow.uri]) == 0
    mlflow.set_tracking_uri(services.mlflow.uri)
    model = mlflow.pyfunc.load_model("models:/tiny-sisr@champion")
    family, shared = load_model(client.download_artifacts(stages[-1].info.run_id, "checkpoint", str(tmp_path)))
    image = skimage.data.astronaut()[100:148, 200:260]
    for task, scale in (("x2", 2), ("x3", 3)):
        out = model.predict({"task": task, "image": image})
        restored = _image_array(out["image"][0])
        assert restored.shape == (48 * scale, 60 * scale, 3)
        expected, _ = family.restore(shared, task, torch.from_numpy(image.copy()).permute(2, 0, 1))
        assert np.array_equal(restored, expected.permute(1, 2, 0).numpy())
    version = client.get_model_version_by_alias("tiny-sisr", "champion")
    assert version.tags["pngrow.search_id"] == search.info.run_id and version.tags["pngrow.tasks"] == "x2,x3"


def stage_index(run) -> int:
    return int(run.data.tags["pngrow.stage_index"])


@pytest.mark.parametrize("broken", ["mlflow", "postgres", "s3"])
def test_an_unreachable_service_is_named_before_anything_starts(services, tmp_path: Path, monkeypatch, capsys,
                                                                broken: str) -> None:
    from tests.services import free_ports

    for key, value in services.env().items():
        monkeypatch.setenv(key, value)
    tracking, storage = services.mlflow.uri, services.postgres.url("optuna")
    if broken == "mlflow":
        tracking = f"http://127.0.0.1:{free_ports(1)[0]}"
    elif broken == "postgres":
        storage = storage.replace(services.postgres.password, "wrong-password")
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    client = MlflowClient(services.mlflow.uri)
    searches_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()],
                                             "tags.`pngrow.kind` = 'search'"))
    args = ["search", str(EXAMPLE), "--tracking-uri", tracking, "--optuna-storage", storage, "--ray-address",
            services.ray.address, "--workdir", str(tmp_path / "w"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    expected = {"mlflow": f"MLflow tracking server '{tracking}' is unreachable",
                "postgres": "Optuna storage 'postgresql://pngrow:***@127.0.0.1",
                "s3": "MLflow artifact store 's3://pngrow/mlflow"}[broken]
    assert expected in err and err.count("\n") == 1, err
    assert "wrong-password" not in err and services.postgres.password not in err and "wrong-secret" not in err
    searches_after = len(client.search_runs([e.experiment_id for e in client.search_experiments()],
                                            "tags.`pngrow.kind` = 'search'"))
    assert searches_after == searches_before
