"""What each task costs and what the whole shared model stores, counted from the masks themselves."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ._shared import PRUNABLE_TYPES, SharedLayer, SharedNetwork, TaskRecord

__all__ = ["ModelCost", "TaskCost", "count_macs", "model_cost", "task_cost"]


@dataclass(frozen=True)
class TaskCost:
    """One task's cost: share of prunable weights it uses, parameters it touches, multiply-accumulates per input."""

    task: str
    density: float
    active_params: int
    macs: int
    dense_macs: int


@dataclass(frozen=True)
class ModelCost:
    """What the shared model stores against one dense model per task.

    ``stored_params`` counts every owned block's weights once plus every task's task-local parameters and head;
    ``mask_bits`` the per-block ownership and selection bits; ``stored_bytes`` both at float32.
    """

    stored_params: int
    mask_bits: int
    stored_bytes: int
    independent_params: int
    dense_params: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parameter_count(shared: SharedNetwork, task: str) -> tuple[int, int]:
    """(task-local parameters, head parameters) of one task."""
    params = dict(shared.model.named_parameters())
    local = sum(params[n].numel() for n in shared.local_names if n in params)
    prefixes = tuple(f"{h}.{task}." for h in shared.task_heads)
    head = sum(p.numel() for n, p in params.items() if n.startswith(prefixes))
    return local, head


def _uses_per_weight(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> int:
    """How many times each weight element is multiplied in one forward of ``module``."""
    if isinstance(module, nn.Linear):
        return inputs[0].numel() // module.in_features
    spatial_from = inputs[0] if getattr(module, "transposed", False) else output
    return int(spatial_from.shape[0]) * math.prod(spatial_from.shape[2:])


def count_macs(model: nn.Module, *inputs: Any, **kwargs: Any) -> int:
    """Multiply-accumulates of the Conv/ConvTranspose/Linear layers of any model in one forward on ``inputs``, each
    layer counted at its weight's full size (for a compacted model, what it really computes).

    >>> count_macs(nn.Conv2d(3, 8, 3, padding=1), torch.zeros(1, 3, 4, 4))
    3456
    """
    total = 0

    def add(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += module.weight.numel() * _uses_per_weight(module, inputs, output)

    handles = [m.register_forward_hook(add) for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
    try:
        with torch.no_grad():
            model(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return total


def task_cost(shared: SharedNetwork, task: str, *inputs: Any, **kwargs: Any) -> TaskCost:
    """Count ``task``'s density, active parameters and MACs for one forward on ``inputs``.

    MACs are those of Conv/ConvTranspose/Linear layers, counting only active blocks of shared layers.

    >>> net = SharedNetwork(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)))
    >>> net.begin_task("a", (4, 3)); net.prune(0.5); net.commit()
    >>> task_cost(net, "a", torch.zeros(1, 3, 4, 4)).macs
    1728
    """
    index = shared.task_index(task)
    record = shared.tasks[index]
    uses: dict[nn.Module, int] = {}
    handles = [
        m.register_forward_hook(lambda mod, i, o: uses.__setitem__(mod, uses.get(mod, 0) + _uses_per_weight(mod, i, o)))
        for m in shared.model.modules()
        if isinstance(m, PRUNABLE_TYPES)
    ]
    try:
        with torch.no_grad():
            shared(task, *inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    shared_modules = {shared.model.get_submodule(layer.name): layer for layer in shared.shared_layers()}
    active_total = prunable_total = macs = dense_macs = 0
    for layer in shared_modules.values():
        active = _active_plane(layer, index, record) * layer.kernel_numel
        active_total += active
        prunable_total += layer.weight.numel()
    for module, count in uses.items():
        layer = shared_modules.get(module)
        if layer is None:
            macs += module.weight.numel() * count
            dense_macs += module.weight.numel() * count
        else:
            macs += _active_plane(layer, index, record) * layer.kernel_numel * count
            dense_macs += layer.weight.numel() * count
    local, head = _parameter_count(shared, task)
    return TaskCost(task, active_total / prunable_total, active_total + local + head, macs, dense_macs)


def _active_plane(layer: SharedLayer, index: int, record: TaskRecord) -> int:
    """Active channel pairs of a committed task, or of the task in progress under its current selection."""
    if record.committed:
        return int(layer.active_plane(index, record.block_shape).sum())
    own = layer.own_plane(index, record.block_shape)
    earlier = (layer.owner >= 0) & layer.grid(record.block_shape).expand(
        (layer.scores.detach() > 0) if layer.scores is not None else layer.selected[index]
    )
    return int((own | earlier).sum())


def model_cost(shared: SharedNetwork) -> ModelCost:
    """Stored parameters and mask bits of the whole shared model, and the one-dense-model-per-task baseline."""
    layers = shared.shared_layers()
    owned = sum(int((layer.owner >= 0).sum()) * layer.kernel_numel for layer in layers)
    prunable = sum(layer.weight.numel() for layer in layers)
    stored = owned
    independent = 0
    mask_bits = 0
    dense_params = 0
    for index, task in enumerate(shared.tasks):
        local, head = _parameter_count(shared, task.name)
        stored += local + head
        dense = prunable + local + head
        independent += dense
        dense_params = dense_params or dense
        selection_bits = index > 0 and task.reuse == "learned"
        for layer in layers:
            mask_bits += layer.grid(task.block_shape).num_blocks * (2 if selection_bits else 1)
    return ModelCost(stored, mask_bits, 4 * stored + -(-mask_bits // 8), independent, dense_params)
