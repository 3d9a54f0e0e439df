from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import retime
from pngrow.pipeline import names
from pngrow.pipeline.tracking import Tracking
from pngrow.pipeline.cli import main as pngrow
from tests.tiny_models import TINY_RUN


@pytest.fixture(scope="module")
def stored_search(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tracking, str, dict[int, str]]:
    """A search run with an x3 stage of two trials, each with the checkpoint of a different tiny SISR model."""
    tmp_path = tmp_path_factory.mktemp("search")
    tracking = Tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", "pngrow")
    search = tracking.start_run("search", {names.KIND: names.Kind.SEARCH})
    stage = tracking.start_run("x3", {names.KIND: names.Kind.STAGE, names.TASK: "x3"}, parent=search)
    trials = {}
    for number, (shape, scope) in enumerate([("2x1024", "active"), ("4x4", "own")]):
        folder = tmp_path / f"model{number}"
        assert pngrow(["run", "--family", "sisr", "--tasks", "x2,x3", "--arch", "width=8", "--arch", "depth=1",
                       "--arch", "lr_patch=8", "--block-shape", shape, "--prune-scope", scope, "--out", str(folder),
                       *TINY_RUN]) == 0
        trials[number] = tracking.start_run(f"trial {number}", {names.KIND: names.Kind.TRIAL, names.TASK: "x3",
                                                               names.OPTUNA_TRIAL: number}, parent=stage)
        tracking.log_checkpoint(trials[number], folder)
        tracking.end_run(trials[number])
    return tracking, search, trials


def test_trials_are_timed_again_from_their_checkpoints_block_by_block(stored_search, tmp_path: Path, capsys) -> None:
    tracking, search, trials = stored_search
    times = retime.retime(tracking, search, "x3", [1, 0], size=24, blocks=3, rounds=2)
    assert [(t.trial, t.run_id) for t in times] == [(1, trials[1]), (0, trials[0])]
    assert all(len(t.speedups) == 3 and all(math.isfinite(s) and s > 0 for s in t.speedups) for t in times)

    out = tmp_path / "times.json"
    assert retime.main([search, "x3", "0", "--tracking-uri", tracking.uri, "--size", "24", "--blocks", "2",
                        "--rounds", "1", "--out", str(out)]) == 0
    assert "x3 trial 0: " in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert [w["trial"] for w in written] == [0] and len(written[0]["speedups"]) == 2


def test_a_speedup_is_the_dense_time_over_the_trials_in_each_block(stored_search, monkeypatch) -> None:
    tracking, search, _ = stored_search
    blocks = iter([{"0": 2.0, "1": 4.0, "dense": 8.0}, {"0": 8.0, "1": 2.0, "dense": 4.0}])
    seen = []

    def timed(calls, rounds, device):  # noqa: ANN001, ANN202 - median_latencies' signature
        seen.append((sorted(calls), rounds))
        for call in calls.values():
            call()  # each is a model on its latency input
        return next(blocks)

    monkeypatch.setattr(retime, "median_latencies", timed)
    times = retime.retime(tracking, search, "x3", [0, 1], size=24, blocks=2, rounds=7)
    assert seen == [(["0", "1", "dense"], 7)] * 2
    assert [t.speedups for t in times] == [[4.0, 0.5], [2.0, 2.0]] and times[0].median == 2.25


@pytest.mark.parametrize("args, message", [
    (["x3", "7"], "trial 7 is not a finished trial of stage 'x3' (finished: 0, 1)"),
    (["x4", "0"], "has no stage for task 'x4'"),
    (["x3", "0", "--blocks", "0"], "--blocks 0 must be at least 1"),
    (["x3", "0", "--size", "0"], "--size 0 must be at least 1"),
])
def test_a_bad_trial_task_or_count_is_one_line(stored_search, capsys, args: list[str], message: str) -> None:
    tracking, search, _ = stored_search
    with pytest.raises(SystemExit) as ended:
        retime.main([search, *args, "--tracking-uri", tracking.uri])
    assert ended.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_an_unknown_search_is_one_line(stored_search, capsys) -> None:
    tracking, _, _ = stored_search
    with pytest.raises(SystemExit) as ended:
        retime.main(["0" * 32, "x3", "0", "--tracking-uri", tracking.uri])
    assert ended.value.code == 2
    assert f"run '{'0' * 32}' does not exist at" in capsys.readouterr().err.strip().splitlines()[-1]
