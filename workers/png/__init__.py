"""The prune-and-grow core: pure PyTorch, no Ray, Optuna or MLflow."""

from __future__ import annotations

from ._accounting import ModelCost, TaskCost, count_macs, model_cost, task_cost
from ._blocks import BlockGrid, parse_block_shape
from ._compact import STRATEGIES, CompactLayer, CompactModel, LayerPlan, compact_task
from ._shared import PRUNABLE_TYPES, SharedLayer, SharedNetwork, TaskRecord, assign_tensor
from ._storage import CheckpointError, load_shared, read_description, save_shared

__all__ = [
    "PRUNABLE_TYPES",
    "BlockGrid",
    "CheckpointError",
    "CompactLayer",
    "CompactModel",
    "LayerPlan",
    "ModelCost",
    "SharedLayer",
    "STRATEGIES",
    "SharedNetwork",
    "TaskCost",
    "TaskRecord",
    "assign_tensor",
    "compact_task",
    "count_macs",
    "load_shared",
    "model_cost",
    "parse_block_shape",
    "read_description",
    "save_shared",
    "task_cost",
]
