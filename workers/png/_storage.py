"""Save and load a shared network as safetensors plus a JSON description; nothing is ever unpickled."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._shared import SharedNetwork, TaskRecord, assign_tensor

__all__ = ["CheckpointError", "FORMAT", "checkpoint_tensors", "load_shared", "read_description", "save_shared"]

FORMAT = "pngrow.shared/1"
WEIGHTS_FILE = "weights.safetensors"
DESCRIPTION_FILE = "model.json"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, corrupted or not a pngrow shared model."""


def save_shared(shared: SharedNetwork, folder: str | Path, architecture: dict[str, Any]) -> Path:
    """Write ``folder/weights.safetensors`` and ``folder/model.json``; returns the folder.

    ``architecture`` is whatever the model factory given to :func:`load_shared` needs to rebuild the model
    (JSON-serialisable). Only committed tasks are saved.
    """
    if shared.task_in_progress is not None:
        raise RuntimeError(f"task {shared.task_in_progress.name!r} is in progress; commit it before saving")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights_path = folder / WEIGHTS_FILE
    save_file({k: v.detach().contiguous().cpu() for k, v in checkpoint_tensors(shared).items()}, str(weights_path))
    description = {
        "format": FORMAT,
        "architecture": architecture,
        "task_heads": list(shared.task_heads),
        "task_arg": shared.task_arg,
        "channel_pairs": [list(pair) for pair in shared.channel_pairs],
        "tasks": [{"name": t.name, "block_shape": list(t.block_shape), "reuse": t.reuse, "paired": t.paired}
                  for t in shared.tasks],
        "layers": [{"name": layer.name, "weight_shape": list(layer.weight.shape)} for layer in shared.shared_layers()],
        "sha256": _sha256(weights_path),
    }
    (folder / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return folder


def checkpoint_tensors(shared: SharedNetwork) -> dict[str, torch.Tensor]:
    """What :func:`save_shared` writes to ``weights.safetensors``, by key: every shared layer's dense weight, every
    task's block masks (one byte per block) and task-local state, and every other tensor of the model (the heads)."""
    tensors: dict[str, torch.Tensor] = {}
    for layer in shared.shared_layers():
        tensors[f"shared/{layer.name}/weight"] = layer.weight
        for index, task in enumerate(shared.tasks):
            kept, selected = layer.masks(index)
            tensors[f"task/{task.name}/{layer.name}/kept"] = kept.to(torch.uint8)
            tensors[f"task/{task.name}/{layer.name}/selected"] = selected.to(torch.uint8)
    for task in shared.tasks:
        for name, value in shared.local_tensors(task.name).items():
            tensors[f"task/{task.name}/local/{name}"] = value
    local = set(shared.local_names)
    for name, value in [*shared.model.named_parameters(), *shared.model.named_buffers()]:
        if name not in local:
            tensors[f"head/{name}"] = value.detach()
    return tensors


def read_description(folder: str | Path) -> dict[str, Any]:
    """The JSON description of a saved shared model, checked for format."""
    path = Path(folder) / DESCRIPTION_FILE
    try:
        description = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist: not a pngrow model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} description")
    return description


def load_shared(folder: str | Path, build_model: Callable[[dict[str, Any]], nn.Module],
                added: Sequence[str] = ()) -> SharedNetwork:
    """Rebuild a saved shared network; ``build_model(architecture)`` makes the untrained model. ``added`` names
    task-local tensors the model gained since it may have been saved: a task saved without one starts it at the
    built model's value.

    The weights file's SHA-256 must match the description's, so a corrupted or swapped file is refused.
    """
    folder = Path(folder)
    description = read_description(folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} does not exist")
    if _sha256(weights_path) != description["sha256"]:
        raise CheckpointError(f"{weights_path} does not match the checksum in {DESCRIPTION_FILE}: corrupted or replaced")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:  # never falls back to another format: nothing is unpickled
        raise CheckpointError(f"{weights_path} is not a safetensors file: {exc}") from None
    # Models saved before channel pairs existed have none, and no paired task.
    pairs = [tuple(pair) for pair in description.get("channel_pairs", [])]
    shared = SharedNetwork(build_model(description["architecture"]), description["task_heads"], description["task_arg"],
                           pairs)
    expected = [layer["name"] for layer in description["layers"]]
    if shared.layer_names != expected:
        raise CheckpointError(f"{folder}: the rebuilt model's shared layers differ from the saved ones")
    built = {name: tensor.detach() for name, tensor in shared.model.state_dict().items() if name in added}
    for name, value in tensors.items():
        if name.startswith("head/"):
            assign_tensor(shared.model, name[len("head/") :], value)
    for spec in description["tasks"]:
        task = TaskRecord(spec["name"], tuple(spec["block_shape"]), spec["reuse"], committed=True,
                          paired=bool(spec.get("paired", False)))
        prefix = f"task/{task.name}/local/"
        task.local_state = {name: value.clone() for name, value in built.items()}
        task.local_state.update({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        shared.tasks.append(task)
    try:
        for layer in shared.shared_layers():
            layer.weight.copy_(tensors[f"shared/{layer.name}/weight"])
            layer.restore_masks(shared.tasks, [(tensors[f"task/{t.name}/{layer.name}/kept"],
                                                tensors[f"task/{t.name}/{layer.name}/selected"]) for t in shared.tasks])
    except KeyError as exc:
        raise CheckpointError(f"{weights_path} lacks tensor {exc.args[0]!r}") from None
    except ValueError as exc:
        raise CheckpointError(f"{weights_path}: {exc}") from None
    return shared


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
