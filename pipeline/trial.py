"""What one Ray worker runs: a trial (one task's stage grown from the parent stage's checkpoint), or the final
evaluation of a shared model on every task. Checkpoints come from and go to the MLflow artifact store only.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..workers.data import ImageSet, PatchSampler, default_images, load_folder
from ..workers.models import get_family, load_model
from ..workers.png import model_cost, task_cost
from ..workers.training import StageSettings, run_stage
from .object_store import fetch_folder, is_s3
from .tracking import Tracking

__all__ = ["EvaluationSpec", "TrialOutcome", "TrialSpec", "evaluate_model", "load_images", "run_trial"]


@dataclass(frozen=True)
class TrialSpec:
    """Everything a worker needs to run one trial; plain data, so Ray ships it to any node."""

    tracking_uri: str
    run_id: str  # the trial's MLflow run, created by the driver
    family: str
    tasks: list[str]  # every task of the search: the model is built with all of their heads
    arch: dict[str, Any]
    task: str
    parent_run: str | None  # the stage run whose checkpoint this trial grows from; None for task 1
    settings: dict[str, Any]  # StageSettings fields
    train_data: str | None = None
    eval_data: str | None = None
    eval_limit: int | None = None
    init: str | None = None
    threads: int = 1
    device: str = "cpu"


@dataclass(frozen=True)
class TrialOutcome:
    """A finished trial: its evaluation metrics, its cost, and when it trained (epoch seconds)."""

    run_id: str
    task: str
    metrics: dict[str, float]
    density: float
    active_params: int
    macs: int
    stored_params: int
    fingerprint: str  # of the task as committed (see SharedNetwork.fingerprint)
    train_started: float
    train_ended: float
    trial_seconds: float

    def cost(self, objective: str) -> float:
        """The cost objective ``density`` or ``stored_params`` (see :data:`~pngrow.pipeline.config.COST_OBJECTIVES`)."""
        return float(getattr(self, objective))


@dataclass(frozen=True)
class EvaluationSpec:
    """Evaluate the checkpoint of ``run_id`` on every one of its tasks."""

    tracking_uri: str
    run_id: str
    eval_data: str | None = None
    eval_limit: int | None = None
    threads: int = 1
    device: str = "cpu"
    tasks: list[str] = field(default_factory=list)  # empty: every task of the model


def load_images(source: str | None, split: str, scratch: Path) -> ImageSet:
    """Images from a folder, an ``s3://`` prefix (copied under ``scratch``), or skimage's photos (None)."""
    if source is None:
        return default_images(split)
    if is_s3(source):
        return load_folder(fetch_folder(source, scratch / f"data-{split}"))
    return load_folder(source)


def _settings_params(settings: dict[str, Any]) -> dict[str, Any]:
    shape = settings.get("block_shape")
    return {**settings, "block_shape": "x".join(map(str, shape)) if isinstance(shape, (tuple, list)) else shape}


def run_trial(spec: TrialSpec) -> TrialOutcome:
    """Grow ``spec.task`` into the parent's checkpoint, log per-step figures, metrics and the new checkpoint."""
    begun = time.time()
    torch.set_num_threads(max(1, spec.threads))
    tracking = Tracking(spec.tracking_uri)
    tracking.log(spec.run_id, tags={"worker_pid": os.getpid(), "worker_node": socket.gethostname()})
    settings = StageSettings(**spec.settings)
    with tempfile.TemporaryDirectory(prefix="pngrow-trial-") as tmp:
        scratch = Path(tmp)
        if spec.parent_run is None:
            family = get_family(spec.family, spec.tasks, **spec.arch)
            initial = load_file(spec.init) if spec.init else None
            torch.manual_seed(settings.seed)
            shared = family.build_shared(initial)
        else:
            torch.manual_seed(settings.seed)  # new task heads are initialised as the seed says
            family, shared = load_model(tracking.download_checkpoint(spec.parent_run, scratch / "parent"), spec.tasks)
            if family.arch != get_family(spec.family, spec.tasks, **spec.arch).arch:
                raise ValueError(f"run {spec.parent_run}'s model {family.architecture()} is not this search's "
                                 f"{spec.family} model {spec.arch}")
        shared.to(spec.device)
        train = load_images(spec.train_data, "train", scratch)
        evaluation = load_images(spec.eval_data, "eval", scratch).limit(spec.eval_limit)
        sampler = PatchSampler(train, max(family.patch_size(t) for t in family.tasks), seed=settings.seed)
        tracking.log(spec.run_id, params=_settings_params(asdict(settings)))

        def on_step(step: int, figures: dict[str, float]) -> None:
            tracking.log(spec.run_id, metrics={f"train/{k}": v for k, v in figures.items()}, step=step)

        started = time.time()
        result = run_stage(shared, family, spec.task, settings, sampler, evaluation, log=lambda _: None,
                           on_step=on_step)
        ended = time.time()
        stored = model_cost(shared).stored_params
        family.save(shared.cpu(), scratch / "checkpoint")
        tracking.log_checkpoint(spec.run_id, scratch / "checkpoint")
    outcome = TrialOutcome(spec.run_id, spec.task, result.metrics, result.cost.density, result.cost.active_params,
                           result.cost.macs, stored, shared.fingerprint(spec.task), started, ended,
                           time.time() - begun)
    tracking.log(spec.run_id, metrics={**{f"eval/{k}": v for k, v in result.metrics.items()},
                                       "density": outcome.density, "active_params": outcome.active_params,
                                       "gmacs": outcome.macs / 1e9, "stored_params": stored,
                                       "train_seconds": ended - started, "trial_seconds": outcome.trial_seconds},
                 tags={"fingerprint": outcome.fingerprint})
    return outcome


def evaluate_model(spec: EvaluationSpec) -> dict[str, dict[str, Any]]:
    """Every task's metrics, density and fingerprint on the checkpoint of ``spec.run_id``."""
    torch.set_num_threads(max(1, spec.threads))
    with tempfile.TemporaryDirectory(prefix="pngrow-eval-") as tmp:
        checkpoint = Tracking(spec.tracking_uri).download_checkpoint(spec.run_id, Path(tmp) / "checkpoint")
        family, shared = load_model(checkpoint)
        shared.to(spec.device).eval()
        evaluation = load_images(spec.eval_data, "eval", Path(tmp)).limit(spec.eval_limit)
        result = {}
        for task in spec.tasks or shared.task_names:
            cost = task_cost(shared, task, *(x.to(shared.device) for x in family.cost_inputs(task)))
            result[task] = {**family.evaluate(shared, task, evaluation), "density": cost.density,
                            "fingerprint": shared.fingerprint(task)}
    return result

