"""What users deploy is the fast one: the API restores through each task's compacted model, built once per task,
checked against the masked model, and refusing to serve when they differ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch

from pngrow import load_shared_model
from tests.tiny_models import tiny_models
from pngrow.workers.png import CompactionMismatch, CompactNetwork

ACTIVE = ["--grow-steps", "6", "--prune-steps", "4", "--finetune-steps", "2", "--batch-size", "2", "--eval-limit", "1",
          "--quiet", "--block-shape", "4x1024", "--prune-scope", "active"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return tiny_models(tmp_path_factory.mktemp("models"), nic_tasks="q2,q5", sisr_width=16, extra=ACTIVE)


def test_upscaling_runs_the_compacted_later_task_and_matches_the_masked_model(models) -> None:
    fast = load_shared_model(str(models["sisr"]), progress=False)
    masked = load_shared_model(str(models["sisr"]), progress=False, compacted=False)
    assert isinstance(fast.network, CompactNetwork) and fast.network is fast.network
    image = skimage.data.astronaut()[:40, :52]
    for task in ("x2", "x3"):
        ours, reference = fast.upscale(image, task), masked.upscale(image, task)
        assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1
    # x3 grew after x2 and reuses some of its blocks; with the active scope it still computes only half the rows.
    plans = fast.network.compact("x3").plans
    assert all(computed < total for computed, total in (p.outputs for p in plans[:-1]))
    assert fast.network.compact("x3") is fast.network.compact("x3")  # built once


def test_codec_bitstreams_of_the_compacted_model_decode_with_either(models) -> None:
    fast = load_shared_model(str(models["nic"]), progress=False)
    masked = load_shared_model(str(models["nic"]), progress=False, compacted=False)
    image = skimage.data.chelsea()[:64, :96]
    for task in ("q2", "q5"):
        data = fast.compress(image, task)
        ours = fast.decompress(data)
        assert np.abs(ours.astype(int) - masked.decompress(data).astype(int)).max() <= 1
        assert fast.network.compact(task).plans[0].outputs[0] < fast.network.compact(task).plans[0].outputs[1]


def test_a_compacted_task_that_differs_from_the_masked_model_is_never_served(models, monkeypatch) -> None:
    import pngrow.workers.png._compact as compact_module

    real = compact_module.compact_task

    def broken(shared, task, *args, **kwargs):  # noqa: ANN001, ANN202 - a defect in compaction
        model = real(shared, task, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).add_(0.5)
        return model

    monkeypatch.setattr(compact_module, "compact_task", broken)
    fast = load_shared_model(str(models["sisr"]), progress=False)
    with pytest.raises(CompactionMismatch, match="compacted task 'x2' differs from the masked model by"):
        fast.upscale(skimage.data.astronaut()[:16, :16], "x2")
