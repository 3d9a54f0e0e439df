from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pngrow.pipeline.cli import _Run, main
from pngrow.workers.models import get_family
from pngrow.workers.png import load_shared
from pngrow.workers.settings import native_precision

TINY_SISR = ["run", "--tasks", "x2,x3", "--arch", "width=8", "--arch", "depth=1", "--arch", "lr_patch=8",
             "--grow-steps", "2", "--prune-steps", "2", "--finetune-steps", "1", "--batch-size", "2", "--quiet"]


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_run_writes_the_output_contract_and_the_model(image_folder: Path, tmp_path: Path, capsys) -> None:
    out, report = tmp_path / "model", tmp_path / "report.json"
    args = [*TINY_SISR, "--block-shape", "4x4,2x2", "--prune", "0.5,0.25", "--data", str(image_folder),
            "--eval-data", str(image_folder), "--json", str(report), "--out", str(out)]
    assert main(args) == 0
    data = json.loads(report.read_text())
    assert [t["name"] for t in data["tasks"]] == ["x2", "x3"]
    for task in data["tasks"]:
        assert {"name", "metrics", "density", "active_params", "macs"} <= set(task)
        assert "psnr" in task["metrics"]
    assert data["tasks"][1]["block_shape"] == [2, 2] and data["tasks"][1]["prune_ratio"] == 0.25
    assert {t["precision"] for t in data["tasks"]} == {"float32"}  # SISR's default, whatever the CPU
    assert data["stored_params"] == data["model"]["stored_params"] < data["independent_params"]
    table = capsys.readouterr().out
    assert "x3" in table and "separate dense models" in table
    shared = load_shared(out, lambda arch: get_family(arch["family"], arch["tasks"], width=arch["width"],
                                                          depth=arch["depth"]).build_model())
    assert shared.task_names == ["x2", "x3"]
    assert shared("x3", torch.zeros(1, 3, 4, 4)).shape == (1, 3, 12, 12)


def test_growth_and_prune_events_reach_every_tasks_settings() -> None:
    parser = argparse.ArgumentParser()
    _Run().add_arguments(parser)
    family = get_family("sisr", ["x2", "x3"], width=8, depth=1)
    chosen = _Run._settings(parser.parse_args(["--grow-from", "zero", "--prune-events", "3"]), family)
    assert {(s.grow_from, s.prune_events) for s in chosen} == {("zero", 3)}
    default = _Run._settings(parser.parse_args([]), family)
    assert {(s.grow_from, s.prune_events) for s in default} == {("fresh", 10)}


def test_run_nic_reports_bpp(image_folder: Path, tmp_path: Path) -> None:
    report = tmp_path / "nic.json"
    args = ["run", "--family", "nic", "--tasks", "q5,q1", "--arch", "N=8", "--arch", "M=8", "--arch", "patch=64",
            "--grow-steps", "2", "--prune-steps", "1", "--finetune-steps", "1", "--batch-size", "2", "--quiet",
            "--data", str(image_folder), "--eval-data", str(image_folder), "--json", str(report)]
    assert main(args) == 0
    tasks = json.loads(report.read_text())["tasks"]
    assert [t["name"] for t in tasks] == ["q5", "q1"] and all(t["metrics"]["bpp"] > 0 for t in tasks)
    # NIC's default precision is native: bfloat16 where this CPU computes it in hardware (its flags), else float32.
    with open("/proc/cpuinfo") as cpuinfo:
        native = any(flag in cpuinfo.read().split() for flag in ("avx512_bf16", "amx_bf16"))
    assert {t["precision"] for t in tasks} == {"bfloat16" if native else "float32"}
    assert main([*args, "--precision", "float32"]) == 0
    assert {t["precision"] for t in json.loads(report.read_text())["tasks"]} == {"float32"}


