"""Measured speed of a committed task: its compacted model against the dense model, timed in one process.

>>> import torch
>>> from torch import nn
>>> from pngrow.workers.png import SharedNetwork
>>> net = SharedNetwork(nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 3, 3, padding=1)))
>>> net.begin_task("a", block_shape=(8, 64)); net.prune(0.5); net.commit()
>>> speed = task_speed(net, "a", (torch.rand(1, 3, 32, 32),), rounds=3)
>>> speed.latency_ms > 0 and speed.dense_latency_ms > 0
True
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .png import CompactModel, SharedNetwork, check_compaction, compact_task

__all__ = ["TaskSpeed", "compacted_and_dense", "median_latencies", "task_speed"]


@dataclass(frozen=True)
class TaskSpeed:
    """Median latency of one forward of a task, compacted and as the dense model, on the same input and device."""

    task: str
    latency_ms: float
    dense_latency_ms: float
    rounds: int

    @property
    def speedup(self) -> float:
        return self.dense_latency_ms / self.latency_ms


def median_latencies(runs: dict[str, Callable[[], Any]], rounds: int, device: torch.device,
                     warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of each callable after ``warmup`` calls, all taking turns round after round so that
    machine noise hits them alike; CUDA work is synchronised before each clock read."""
    if rounds < 1:
        raise ValueError(f"latency rounds {rounds!r} must be at least 1")
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(warmup):
            for run in runs.values():
                run()
        for _ in range(rounds):
            for name, run in runs.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def compacted_and_dense(shared: SharedNetwork, task: str, inputs: tuple[torch.Tensor, ...]) -> tuple[CompactModel,
                                                                                                    CompactModel]:
    """Committed ``task`` compacted (each layer the fastest way on ``inputs``, checked against the masked model, a
    mismatch raising :class:`~pngrow.workers.png.CompactionMismatch`) and exported dense: the two models timed.

    >>> import torch
    >>> from torch import nn
    >>> net = SharedNetwork(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)))
    >>> net.begin_task("a", block_shape=(4, 64)); net.prune(0.5); net.commit()
    >>> compact, dense = compacted_and_dense(net.eval(), "a", (torch.rand(1, 3, 16, 16),))
    >>> [plan.strategy for plan in dense.plans]
    ['dense', 'dense']
    """
    compact = compact_task(shared, task, *inputs)
    check_compaction(compact, shared, inputs)
    return compact, compact_task(shared, task, strategies=("dense",))


def task_speed(shared: SharedNetwork, task: str, inputs: tuple[torch.Tensor, ...], rounds: int = 10) -> TaskSpeed:
    """Time committed ``task`` compacted (:func:`compact_task`, checked against the masked model) and exported
    dense, on ``inputs`` on their device, ``rounds`` times each in turns; the medians."""
    was_training = shared.training
    shared.eval()
    try:
        compact, dense = compacted_and_dense(shared, task, inputs)
        ms = median_latencies({"compact": lambda: compact(*inputs), "dense": lambda: dense(*inputs)}, rounds,
                              inputs[0].device)
    finally:
        shared.train(was_training)
    return TaskSpeed(task, ms["compact"], ms["dense"], rounds)
