"""Train one task into a shared network by prune-and-grow (:func:`train_task`), and a whole job of tasks in order
(:func:`train_shared`). A search runs :func:`train_task` once per trial, on a Ray worker."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from .._progress import Log
from .data import ImageSet, PatchSampler
from .models import Family
from .png import ModelCost, SharedNetwork, TaskCost, model_cost, task_cost
from .settings import TaskSettings

__all__ = ["DriftError", "JobResult", "Optimisers", "RungHook", "StoppedEarly", "TaskResult", "prune_schedule",
           "train_shared", "train_task", "training_loss"]

# Called when a task's growing ends: (step, the task's evaluation metrics then) -> whether its training goes on.
# Early stopping (:mod:`pngrow.pipeline.early_stopping`) passes one that asks the stage's rung.
RungHook = Callable[[int, dict[str, float]], bool]


@dataclass
class TaskResult:
    """What training one task produced: its metrics and cost right after commit, its time and loss curve."""

    task: str
    settings: TaskSettings
    metrics: dict[str, float]
    cost: TaskCost
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list, repr=False)
    step_seconds: float = 0.0  # of ``seconds``, those in gradient steps (not callbacks, evaluations or the commit)
    eval_seconds: float = 0.0  # of ``seconds``, those evaluating the committed task on the evaluation images


@dataclass
class Optimisers:
    """How every training loop here steps: Adam on the weights under a cosine schedule that restarts at the start of
    each phase (a length in steps), and Adam at 1e-3 on auxiliary parameters (CompressAI's entropy-bottleneck
    quantiles) with their own loss. With ``clip_norm`` the weights' gradient is scaled to at most that norm first
    (see :attr:`Family.grad_clip_norm`).

    A task's training has two phases, growing, then pruning with fine-tuning: without the restart, the blocks that
    survive pruning would recover at under a tenth of the learning rate (0.13 to 0.27 dB lower PSNR on SISR x2 at the
    quick budget, measured with 4x4 and 8x1024 blocks).

    >>> [round(f, 2) for f in Optimisers.factors((2, 2))]
    [1.0, 0.5, 1.0, 0.5]
    """

    main: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    aux: torch.optim.Optimizer | None
    clip_norm: float | None = None

    @staticmethod
    def factors(phases: tuple[int, ...]) -> list[float]:
        """The learning-rate factor of every step: a cosine from 1 towards 0 within each phase."""
        return [0.5 * (1 + math.cos(math.pi * s / n)) for n in phases for s in range(n)]

    @classmethod
    def build(cls, param_groups: list[dict[str, Any]], aux: list[torch.nn.Parameter], phases: tuple[int, ...],
              clip_norm: float | None = None) -> Optimisers:
        """Adam with the restarting cosine over ``phases`` on ``param_groups``, Adam on ``aux``."""
        main = torch.optim.Adam(param_groups)
        factors = cls.factors(phases)
        schedule = torch.optim.lr_scheduler.LambdaLR(main, lambda s: factors[s] if s < len(factors) else 0.0)
        return cls(main, schedule, torch.optim.Adam(aux, lr=1e-3) if aux else None, clip_norm)

    def step(self, loss: torch.Tensor, aux_loss: Callable[[], torch.Tensor | None]) -> None:
        """One step of every optimiser: the main one on ``loss``, the auxiliary one on ``aux_loss()``."""
        self.main.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm is not None:  # parameters without a gradient are skipped
            torch.nn.utils.clip_grad_norm_([p for group in self.main.param_groups for p in group["params"]],
                                           self.clip_norm)
        self.main.step()
        self.schedule.step()
        if self.aux is not None:
            self.aux.zero_grad(set_to_none=True)
            aux_loss().backward()  # type: ignore[union-attr]
            self.aux.step()


def prune_schedule(ratio: float, steps: int, events: int = 10) -> dict[int, float]:
    """Step (counted from the start of pruning) -> ratio to prune to, on CPG's cubic schedule ending at ``ratio``.

    >>> prune_schedule(0.5, 4, events=2)
    {0: 0.4375, 2: 0.5}
    """
    if steps == 0:
        return {0: ratio}
    events = max(1, min(events, steps))
    return {(k - 1) * steps // events: ratio * (1 - (1 - k / events) ** 3) for k in range(1, events + 1)}


def _task_optimisers(shared: SharedNetwork, family: Family, settings: TaskSettings) -> Optimisers:
    """The optimisers of the task in progress: its weights at ``lr``, its selection at ``selection_lr``, the
    family's auxiliary parameters by their own; the cosine restarts when pruning starts."""
    groups = shared.trainable_parameters()
    aux = family.aux_parameters(shared)
    aux_ids = {id(p) for p in aux}
    param_groups = [{"params": [p for p in groups["weights"] if id(p) not in aux_ids], "lr": settings.lr}]
    if groups["selection"]:
        param_groups.append({"params": groups["selection"], "lr": settings.selection_lr})
    phases = (settings.grow_steps, settings.prune_steps + settings.finetune_steps)
    return Optimisers.build(param_groups, aux, phases, family.grad_clip_norm)


