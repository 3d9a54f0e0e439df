"""What one Ray worker runs: a trial (one task trained by :func:`~pngrow.workers.training.train_task` into the
parent stage's checkpoint), or the final evaluation of a shared model on every task. Checkpoints come from and go to
the MLflow artifact store only.

The driver sends the records of :mod:`.records` and reads what comes back; it never imports this module (PyTorch),
which is imported on the worker that runs a trial.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..workers.data import ImageSet, PatchSampler
from ..workers.latency import task_speed
from ..workers.models import Family, get_family, load_model
from ..workers.png import SharedNetwork, model_cost, task_cost
from ..workers.settings import TaskSettings
from ..workers.training import StoppedEarly, TaskResult, train_task
from . import names
from .cluster import gpu_ids, node_id, worker_device
from .data_cache import Manifest, fetch_file, load_images
from .early_stopping import RungClient, RungReport
from .records import EvaluationSpec, TrialOutcome, TrialSpec
from .tracking import Tracking
from .uris import is_run_artifact, is_s3

__all__ = ["evaluate_model", "init_weights", "run_trial"]


def init_weights(init: str, tracking: Tracking, scratch: Path, manifest: Manifest | None = None) -> Path:
    """The file of the init weights ``init``: a ``runs:/`` artifact (the driver uploads a config's local file to the
    search run) downloaded into ``scratch``, an ``s3://`` object through the node's cache, else a local path."""
    if is_run_artifact(init):
        return tracking.download_artifact(init, scratch / "init")
    return fetch_file(init, manifest) if is_s3(init) else Path(init)


def _settings_params(settings: dict[str, Any]) -> dict[str, Any]:
    shape = settings.get("block_shape")
    return {**settings, "block_shape": "x".join(map(str, shape)) if isinstance(shape, (tuple, list)) else shape}


def run_trial(spec: TrialSpec) -> TrialOutcome:
    """Grow ``spec.task`` into the parent's checkpoint, log per-step figures, metrics and the new checkpoint."""
    begun = time.time()
    torch.set_num_threads(max(1, spec.threads))
    tracking = Tracking(spec.tracking_uri)
    node = node_id()
    tracking.log(spec.run_id, tags={names.WORKER_PID: os.getpid(), names.WORKER_NODE: socket.gethostname(),
                                    names.RAY_NODE: node})
    device, warning = worker_device(spec.device, spec.device_setting, torch.cuda.is_available(), gpu_ids(), node)
    if warning:
        tracking.log(spec.run_id, tags={names.DEVICE_WARNING: warning})
    settings = TaskSettings(**spec.settings)
    with tempfile.TemporaryDirectory(prefix="pngrow-trial-") as tmp:
        scratch = Path(tmp)
        if spec.parent_run is None:
            family = get_family(spec.family, spec.tasks, **spec.arch)
            initial = load_file(init_weights(spec.init, tracking, scratch, spec.manifest)) if spec.init else None
            torch.manual_seed(settings.seed)
            shared = family.build_shared(initial)
        else:
            torch.manual_seed(settings.seed)  # new task heads are initialised as the seed says
            family, shared = load_model(tracking.download_checkpoint(spec.parent_run, scratch / "parent"), spec.tasks)
            if family.arch != get_family(spec.family, spec.tasks, **spec.arch).arch:
                raise ValueError(f"run {spec.parent_run}'s model {family.architecture()} is not this search's "
                                 f"{spec.family} model {spec.arch}")
        shared.to(device)
        train = load_images(spec.train_data, "train", spec.manifest, tracking)
        evaluation = load_images(spec.eval_data, "eval", spec.manifest, tracking).limit(spec.eval_limit)
        sampler = PatchSampler(train, max(family.patch_size(t) for t in family.tasks), seed=settings.seed)
        tracking.log(spec.run_id, params=_settings_params(asdict(settings)))
        for images, source, context in ((train, spec.train_data, "training"), (evaluation, spec.eval_data, "evaluation")):
            tracking.log_dataset(spec.run_id, f"{context} images ({len(images)})", source, images.digest, context)
        started = time.time()
        result, rung = _train(spec, tracking, family, shared, settings, sampler, evaluation, started, begun)
        ended = started + result.step_seconds  # gradient steps only: logging, evaluations, the commit are overhead
        stored = model_cost(shared).stored_params
        speed = _speed(spec, family, shared)
        family.save(shared.cpu(), scratch / "checkpoint")
        tracking.log_checkpoint(spec.run_id, scratch / "checkpoint")
    outcome = TrialOutcome(run_id=spec.run_id, task=spec.task, metrics=result.metrics, density=result.cost.density,
                           active_params=result.cost.active_params, macs=result.cost.macs, stored_params=stored,
                           fingerprint=shared.fingerprint(spec.task), train_started=started, train_ended=ended,
                           trial_seconds=time.time() - begun, latency_ms=speed[0], dense_latency_ms=speed[1],
                           rung=rung)
    outcome.record(tracking)
    return outcome


