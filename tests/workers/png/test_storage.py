from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pngrow.workers.png import CheckpointError, load_shared, save_shared
from tests.conftest import ToyNet, train_task


def _trained(toy):
    train_task(toy, "a", (4, 4), 0.5)
    train_task(toy, "b", (2, 2), 0.5)
    return toy


def test_save_and_load_round_trip_exactly(toy, toy_input, tmp_path: Path) -> None:
    shared = _trained(toy)
    with torch.no_grad():
        expected = {t: shared(t, toy_input).clone() for t in shared.task_names}
    save_shared(shared, tmp_path, {"model": "toy"})
    loaded = load_shared(tmp_path, lambda arch: ToyNet())
    loaded.eval()
    with torch.no_grad():
        for task, output in expected.items():
            assert torch.equal(loaded(task, toy_input), output)
    for a, b in zip(shared.shared_layers(), loaded.shared_layers()):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.owner, b.owner)


def test_description_is_json_and_weights_are_safetensors(toy, tmp_path: Path) -> None:
    save_shared(_trained(toy), tmp_path, {"model": "toy", "width": 3})
    description = json.loads((tmp_path / "model.json").read_text())
    assert description["format"] == "pngrow.shared/1"
    assert description["architecture"] == {"model": "toy", "width": 3}
    assert description["tasks"] == [
        {"name": "a", "block_shape": [4, 4], "reuse": "learned", "paired": False},
        {"name": "b", "block_shape": [2, 2], "reuse": "learned", "paired": False},
    ]
    assert description["channel_pairs"] == []
    assert len(description["sha256"]) == 64
    tensors = load_file(str(tmp_path / "weights.safetensors"))
    assert tensors["task/b/grouped/kept"].dtype == torch.uint8
    assert "head/heads.a.weight" in tensors and "task/a/local/norm.running_var" in tensors


def test_corrupted_weights_are_refused_by_name(toy, tmp_path: Path) -> None:
    save_shared(_trained(toy), tmp_path, {})
    weights = tmp_path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="weights.safetensors does not match the checksum"):
        load_shared(tmp_path, lambda arch: ToyNet())


def test_missing_or_foreign_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a pngrow model folder"):
        load_shared(tmp_path, lambda arch: ToyNet())
    (tmp_path / "model.json").write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="is not a pngrow.shared/1 description"):
        load_shared(tmp_path, lambda arch: ToyNet())


def test_a_task_in_progress_is_not_saved(toy, tmp_path: Path) -> None:
    toy.begin_task("a")
    with pytest.raises(RuntimeError, match="commit it before saving"):
        save_shared(toy, tmp_path, {})


class _Payload:
    """Unpickling this would create a file: the proof that a loader ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path(self.marker).touch, ())


def test_a_planted_pickle_is_refused_and_never_run(toy, tmp_path: Path) -> None:
    import hashlib
    import pickle

    folder = save_shared(_trained(toy), tmp_path / "model", {})
    marker = tmp_path / "pwned"
    (folder / "weights.safetensors").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_shared(folder, lambda arch: ToyNet())
    # Even with the checksum forged to match, the loader reads safetensors only.
    description = json.loads((folder / "model.json").read_text())
    description["sha256"] = hashlib.sha256((folder / "weights.safetensors").read_bytes()).hexdigest()
    (folder / "model.json").write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match="weights.safetensors is not a safetensors file"):
        load_shared(folder, lambda arch: ToyNet())
    assert not marker.exists()


def test_masks_that_do_not_fit_the_layer_are_refused(toy, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_shared(_trained(toy), tmp_path, {})
    tensors = load_file(str(tmp_path / "weights.safetensors"))
    tensors["task/b/grouped/kept"] = torch.ones(1, 1, dtype=torch.uint8)
    save_file(tensors, str(tmp_path / "weights.safetensors"))
    description = json.loads((tmp_path / "model.json").read_text())
    import hashlib

    description["sha256"] = hashlib.sha256((tmp_path / "weights.safetensors").read_bytes()).hexdigest()
    (tmp_path / "model.json").write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match="task 'b''s masks are not of its"):
        load_shared(tmp_path, lambda arch: ToyNet())
