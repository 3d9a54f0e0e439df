"""Time a stage's trials again from their checkpoints, side by side with the dense model, in blocks of rounds: is
one trial faster than another beyond timing noise? A search times each trial once, in its own process; this times
them all in one process, in turns, ``--blocks`` times, and prints each block's speedup.

    python -m bench.retime tiny-sisr-latency x3 4 5 --tracking-uri sqlite:///pngrow-runs/mlflow.db
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from mlflow.exceptions import MlflowException

from pngrow.errors import failure_line
from pngrow.pipeline import names
from pngrow.pipeline.config import tracking_uri
from pngrow.pipeline.registry import resolve_run
from pngrow.pipeline.tracking import Tracking
from pngrow.workers.latency import compacted_and_dense, median_latencies
from pngrow.workers.models import load_model
from pngrow.workers.png import CompactionMismatch

from . import require_at_least

__all__ = ["TrialTimes", "main", "retime"]


@dataclass(frozen=True)
class TrialTimes:
    """One trial's compacted task against the dense model: the speedup in each block of interleaved rounds."""

    trial: int
    run_id: str
    speedups: list[float]

    @property
    def median(self) -> float:
        """The median of the blocks' speedups."""
        return statistics.median(self.speedups)


def _trial_runs(tracking: Tracking, search: str, task: str) -> dict[int, str]:
    """Optuna trial number -> run id, for the finished trials of ``task``'s stage in ``search`` (an id or a name)."""
    run = resolve_run(tracking, search)
    stages = [s for s in tracking.children(run, names.Kind.STAGE) if s.data.tags.get(names.TASK) == task]
    if not stages:
        raise ValueError(f"search {search!r} has no stage for task {task!r}")
    return {int(t.data.tags[names.OPTUNA_TRIAL]): t.info.run_id for t in tracking.children(stages[0], names.Kind.TRIAL)
            if t.info.status == "FINISHED" and names.OPTUNA_TRIAL in t.data.tags}


def retime(tracking: Tracking, search: str, task: str, trials: Sequence[int], size: int | None = None,
           blocks: int = 5, rounds: int = 60) -> list[TrialTimes]:
    """Each trial's compacted ``task`` in ``search`` (an id or a name), checked against its masked model, and the
    first trial's dense model, timed in turns on the family's latency input of side ``size``: ``blocks`` medians
    of ``rounds`` rounds each.

    Example: ``retime(Tracking("sqlite:///pngrow-runs/mlflow.db"), "tiny-sisr-latency", "x3", [4, 5])``.
    """
    if blocks < 1 or rounds < 1:
        raise ValueError(f"blocks {blocks} and rounds {rounds} must both be at least 1")
    runs = _trial_runs(tracking, search, task)
    missing = [n for n in trials if n not in runs]
    if missing:
        raise ValueError(f"trial {missing[0]} is not a finished trial of stage {task!r} (finished: "
                         f"{', '.join(map(str, sorted(runs))) or 'none'})")
    calls: dict[str, Callable[[], object]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for number in trials:
            family, shared = load_model(tracking.download_checkpoint(runs[number], Path(folder) / str(number)))
            inputs = family.latency_inputs(size)
            compact, dense = compacted_and_dense(shared.eval(), task, inputs)
            calls[str(number)] = lambda compact=compact, inputs=inputs: compact(*inputs)
            calls.setdefault("dense", lambda dense=dense, inputs=inputs: dense(*inputs))
    timed = [median_latencies(calls, rounds, torch.device("cpu")) for _ in range(blocks)]
    return [TrialTimes(n, runs[n], [block["dense"] / block[str(n)] for block in timed]) for n in trials]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.retime", description=__doc__.split("\n\n")[0])
    parser.add_argument("search", help="the search's run id, or its name (its newest finished run)")
    parser.add_argument("task", help="the stage's task, e.g. x3")
    parser.add_argument("trials", type=int, nargs="+", help="Optuna trial numbers of that stage")
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else ./pngrow-runs")
    parser.add_argument("--size", type=int, default=None, help="side of the latency input (default: the family's)")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=60, help="interleaved rounds per block")
    parser.add_argument("--out", type=Path, default=None, help="also write the speedups here as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Print each trial's speedup per block, and its median."""
    parser = _parser()
    args = parser.parse_args(argv)
    require_at_least(parser, args, 1, "blocks", "rounds", "size")
    try:
        times = retime(Tracking(tracking_uri(args.tracking_uri)), args.search, args.task, args.trials, args.size,
                       args.blocks, args.rounds)
    except (ValueError, CompactionMismatch, MlflowException) as error:
        parser.exit(2, f"python -m bench.retime: {failure_line(error)}\n")
    for t in times:
        print(f"{args.task} trial {t.trial}: {t.median:.2f}x (blocks: {' '.join(f'{s:.2f}' for s in t.speedups)})")
    if args.out is not None:
        args.out.write_text(json.dumps([{**asdict(t), "median": t.median} for t in times], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