def test_the_nic_job_trains_in_its_families_fast_settings_by_default() -> None:
    """NIC's default job trains in NHWC at the device's native precision (1.89x the steps per second of float32 on
    an AVX-512 BF16 CPU); SISR's stays float32 and NCHW, where neither has been measured."""
    parser = argparse.ArgumentParser()
    _Run().add_arguments(parser)
    nic = _Run._settings(parser.parse_args([]), get_family("nic", ["q2", "q4"]))
    assert {(s.precision, s.channels_last) for s in nic} == {(native_precision("cpu"), True)}
    forced = _Run._settings(parser.parse_args(["--precision", "float32"]), get_family("nic", ["q2"]))
    assert [(s.precision, s.channels_last) for s in forced] == [("float32", True)]
    sisr = _Run._settings(parser.parse_args([]), get_family("sisr", ["x2"], width=8, depth=1))
    assert [(s.precision, s.channels_last) for s in sisr] == [("float32", False)]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--family", "jpeg"], "unknown family 'jpeg'"),
        (["--block-shape", "4by4"], "block shape '4by4'"),
        (["--block-shape", "4x4,2x2,1x1"], "--block-shape '4x4,2x2,1x1' gives 3 values for 2 tasks"),
        (["--prune", "1.5"], "prune ratio 1.5"),
        (["--prune", "half"], "--prune 'half' is not a number"),
        (["--tasks", "x2,x5"], "SISR task 'x5'"),
        (["--arch", "depth"], "--arch 'depth' is not KEY=VALUE"),
        (["--data", "/no/such/folder"], "image folder '/no/such/folder' does not exist"),
        (["--eval-limit", "0"], "--eval-limit 0"),
        (["--grow-from", "seeds"], "grow_from 'seeds' is not one of fresh, released, zero"),
        (["--prune-events", "0"], "prune_events 0 must be a whole number, at least 1"),
    ],
)
def test_bad_input_is_one_line_naming_the_value(extra: list[str], message: str, capsys) -> None:
    assert main([*TINY_SISR, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pngrow: error: ") and message in err and "\n" not in err


def test_bad_nic_options_are_named(capsys) -> None:
    assert main(["run", "--family", "nic", "--arch", "patch=100"]) == 2
    assert "NIC patch 100 is not a multiple of 64" in capsys.readouterr().err
    assert main(["run", "--family", "nic", "--arch", "width=8"]) == 2
    assert "unknown nic architecture option 'width'" in capsys.readouterr().err


def test_task_one_starts_from_loaded_dense_weights(image_folder: Path, tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    family = get_family("sisr", ["x2", "x3"], width=8, depth=1)
    torch.manual_seed(3)
    dense = family.build_model().state_dict()
    save_file(dense, str(tmp_path / "dense.safetensors"))
    out = tmp_path / "model"
    args = [*TINY_SISR, "--grow-steps", "0", "--prune-steps", "0", "--finetune-steps", "0", "--data", str(image_folder),
            "--eval-data", str(image_folder), "--init", str(tmp_path / "dense.safetensors"), "--out", str(out)]
    assert main(args) == 0
    shared = load_shared(out, lambda arch: get_family("sisr", arch["tasks"], width=8, depth=1).build_model())
    head = shared.layers["head"]
    owned = head.to_weight(head.owner == 0).expand_as(head.weight)
    assert owned.any() and torch.equal(head.weight[owned], dense["head.weight"][owned])
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    assert main([*TINY_SISR, "--init", str(tmp_path / "bad.safetensors")]) == 2
    assert "is not a safetensors file" in capsys.readouterr().err
    save_file({"nope": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    assert main([*TINY_SISR, "--data", str(image_folder), "--init", str(tmp_path / "other.safetensors")]) == 2
    assert "do not fit the sisr model" in capsys.readouterr().err


def test_unreadable_image_is_named(tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG truncated")
    assert main([*TINY_SISR, "--data", str(tmp_path)]) == 2
    assert "bad.png" in capsys.readouterr().err


def test_a_defect_is_one_line_and_debug_shows_its_traceback(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import pngrow.workers.models as models

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return {}["width"]  # a KeyError from a bug is not a user's error

    monkeypatch.setattr(models, "get_family", broken)
    assert main(TINY_SISR) == 1
    err = capsys.readouterr().err
    assert err.startswith("pngrow: error: KeyError: 'width'") and "--debug" in err and err.count("\n") == 1
    for argv in (["--debug", *TINY_SISR], [*TINY_SISR, "--debug"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "in broken" in err
        assert err.strip().splitlines()[-1].startswith("pngrow: error: KeyError: 'width'")


def test_user_errors_show_their_traceback_only_with_debug(capsys) -> None:
    assert main(["--debug", *TINY_SISR, "--prune", "half"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "pngrow: error: --prune 'half' is not a number"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_device_is_named(capsys) -> None:
    assert main([*TINY_SISR, "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "pngrow: error: device 'cuda' is not available: this machine has no CUDA device\n"
    assert main([*TINY_SISR, "--device", "gpu"]) == 2
    assert "device 'gpu' is not a torch device" in capsys.readouterr().err