class StoppedEarly(Exception):
    """A task's training that its rung stopped when growing ended: the task, the step and its metrics then."""

    def __init__(self, task: str, step: int, metrics: dict[str, float]) -> None:
        super().__init__(task, step, metrics)
        self.task, self.step, self.metrics = task, step, metrics

    def __str__(self) -> str:
        return f"task {self.task!r} was stopped early at step {self.step}"


def train_task(
    shared: SharedNetwork,
    family: Family,
    task: str,
    settings: TaskSettings,
    sampler: PatchSampler,
    eval_images: ImageSet,
    log: Log = print,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    at_rung: RungHook | None = None,
    initial_task: str | None = None,
) -> TaskResult:
    """Grow ``task`` into ``shared``, prune it, fine-tune it, commit it, then evaluate and cost it.

    The task is always pruned to ``prune_ratio`` before it is committed: with no prune and no fine-tune steps, once
    after the last growing step (untuned). ``on_step(step, figures)`` is called with the training figures about
    ten times per task. ``at_rung(step, metrics)`` is called once when growing ends, before pruning starts (in a
    training that has steps both before and after that point), with the task's evaluation metrics then; when it
    returns False the training stops there with :class:`StoppedEarly`, leaving the task uncommitted.
    ``initial_task`` names the task that ``shared``'s weights were trained for when it has no task yet (a base).
    """
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    shared.train()
    _begin(shared, family, task, settings, shared.tasks[-1].name if shared.tasks else initial_task)
    optimisers = _task_optimisers(shared, family, settings)
    schedule = prune_schedule(settings.prune_ratio, settings.prune_steps, settings.prune_events)
    patch = family.patch_size(task)
    history: list[dict[str, float]] = []
    every = max(1, settings.total_steps // 10)
    pruned = False
    aside = 0.0  # seconds in the rung's evaluation and the callbacks: not training
    loop_start = time.perf_counter()
    for step in range(settings.total_steps):
        if step == settings.grow_steps:
            begun = time.perf_counter()
            _end_growing(shared, family, task, eval_images, step, at_rung)
            aside += time.perf_counter() - begun
        if (step - settings.grow_steps) in schedule:
            shared.prune(schedule[step - settings.grow_steps], settings.prune_scope)  # type: ignore[arg-type]
            pruned = True
        loss, figures = training_loss(shared, family, task, settings, sampler.sample(settings.batch_size, patch))
        figures["lr"] = optimisers.main.param_groups[0]["lr"]
        if settings.reuse_penalty and step < settings.grow_steps:
            loss = loss + settings.reuse_penalty * shared.selection_density()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"task {task!r}: training loss became {loss.item()} at step {step}")
        optimisers.step(loss, lambda: family.aux_loss(shared))
        if step % every == 0 or step == settings.total_steps - 1:
            aside += _report_step(history, task, step, settings.total_steps, figures, on_step, log)
    step_seconds = time.perf_counter() - loop_start - aside
    if not pruned:  # no prune or fine-tune step ran the schedule
        shared.fix_selection()
        shared.prune(settings.prune_ratio, settings.prune_scope)  # type: ignore[arg-type]
    committing = time.perf_counter()
    metrics, cost = _commit_task(shared, family, task, eval_images)
    seconds = time.perf_counter() - start
    log(f"[{task}] committed in {seconds:.1f} s: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return TaskResult(task, settings, metrics, cost, seconds, history, step_seconds,
                      time.perf_counter() - committing)


