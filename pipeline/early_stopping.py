"""Early stopping, every piece of it: asynchronous successive halving (ASHA) with one rung, at the end of growing.

Each trial of a stage reports its quality at the rung as it reaches it, and goes on only while that value is among
the best ``keep`` fraction of the values the rung has had so far (its own included: ASHA's rule), so trials running
at the same time judge each other.

The pieces, in the order a trial meets them:

- the options, :class:`~pngrow.pipeline.config.EarlyStopping` (the budget's ``early_stopping``, read with the config);
- the rule, :func:`rung_rule`, and the rung, :class:`Rung` (plain Python), which the driver starts for each stage
  as one small Ray actor (:func:`start_rung`);
- the worker's hook, :class:`RungClient`: the :data:`~pngrow.workers.training.RungHook` that
  :func:`~pngrow.workers.training.train_task` calls when growing ends (the PnG training knows nothing of Ray: it
  only stops with :class:`~pngrow.workers.training.StoppedEarly` when its hook says so). The hook records a
  :class:`RungReport` on the trial's run and asks the rung for a :class:`Verdict`;
- a trial the rung stopped raises :class:`TrialStopped` back to the driver, which ends it KILLED in MLflow and PRUNED
  in Optuna (:mod:`.scheduler`); a resumed search keeps it so and seeds the rung again (:mod:`.resume`).

The rung is the end of growing, whatever the trial's ``grow_steps``: where a space searches ``grow_steps``, trials
that grew longer are compared with ones that grew less. It sees the task before pruning, so not what a trial's
``prune_ratio`` will cost it; and which trials it stops depends on the order in which they reach it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from . import names
from .cluster import ask_actor
from .config import EarlyStopping

if TYPE_CHECKING:
    from mlflow.entities import Run

    from ..workers.training import StoppedEarly
    from .cluster import Cluster
    from .tracking import Tracking

__all__ = ["Rung", "RungClient", "RungReport", "TrialStopped", "Verdict", "rung_rule", "start_rung"]

_RUNG = "rung/"  # the prefix of a trial's evaluation metrics at its stage's rung
_RUNG_STEP = "rung_step"


def rung_rule(value: float, values: Sequence[float], keep: float, min_trials: int,
              maximize: bool) -> tuple[bool, float]:
    """Whether a trial whose rung value is ``value`` goes on, and the cut-off: the k-th best of ``values`` (every
    value at the rung, ``value`` included), k = max(1, floor(n * keep)); a value as good as the cut-off goes on.
    With fewer than ``min_trials`` values every trial goes on (cut-off NaN). NaN ranks worst.

    >>> rung_rule(28.0, [30.0, 29.0, 28.0, 27.0], keep=0.5, min_trials=2, maximize=True)
    (False, 29.0)
    >>> rung_rule(29.0, [30.0, 29.0, 28.0, 27.0], keep=0.5, min_trials=2, maximize=True)
    (True, 29.0)
    >>> rung_rule(5.0, [5.0, 3.0, 4.0], keep=0.5, min_trials=2, maximize=False)  # lower is better: 3 is the best
    (False, 3.0)
    >>> rung_rule(1.0, [1.0], keep=0.5, min_trials=2, maximize=True)
    (True, nan)
    """
    if len(values) < min_trials:
        return True, math.nan
    sign = 1.0 if maximize else -1.0
    ranked = sorted(values, key=lambda v: -math.inf if math.isnan(v) else sign * v, reverse=True)
    cutoff = ranked[max(1, math.floor(len(ranked) * keep + 1e-9)) - 1]
    return (not math.isnan(value) and sign * value >= sign * cutoff), cutoff


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """The rung's answer to one trial: whether it goes on, and why not ('' when it does)."""

    proceed: bool
    reason: str = ""


