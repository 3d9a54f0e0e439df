"""`pngrow grow` into a promoted model: the new version serves the new task, and every earlier task is unchanged
bit for bit (old bitstreams decode to the same pixels, old scales upscale to the same pixels)."""

from __future__ import annotations

import struct
from pathlib import Path

import mlflow
import numpy as np
import pytest
import skimage.data

from pngrow import load_shared_model
from pngrow.pipeline.cli import main
from pngrow.workers.restoration import MAGIC

pytestmark = pytest.mark.slow


def _body(bitstream: bytes) -> bytes:
    """The coded tiles of a pngrow bitstream, after its header."""
    (size,) = struct.unpack_from("<I", bitstream, len(MAGIC))
    return bitstream[len(MAGIC) + 4 + size :]

CASES = {
    "sisr": (["x2", "x3"], "x4", "arch: {width: 8, depth: 2, lr_patch: 12}"),
    "nic": (["q6", "q4"], "q2", "arch: {N: 16, M: 16, patch: 64}"),
}


def _write_config(folder: Path, family: str) -> Path:
    tasks, _, arch = CASES[family]
    (folder / "space.yaml").write_text(
        f"family: {family}\nparameters:\n  prune_ratio: {{type: float, low: 0.3, high: 0.6, default: 0.5}}\n"
        "fixed: {grow_steps: 12, prune_steps: 4, finetune_steps: 4, batch_size: 2}\n"
    )
    config = folder / "search.yaml"
    config.write_text(
        f"name: {family}-small\nfamily: {family}\ntasks: [{', '.join(tasks)}]\n{arch}\n"
        f"data: {{eval_limit: 1}}\nsearch_space: {folder / 'space.yaml'}\n"
        "budget: {trials_per_stage: 2, parallel_trials: 2}\n"
    )
    return config


@pytest.mark.parametrize("family", sorted(CASES))
def test_grow_keeps_every_earlier_task_bit_identical(family: str, joined_ray, tmp_path: Path, monkeypatch,
                                                     capsys) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    old_tasks, new_task, _ = CASES[family]
    config = _write_config(tmp_path, family)
    assert main(["search", str(config), "--quiet"]) == 0
    assert main(["promote", f"{family}-small", "--name", "shared"]) == 0
    uri = f"sqlite:///{tmp_path / 'pngrow-runs' / 'mlflow.db'}"
    image = skimage.data.astronaut()[150:214, 180:250]

    v1 = load_shared_model("models:/shared@champion", uri)
    assert v1.version == "models:/shared/1"
    if family == "nic":
        before = {t: v1.compress(image, t) for t in old_tasks}
        decoded = {t: v1.decompress(data) for t, data in before.items()}
    else:
        before = {t: v1.upscale(image, t) for t in old_tasks}

    capsys.readouterr()
    assert main(["grow", "--from", "models:/shared@champion", "--task", new_task, "--config", str(config),
                 "--alias", "champion", "--quiet"]) == 0
    assert "registered shared version 2" in capsys.readouterr().out

    v2 = load_shared_model("models:/shared@champion", uri)
    assert v2.version == "models:/shared/2" and v2.tasks == [*old_tasks, new_task]
    for task in old_tasks:
        if family == "nic":
            assert np.array_equal(v2.decompress(before[task]), decoded[task])  # old bitstreams, new version
            assert _body(v2.compress(image, task)) == _body(before[task])  # same coded bits; the header names v2
        else:
            assert np.array_equal(v2.upscale(image, task), before[task])
    assert v2.restore(image, new_task).shape[2] == 3

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("shared", "2")
    assert version.tags["pngrow.grown_from_model"] == "models:/shared/1"
    assert version.tags["pngrow.tasks"] == ",".join([*old_tasks, new_task])
    grow_run = client.get_run(version.run_id)
    base = client.search_runs([grow_run.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{grow_run.info.run_id}' and tags.`pngrow.kind` = 'base'")
    assert len(base) == 1
    assert base[0].data.tags["pngrow.source_run"] == client.get_model_version("shared", "1").run_id
    stage = client.search_runs([grow_run.info.experiment_id],
                               f"tags.`mlflow.parentRunId` = '{grow_run.info.run_id}' and tags.`pngrow.kind` = 'stage'")
    assert [s.data.tags["pngrow.grown_from_run"] for s in stage] == [base[0].info.run_id]
    assert stage[0].data.tags["pngrow.task_order"] == ",".join([*old_tasks, new_task])
    artifacts = {a.path for a in client.list_artifacts(grow_run.info.run_id, "report")}
    assert {"report/sharing.png", "report/quality_cost.png", f"report/pareto_{new_task}.png"} <= artifacts
