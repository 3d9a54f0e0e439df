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


def test_a_paired_sisr_run_serves_tasks_that_neither_compute_nor_read_the_released_inner_channels(tmp_path) -> None:
    from pngrow.pipeline.cli import main

    out = tmp_path / "paired"
    assert main(["run", "--family", "sisr", "--tasks", "x2,x3", "--arch", "width=16", "--arch", "depth=2", "--arch",
                 "lr_patch=8", "--out", str(out), *ACTIVE, "--paired"]) == 0
    fast = load_shared_model(str(out), progress=False)
    masked = load_shared_model(str(out), progress=False, compacted=False)
    assert fast.network.shared.channel_pairs == (("body.0.conv1", "body.0.conv2"), ("body.1.conv1", "body.1.conv2"))
    image = skimage.data.astronaut()[:40, :52]
    for task in ("x2", "x3"):
        ours, reference = fast.upscale(image, task), masked.upscale(image, task)
        assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1
        plans = {plan.layer: plan for plan in fast.network.compact(task).plans}
        for block in ("body.0", "body.1"):  # each residual block computes 8 of its 16 inner channels, and reads 8
            assert plans[f"{block}.conv1"].outputs == (8, 16) and plans[f"{block}.conv2"].inputs == (8, 16), task
            assert plans[f"{block}.conv2"].outputs == (16, 16)  # the residual stream keeps every channel


def test_a_paired_nic_run_is_refused_in_one_line(capsys) -> None:
    from pngrow.pipeline.cli import main

    assert main(["run", "--family", "nic", "--tasks", "q2", "--arch", "N=8", "--arch", "M=8", "--arch", "patch=64",
                 *ACTIVE, "--paired"]) == 2
    assert "task 'q2' is paired, but this ScaleHyperprior declares no channel pairs" in capsys.readouterr().err


def test_codec_bitstreams_of_the_compacted_model_decode_with_either(models) -> None:
    fast = load_shared_model(str(models["nic"]), progress=False)
    masked = load_shared_model(str(models["nic"]), progress=False, compacted=False)
    image = skimage.data.chelsea()[:64, :96]
    for task in ("q2", "q5"):
        expected = masked.decompress(masked.compress(image, task)).astype(int)
        for coder in (fast, masked):  # each model's bitstream decodes with both, to the same pixels
            data = coder.compress(image, task)
            for decoder in (fast, masked):
                assert np.abs(decoder.decompress(data).astype(int) - expected).max() <= 1, (coder, decoder)
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