def _train(spec: TrialSpec, tracking: Tracking, family: Family, shared: SharedNetwork, settings: TaskSettings,
           sampler: PatchSampler, evaluation: ImageSet, started: float,
           begun: float) -> tuple[TaskResult, RungReport | None]:
    """Train the trial's task (from ``started``, epoch seconds), logging its training figures, how long after the
    trial began (``begun``) its first step was done, and its evaluation's seconds; with a rung (``spec.rung``), ask
    it when growing ends: a trial it stops raises :class:`~pngrow.pipeline.early_stopping.TrialStopped`. Returns the
    task's result and what the trial measured at the rung."""

    def on_step(step: int, figures: dict[str, float]) -> None:
        first = {"first_step_seconds": time.time() - begun} if step == 0 else {}
        tracking.log(spec.run_id, metrics={**{f"train/{k}": v for k, v in figures.items()}, **first}, step=step)

    rung = RungClient(spec.rung, spec.run_id, tracking) if spec.rung is not None else None
    try:
        result = train_task(shared, family, spec.task, settings, sampler, evaluation, log=lambda _: None,
                            on_step=on_step, at_rung=rung)
    except StoppedEarly as stop:
        if rung is None:
            raise
        raise rung.stopped(stop, started) from None
    tracking.log(spec.run_id, metrics={"eval_seconds": result.eval_seconds})
    return result, rung.report if rung else None


def _speed(spec: TrialSpec, family: Family, shared: SharedNetwork) -> tuple[float, float]:
    """The committed task's compacted and dense median latency (ms) on the trial's device, or NaN when the search
    does not ask for it. The compacted model is checked against the masked one first (a mismatch fails the trial)."""
    if not spec.latency_rounds:
        return math.nan, math.nan
    inputs = tuple(x.to(shared.device) for x in family.latency_inputs(spec.latency_size))
    speed = task_speed(shared, spec.task, inputs, spec.latency_rounds)
    return speed.latency_ms, speed.dense_latency_ms


def evaluate_model(spec: EvaluationSpec) -> dict[str, dict[str, Any]]:
    """Every task's metrics, density and fingerprint on the checkpoint of ``spec.run_id``."""
    torch.set_num_threads(max(1, spec.threads))
    with tempfile.TemporaryDirectory(prefix="pngrow-eval-") as tmp:
        tracking = Tracking(spec.tracking_uri)
        checkpoint = tracking.download_checkpoint(spec.run_id, Path(tmp) / "checkpoint")
        family, shared = load_model(checkpoint)
        shared.to(worker_device(spec.device, "auto", torch.cuda.is_available())[0]).eval()
        evaluation = load_images(spec.eval_data, "eval", spec.manifest, tracking).limit(spec.eval_limit)
        result = {}
        for task in spec.tasks or shared.task_names:
            cost = task_cost(shared, task, *(x.to(shared.device) for x in family.cost_inputs(task)))
            result[task] = {**family.evaluate(shared, task, evaluation), "density": cost.density,
                            "fingerprint": shared.fingerprint(task)}
    return result

