"""What each task costs and what the whole shared model stores, counted from the masks themselves."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ._shared import PRUNABLE_TYPES, SharedLayer, SharedNetwork, TaskRecord
from ._storage import checkpoint_tensors

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
    """What the shared model stores, against one dense model per task.

    * ``stored_params``: every owned block's weights once, plus every task's own tensors: its task-local parameters
      *and buffers* (biases, normalisation with its running statistics, entropy models with their CDF tables) and
      its head, a tensor bit-identical to an earlier task's of the same name counted once (a store keeps it once);
    * ``mask_bits``: one bit per block for the blocks each task kept, one more for the earlier blocks it selects
      when its selection is learned;
    * ``stored_bytes``: the ideal sparse store of all that (each tensor at its own dtype, the mask bits packed);
    * ``checkpoint_bytes``: the tensor data a checkpoint (:func:`save_shared`) really holds, larger: it keeps every
      shared weight dense (free positions too), one byte per block and mask, and every task's heads;
    * ``independent_params``: one dense model (all weights, task-local tensors, head) per task; ``dense_params``:
      the first task's.
    """

    stored_params: int
    mask_bits: int
    stored_bytes: int
    checkpoint_bytes: int
    independent_params: int
    dense_params: int

    def as_dict(self) -> dict[str, Any]:
        """The figures by name (JSON-serialisable)."""
        return asdict(self)


def _parameter_count(shared: SharedNetwork, task: str) -> int:
    """Parameters of one task's own parts (task-local and head); buffers are not parameters."""
    params = dict(shared.model.named_parameters())
    local = sum(params[n].numel() for n in shared.local_names if n in params)
    head = sum(params[n].numel() for n in shared.head_tensors(task) if n in params)
    return local + head


def _own_tensors(shared: SharedNetwork, task: str) -> dict[str, torch.Tensor]:
    """Every tensor stored for one task alone, by name: its task-local parameters and buffers, and its head's."""
    return {**shared.local_tensors(task), **shared.head_tensors(task)}


def _new_tensors(shared: SharedNetwork) -> dict[str, list[torch.Tensor]]:
    """Each task's own tensors that a store needs beside the earlier tasks': a task-local tensor bit-identical to an
    earlier task's of the same name (e.g. CompressAI's Gaussian-conditional CDF table, which depends only on its
    fixed scale table, the same for every rate) is stored once."""
    seen: dict[str, list[torch.Tensor]] = {}
    new: dict[str, list[torch.Tensor]] = {}
    for task in shared.tasks:
        new[task.name] = []
        for name, tensor in _own_tensors(shared, task.name).items():
            earlier = seen.setdefault(name, [])
            if not any(t.shape == tensor.shape and t.dtype == tensor.dtype and torch.equal(t, tensor) for t in earlier):
                new[task.name].append(tensor)
                earlier.append(tensor)
    return new


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

    MACs are those of Conv/ConvTranspose/Linear layers, counting only active blocks of shared layers and the non-zero
    weights of the others (a head the active pruning scope pruned).

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
        if layer is None:  # a head or other unshared layer: its zero weights (a pruned head) are not computed
            macs += int(torch.count_nonzero(module.weight.detach())) * count
            dense_macs += module.weight.numel() * count
        else:
            macs += _active_plane(layer, index, record) * layer.kernel_numel * count
            dense_macs += layer.weight.numel() * count
    return TaskCost(task, active_total / prunable_total, active_total + _parameter_count(shared, task), macs,
                    dense_macs)


def _active_plane(layer: SharedLayer, index: int, record: TaskRecord) -> int:
    """Active channel pairs of a committed task, or of the task in progress under its current selection."""
    return int(layer.current_plane(index, record).sum())


def model_cost(shared: SharedNetwork) -> ModelCost:
    """Stored parameters, mask bits and bytes of the whole shared model, and the one-dense-model-per-task baseline.

    >>> net = SharedNetwork(nn.Sequential(nn.Conv2d(4, 4, 1)))   # 16 shared weights, a 4-value local bias
    >>> net.begin_task("a", (2, 2)); net.prune(0.5); net.commit()  # a keeps 2 of its 4 blocks: 8 weights
    >>> cost = model_cost(net)
    >>> cost.stored_params, cost.mask_bits, cost.stored_bytes, cost.checkpoint_bytes, cost.independent_params
    (12, 4, 49, 88, 20)
    """
    layers = shared.shared_layers()
    owned = sum(int(layer.owned().sum()) * layer.kernel_numel for layer in layers)
    stored = owned
    stored_bytes = sum(int(layer.owned().sum()) * layer.kernel_numel * layer.weight.element_size() for layer in layers)
    prunable = sum(layer.weight.numel() for layer in layers)
    independent = mask_bits = dense_params = 0
    new = _new_tensors(shared)
    for index, task in enumerate(shared.tasks):
        stored += sum(t.numel() for t in new[task.name])
        stored_bytes += sum(t.numel() * t.element_size() for t in new[task.name])
        dense = prunable + sum(t.numel() for t in _own_tensors(shared, task.name).values())
        independent += dense
        dense_params = dense_params or dense
        selection_bits = index > 0 and task.reuse == "learned"
        for layer in layers:
            mask_bits += layer.task_grid(task).num_blocks * (2 if selection_bits else 1)
    stored_bytes += -(-mask_bits // 8)
    checkpoint = sum(t.numel() * t.element_size() for t in checkpoint_tensors(shared).values())
    return ModelCost(stored, mask_bits, stored_bytes, checkpoint, independent, dense_params)