class Rung:
    """One stage's rung: the value each trial (by its run id) reported there, and the verdict on every report
    (:func:`rung_rule`). The driver keeps it in a Ray actor (:func:`start_rung`) that every trial's worker asks.

    >>> rung = Rung("psnr", True, EarlyStopping(keep=0.5, min_trials=2), {"a": 30.0})
    >>> rung.report("b", 300, {"psnr": 29.5, "ms_ssim": 0.9})
    Verdict(proceed=False, reason="psnr 29.5 at step 300 is below the rung's best 50% (cut-off 30 over 2 trials)")
    >>> rung.report("c", 300, {"psnr": 31.0}).proceed, len(rung.values)
    (True, 3)
    """

    def __init__(self, quality: str, maximize: bool, options: EarlyStopping,
                 values: dict[str, float] | None = None) -> None:
        self.quality, self.maximize, self.options = quality, maximize, options
        self.values: dict[str, float] = dict(values or {})  # a trial reporting again (its worker rerun) replaces

    def report(self, trial: str, step: int, metrics: dict[str, float]) -> Verdict:
        """Record ``trial``'s quality at ``step`` (the end of its growing) and decide whether it goes on."""
        value = float(metrics[self.quality])
        self.values[trial] = value
        options = self.options
        proceed, cutoff = rung_rule(value, list(self.values.values()), options.keep, options.min_trials,
                                    self.maximize)
        if proceed:
            return Verdict(proceed=True)
        side = "below" if self.maximize else "above"
        reason = (f"{self.quality} {value:.4g} at step {step} is {side} the rung's best {options.keep:.0%} "
                  f"(cut-off {cutoff:.4g} over {len(self.values)} trials)")
        return Verdict(proceed=False, reason=reason)


def start_rung(cluster: Cluster, quality: str, maximize: bool, options: EarlyStopping | None,
               values: dict[str, float]) -> Any:
    """A stage's rung as a Ray actor on ``cluster``, holding ``values`` (what its trials reported there before a
    restart, by run id); None when early stopping is off (``options`` None)."""
    if options is None:
        return None
    return cluster.actor(Rung, quality, maximize, options, values)


@dataclass(frozen=True, kw_only=True)
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
        return RungReport(step=int(metrics[_RUNG_STEP]),
                          metrics={k.removeprefix(_RUNG): v for k, v in metrics.items() if k.startswith(_RUNG)})


class TrialStopped(Exception):
    """Raised on a trial's worker when its stage's rung stopped it: what it measured there, why, and when it trained
    (epoch seconds)."""

    def __init__(self, rung: RungReport, reason: str, interval: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__(rung, reason, interval)
        self.rung, self.reason, self.interval = rung, reason, interval

    def __str__(self) -> str:
        return self.reason


class RungClient:
    """A trial's side of its stage's rung (``rung``, the actor of :func:`start_rung`), the hook the PnG training
    calls when growing ends: it logs the task's metrics there on the trial's run, asks the rung, and keeps what it
    measured and why it was stopped. A rung that cannot be asked lets the trial go on, with a warning tag on its run.
    """

    def __init__(self, rung: Any, run_id: str, tracking: Tracking) -> None:
        self.rung, self.run_id, self.tracking = rung, run_id, tracking
        self.report: RungReport | None = None
        self.reason = ""

    def __call__(self, step: int, metrics: dict[str, float]) -> bool:
        self.report = RungReport(step=step, metrics=metrics)
        self.report.record(self.tracking, self.run_id)
        try:
            verdict = ask_actor(self.rung, "report", self.run_id, step, metrics)
        except ConnectionError as exc:
            self.tracking.log(self.run_id, tags={names.RUNG_WARNING: f"{exc}; the trial went on without its verdict"})
            return True
        if not verdict.proceed:
            self.reason = verdict.reason
            self.tracking.log(self.run_id, tags={names.STOPPED_EARLY: verdict.reason})
        return bool(verdict.proceed)

    def stopped(self, stop: StoppedEarly, started: float) -> TrialStopped:
        """What the trial's worker raises when the rung stopped its training (``stop``), which began at ``started``
        (epoch seconds)."""
        return TrialStopped(RungReport(step=stop.step, metrics=stop.metrics), self.reason or str(stop),
                            (started, time.time()))
