"""What a search's driver and its Ray workers hand each other, as plain data (no PyTorch): a trial to run
(:class:`TrialSpec`) and what it came back with (:class:`TrialOutcome`), a model to evaluate (:class:`EvaluationSpec`).

The worker side is :mod:`.trial`, which the driver never imports. A trial's outcome is recorded on its MLflow run and
read back from it here, so a resumed search, the report and the status read outcomes without loading a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from . import names
from .early_stopping import RungReport

if TYPE_CHECKING:
    from mlflow.entities import Run

    from .data_cache import Manifest
    from .tracking import Tracking

__all__ = ["EvaluationSpec", "TrialOutcome", "TrialSpec"]

_EVAL = "eval/"  # the prefix of a trial's evaluation metrics


@dataclass(frozen=True, kw_only=True)
class TrialSpec:
    """Everything a worker needs to run one trial; plain data, so Ray ships it to any node."""

    tracking_uri: str
    run_id: str  # the trial's MLflow run, created by the driver
    family: str
    tasks: list[str]  # every task of the search: the model is built with all of their heads
    arch: dict[str, Any]
    task: str
    parent_run: str | None  # the stage run whose checkpoint this trial grows from; None for task 1
    settings: dict[str, Any]  # TaskSettings fields
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
    rung: Any = None  # the stage's rung, a Ray actor (see early_stopping.start_rung); None: no early stopping


@dataclass(frozen=True, kw_only=True)
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
        return cls(run_id=run.info.run_id, task=tags[names.TASK],
                   metrics={k.removeprefix(_EVAL): v for k, v in metrics.items() if k.startswith(_EVAL)},
                   density=metrics["density"], active_params=int(metrics["active_params"]),
                   macs=int(round(metrics["gmacs"] * 1e9)), stored_params=int(metrics["stored_params"]),
                   fingerprint=tags[names.FINGERPRINT], train_started=0.0, train_ended=0.0,
                   trial_seconds=metrics.get("trial_seconds", 0.0), latency_ms=metrics.get("latency_ms", math.nan),
                   dense_latency_ms=metrics.get("dense_latency_ms", math.nan), rung=RungReport.from_run(run))


@dataclass(frozen=True, kw_only=True)
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