def _begin(shared: SharedNetwork, family: Family, task: str, settings: TaskSettings, previous: str | None) -> None:
    """Open ``task``'s blocks in ``shared`` (free blocks starting as ``grow_from`` says, its task-local state as the
    family says for a start from ``previous``'s) in the memory order it trains in."""
    shared.begin_task(task, settings.block_shape, settings.reuse, settings.grow_from,  # type: ignore[arg-type]
                      settings.paired)
    family.after_begin(shared, task, previous)
    if settings.channels_last:
        shared.model.to(memory_format=torch.channels_last)


def training_loss(shared: SharedNetwork, family: Family, task: str, settings: TaskSettings,
          batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The family's training loss on a batch of clean patches (moved to ``shared``'s device), in the settings'
    precision and memory order; the loss is float32."""
    order = torch.channels_last if settings.channels_last else torch.preserve_format
    batch = batch.to(shared.device, memory_format=order)
    with torch.autocast(shared.device.type, dtype=torch.bfloat16, enabled=settings.precision == "bfloat16"):
        loss, figures = family.loss(shared, task, batch)
    return loss.float(), figures


def _report_step(history: list[dict[str, float]], task: str, step: int, total: int, figures: dict[str, float],
                 on_step: Callable[[int, dict[str, float]], None] | None, log: Log) -> float:
    """Keep a step's figures in ``history`` and pass them on; returns the seconds that took (not training)."""
    begun = time.perf_counter()
    history.append({"step": step, **figures})
    if on_step is not None:
        on_step(step, figures)
    log(f"[{task}] step {step + 1}/{total} " + " ".join(f"{k}={v:.4g}" for k, v in figures.items()))
    return time.perf_counter() - begun


def _end_growing(shared: SharedNetwork, family: Family, task: str, eval_images: ImageSet, step: int,
                 at_rung: RungHook | None) -> None:
    """Ask ``at_rung`` (after at least one growing step) whether the training goes on, then fix the selection."""
    if at_rung is not None and step > 0:
        metrics = _evaluate_in_progress(shared, family, task, eval_images)
        if not at_rung(step, metrics):
            raise StoppedEarly(task, step, metrics)
    shared.fix_selection()


def _evaluate_in_progress(shared: SharedNetwork, family: Family, task: str, eval_images: ImageSet) -> dict[str, float]:
    """The in-progress task's evaluation metrics, training left as it was: the family's derived task-local state
    (NIC's entropy-coder tables, which its real bitstreams need) is computed first; no random number is drawn."""
    family.before_commit(shared, task)
    shared.eval()
    try:
        return family.evaluate(shared, task, eval_images)
    finally:
        shared.train()


def _commit_task(shared: SharedNetwork, family: Family, task: str, eval_images: ImageSet) -> tuple[dict[str, float],
                                                                                                     TaskCost]:
    """Commit the in-progress task; its evaluation metrics and cost."""
    family.before_commit(shared, task)
    shared.commit()
    shared.eval()
    metrics = family.evaluate(shared, task, eval_images)
    cost = task_cost(shared, task, *(x.to(shared.device) for x in family.cost_inputs(task)))
    return metrics, cost


