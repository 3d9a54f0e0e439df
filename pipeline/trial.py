"""What one Ray worker runs: a trial (one task's stage grown from the parent stage's checkpoint), or the final
evaluation of a shared model on every task. Checkpoints come from and go to the MLflow artifact store only.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from mlflow.entities import Run
from safetensors.torch import load_file

from ..workers.data import ImageSet, PatchSampler
from ..workers.latency import task_speed
from ..workers.models import Family, get_family, load_model
from ..workers.png import SharedNetwork, model_cost, task_cost
from ..workers.training import StageResult, StageSettings, StoppedEarly, run_stage
from . import names
from .cluster import ask_actor, gpu_ids, node_id, worker_device
from .data_cache import Manifest, fetch_file, load_images
from .object_store import is_s3
from .tracking import Tracking

__all__ = ["EvaluationSpec", "RungReport", "TrialOutcome", "TrialSpec", "TrialStopped", "evaluate_model",
           "init_weights", "run_trial"]

_EVAL = "eval/"  # the prefix of a trial's evaluation metrics
_RUNG = "rung/"  # the prefix of a trial's evaluation metrics at its stage's rung (early stopping)
_RUNG_STEP = "rung_step"


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
    device: str = "cpu"  # what the driver asked Ray for: cuda (GPUs) or cpu
    latency_rounds: int = 0  # time the compacted task this many rounds (0: not at all)
    latency_size: int | None = None  # side of the latency input; None: the family's
    device_setting: str = "auto"  # ray.device: what to do where Ray's GPU has no working CUDA (see worker_device)
    manifest: Manifest | None = None  # the s3:// data and init as the driver listed them; None: as listed now
    rung: Any = None  # the stage's rung, a Ray actor holding an early_stopping.Rung; None: no early stopping


@dataclass(frozen=True)
class RungReport:
    """What a trial measured at its stage's rung (the end of growing): the step and its evaluation metrics."""

    step: int
    metrics: dict[str, float]

    def record(self, tracking: Tracking, run_id: str) -> None:
        """Log the report on the trial's run: ``rung/<metric>`` and ``rung_step``, at the step."""
        tracking.log(run_id, metrics={**{_RUNG + k: v for k, v in self.metrics.items()}, _RUNG_STEP: self.step},
                     step=self.step)

    @staticmethod
    def from_run(run: Run) -> RungReport | None:
        """The report :meth:`record` logged on ``run``; None where the trial did not reach a rung."""
        metrics = run.data.metrics
        if _RUNG_STEP not in metrics:
            return None
        return RungReport(int(metrics[_RUNG_STEP]),
                          {k.removeprefix(_RUNG): v for k, v in metrics.items() if k.startswith(_RUNG)})


