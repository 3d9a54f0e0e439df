"""The prune-and-grow core: pure PyTorch, no Ray, Optuna or MLflow."""

from __future__ import annotations

from ._accounting import ModelCost, TaskCost, count_macs, model_cost, task_cost
from ._blocks import BlockGrid, parse_block_shape
from ._compact import (COMPACT_TOLERANCE, STRATEGIES, CompactionMismatch, CompactLayer, CompactModel, CompactNetwork,
                       LayerPlan, check_compaction, compact_task)
from ._shared import (FREE, GROWTHS, PRUNABLE_TYPES, PRUNE_SCOPES, SharedLayer, SharedNetwork, TaskRecord,
                      UnknownTaskError, assign_tensor, head_prefixes)
from ._storage import CheckpointError, checkpoint_tensors, load_shared, read_description, save_shared

__all__ = [
    "FREE",
    "GROWTHS",
    "PRUNABLE_TYPES",
    "PRUNE_SCOPES",
    "BlockGrid",
    "CheckpointError",
    "CompactLayer",
    "COMPACT_TOLERANCE",
    "CompactModel",
    "CompactNetwork",
    "CompactionMismatch",
    "LayerPlan",
    "ModelCost",
    "SharedLayer",
    "STRATEGIES",
    "SharedNetwork",
    "TaskCost",
    "TaskRecord",
    "UnknownTaskError",
    "assign_tensor",
    "checkpoint_tensors",
    "check_compaction",
    "compact_task",
    "count_macs",
    "head_prefixes",
    "load_shared",
    "model_cost",
    "parse_block_shape",
    "read_description",
    "save_shared",
    "task_cost",
]
