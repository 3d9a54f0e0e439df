"""Early stopping: asynchronous successive halving (ASHA) with one rung, at the end of growing.

Each trial of a stage reports its quality at the rung as it reaches it, and goes on only while that value is among
the best ``keep`` fraction of the values the rung has had so far (its own included: ASHA's rule), so trials running
at the same time judge each other. The rung of a stage lives in one small Ray actor (created by
:meth:`pngrow.pipeline.cluster.Cluster.actor`, asked by :func:`pngrow.pipeline.cluster.ask_actor`); :class:`Rung`
itself is plain Python.

The rung is the end of growing, whatever the trial's ``grow_steps``: where a space searches ``grow_steps``, trials
that grew longer are compared with ones that grew less. It sees the task before pruning, so not what a trial's
``prune_ratio`` will cost it; and which trials it stops depends on the order in which they reach it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .config import EarlyStopping

__all__ = ["Rung", "Verdict", "rung_rule"]


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


@dataclass(frozen=True)
class Verdict:
    """The rung's answer to one trial: whether it goes on, and why not ('' when it does)."""

    proceed: bool
    reason: str = ""


class Rung:
    """One stage's rung: the value each trial (by its run id) reported there, and the verdict on every report.

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
            return Verdict(True)
        return Verdict(False, f"{self.quality} {value:.4g} at step {step} is {'below' if self.maximize else 'above'} "
                              f"the rung's best {options.keep:.0%} (cut-off {cutoff:.4g} over {len(self.values)} "
                              "trials)")