class TrialStopped(Exception):
    """Raised on a trial's worker when its stage's rung stopped it: what it measured there, why, and when it trained
    (epoch seconds)."""

    def __init__(self, rung: RungReport, reason: str, interval: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__(rung, reason, interval)
        self.rung, self.reason, self.interval = rung, reason, interval

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class TrialOutcome:
    """A finished trial: its evaluation metrics, its cost, and when it trained (epoch seconds).

    The trial's run records it (:meth:`record`) and :meth:`from_run` reads it back; nothing else parses those keys.
    """

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
    latency_ms: float = math.nan  # the compacted task's median latency (NaN: not measured)
    dense_latency_ms: float = math.nan  # the dense model's, timed beside it in the same process
    rung: RungReport | None = None  # what it measured at its stage's rung (None: early stopping was off)

    @property
    def speedup(self) -> float:
        return self.dense_latency_ms / self.latency_ms

    @property
    def relative_latency(self) -> float:
        """The compacted task's latency as a share of the dense model's, timed in turns in the same process (0.5:
        twice as fast). Trials are timed at different moments, and a dense model's own time drifted 2.4x between
        trials of one search on a 2-core CPU: the ratio compares them, the milliseconds do not."""
        return self.latency_ms / self.dense_latency_ms

    def cost(self, objective: str) -> float:
        """A cost objective of :data:`~pngrow.pipeline.config.COST_OBJECTIVES` (``latency``: the relative latency)."""
        return float(self.relative_latency if objective == "latency" else getattr(self, objective))

    def objective_values(self, quality: str, costs: Sequence[str]) -> list[float]:
        """What the stage's study is told: the quality metric, then each cost."""
        return [self.metrics[quality], *(self.cost(c) for c in costs)]

    def metric_record(self, timings: bool = True) -> dict[str, float]:
        """The outcome as MLflow metrics: ``eval/<metric>``, the costs and (with ``timings``) the seconds."""
        record = {**{_EVAL + k: v for k, v in self.metrics.items()}, "density": self.density,
                  "active_params": self.active_params, "gmacs": self.macs / 1e9, "stored_params": self.stored_params}
        if math.isfinite(self.latency_ms):
            record.update(latency_ms=self.latency_ms, dense_latency_ms=self.dense_latency_ms, speedup=self.speedup,
                          relative_latency=self.relative_latency)
        if timings:
            record.update(train_seconds=self.train_ended - self.train_started, trial_seconds=self.trial_seconds)
        return record

    def record(self, tracking: Tracking) -> None:
        """Log the outcome on the trial's run: :meth:`metric_record` and the task's fingerprint."""
        tracking.log(self.run_id, metrics=self.metric_record(), tags={names.FINGERPRINT: self.fingerprint})

    @staticmethod
    def recorded(run: Run) -> bool:
        """Whether ``run`` holds a trial's outcome (its worker finished), whatever the run's status."""
        return names.FINGERPRINT in run.data.tags and "density" in run.data.metrics

    @classmethod
    def from_run(cls, run: Run) -> TrialOutcome:
        """The outcome :meth:`record` logged on ``run`` (training start and end are not kept: 0)."""
        if not cls.recorded(run):
            raise ValueError(f"run {run.info.run_id} holds no trial outcome")
        metrics, tags = run.data.metrics, run.data.tags
        return cls(run.info.run_id, tags[names.TASK],
                   {k.removeprefix(_EVAL): v for k, v in metrics.items() if k.startswith(_EVAL)},
                   metrics["density"], int(metrics["active_params"]), int(round(metrics["gmacs"] * 1e9)),
                   int(metrics["stored_params"]), tags[names.FINGERPRINT], 0.0, 0.0, metrics.get("trial_seconds", 0.0),
                   metrics.get("latency_ms", math.nan), metrics.get("dense_latency_ms", math.nan),
                   RungReport.from_run(run))


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
    manifest: Manifest | None = None  # as TrialSpec's


def init_weights(init: str, tracking: Tracking, scratch: Path, manifest: Manifest | None = None) -> Path:
    """The file of the init weights ``init``: a ``runs:/`` artifact (the driver uploads a config's local file to the
    search run) downloaded into ``scratch``, an ``s3://`` object through the node's cache, else a local path."""
    if init.startswith("runs:/"):
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
    settings = StageSettings(**spec.settings)
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
        result, rung = _train(spec, tracking, family, shared, settings, sampler, evaluation, started)
        ended = started + result.step_seconds  # gradient steps only: logging, evaluations, the commit are overhead
        stored = model_cost(shared).stored_params
        speed = _speed(spec, family, shared)
        family.save(shared.cpu(), scratch / "checkpoint")
        tracking.log_checkpoint(spec.run_id, scratch / "checkpoint")
    outcome = TrialOutcome(spec.run_id, spec.task, result.metrics, result.cost.density, result.cost.active_params,
                           result.cost.macs, stored, shared.fingerprint(spec.task), started, ended,
                           time.time() - begun, *speed, rung)
    outcome.record(tracking)
    return outcome


def _train(spec: TrialSpec, tracking: Tracking, family: Family, shared: SharedNetwork, settings: StageSettings,
           sampler: PatchSampler, evaluation: ImageSet, started: float) -> tuple[StageResult, RungReport | None]:
    """Run the trial's stage (from ``started``, epoch seconds), logging its training figures; with a rung
    (``spec.rung``), ask it when growing ends: a trial it stops raises :class:`TrialStopped`. Returns the stage's
    result and what the trial measured at the rung."""

    def on_step(step: int, figures: dict[str, float]) -> None:
        tracking.log(spec.run_id, metrics={f"train/{k}": v for k, v in figures.items()}, step=step)

    rung = _RungClient(spec, tracking) if spec.rung is not None else None
    try:
        result = run_stage(shared, family, spec.task, settings, sampler, evaluation, log=lambda _: None,
                           on_step=on_step, at_rung=rung)
    except StoppedEarly as stop:
        raise TrialStopped(RungReport(stop.step, stop.metrics), rung.reason if rung else str(stop),
                           (started, time.time())) from None
    return result, rung.report if rung else None


class _RungClient:
    """A trial's side of its stage's rung, the hook :func:`run_stage` calls when growing ends: it logs the task's
    metrics there, asks the rung, and keeps what it measured and why it was stopped. A rung that cannot be asked
    lets the trial go on, with a warning tag on its run."""

    def __init__(self, spec: TrialSpec, tracking: Tracking) -> None:
        self.spec, self.tracking = spec, tracking
        self.report: RungReport | None = None
        self.reason = ""

    def __call__(self, step: int, metrics: dict[str, float]) -> bool:
        run_id = self.spec.run_id
        self.report = RungReport(step, metrics)
        self.report.record(self.tracking, run_id)
        try:
            verdict = ask_actor(self.spec.rung, "report", run_id, step, metrics)
        except ConnectionError as exc:
            self.tracking.log(run_id, tags={names.RUNG_WARNING: f"{exc}; the trial went on without its verdict"})
            return True
        if not verdict.proceed:
            self.reason = verdict.reason
            self.tracking.log(run_id, tags={names.STOPPED_EARLY: verdict.reason})
        return bool(verdict.proceed)


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