@dataclass
class JobResult:
    """A whole prune-and-grow job: the shared network, what training each task produced, every task's final figures."""

    family: Family
    shared: SharedNetwork
    task_results: list[TaskResult]
    final_metrics: dict[str, dict[str, float]]
    model: ModelCost
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """The output contract of ``pngrow run --json``."""
        tasks = []
        for result in self.task_results:
            tasks.append(
                {
                    "name": result.task,
                    "metrics": self.final_metrics[result.task],
                    "density": result.cost.density,
                    "active_params": result.cost.active_params,
                    "macs": result.cost.macs,
                    "dense_macs": result.cost.dense_macs,
                    "block_shape": list(result.settings.block_shape),
                    "prune_ratio": result.settings.prune_ratio,
                    "precision": result.settings.precision,
                    "stage_seconds": result.seconds,
                }
            )
        return {
            "family": self.family.name,
            "architecture": self.family.architecture(),
            "macs_input": [1, 3, self.family.cost_size, self.family.cost_size],
            "tasks": tasks,
            "model": self.model.as_dict(),
            "stored_params": self.model.stored_params,
            "independent_params": self.model.independent_params,
            "seconds": self.seconds,
        }


class DriftError(RuntimeError):
    """A committed task whose metrics changed after later tasks were grown: a defect of the PnG core."""


def _check_unchanged(result: TaskResult, final: dict[str, float]) -> None:
    """Raise :class:`DriftError` naming the first metric of ``result``'s task that differs at the end of the job."""
    for name in sorted(set(result.metrics) | set(final)):
        before, after = result.metrics.get(name), final.get(name)
        both_nan = isinstance(before, float) and isinstance(after, float) and math.isnan(before) and math.isnan(after)
        if before != after and not both_nan:
            raise DriftError(f"task {result.task!r} changed after later tasks were added: {name} was {before!r} at "
                             f"commit, {after!r} at the end")


def train_shared(
    family: Family,
    settings: list[TaskSettings],
    train_images: ImageSet,
    eval_images: ImageSet,
    log: Log = print,
    device: str = "cpu",
    initial: dict[str, torch.Tensor] | None = None,
    on_step: Callable[[str, int, dict[str, float]], None] | None = None,
    initial_task: str | None = None,
) -> JobResult:
    """Train each task of ``family`` in order (:func:`train_task`), then evaluate every task on the final shared
    network.

    Task 1 starts from ``initial`` (a dense state dict of the family's model, trained for ``initial_task`` where
    named) when given, else from scratch.
    ``on_step(task, step, figures)`` is called about ten times per task.

    Raises :class:`DriftError` if an earlier task's metrics changed after later tasks were added (they cannot,
    by construction; this is the end-to-end check of that guarantee, kept under ``python -O``).
    """
    if len(settings) != len(family.tasks):
        raise ValueError(f"{len(settings)} task settings for {len(family.tasks)} tasks")
    start = time.perf_counter()
    sampler = PatchSampler(train_images, max(family.patch_size(t) for t in family.tasks), seed=settings[0].seed)
    if sampler.skipped:
        log(f"left out {len(sampler.skipped)} training images smaller than the patch: {', '.join(sampler.skipped)}")
    torch.manual_seed(settings[0].seed)  # the model's initialisation is part of what a seed reproduces
    shared = family.build_shared(initial).to(device)
    results = [
        train_task(shared, family, task, replace(s, seed=s.seed + i), sampler, eval_images, log,
                   None if on_step is None else lambda step, figures, task=task: on_step(task, step, figures),
                   initial_task=initial_task if initial is not None else None)
        for i, (task, s) in enumerate(zip(family.tasks, settings))
    ]
    final = {task: family.evaluate(shared, task, eval_images) for task in family.tasks}
    for result in results:
        _check_unchanged(result, final[result.task])
    return JobResult(family, shared, results, final, model_cost(shared), time.perf_counter() - start)

