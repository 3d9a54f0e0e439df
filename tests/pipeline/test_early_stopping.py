"""Early stopping (ASHA, one rung at the end of growing): the rule, its config, its actor, and a real local search
whose rung stops trials: PRUNED in Optuna with the value at the rung, KILLED in MLflow with the reason, never
chosen, and kept as ended by a resume."""

from __future__ import annotations

import json
import math
import pickle
import re
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from pngrow.errors import ConfigError
from pngrow.pipeline import names
from pngrow.pipeline.cli import main
from pngrow.pipeline.cluster import Cluster, ask_actor
from pngrow.pipeline.config import EarlyStopping, RayOptions, flat_params, load_config
from pngrow.pipeline.early_stopping import Rung, RungReport, TrialStopped, Verdict, rung_rule

REASON = re.compile(r"^psnr [\d.]+ at step 30 is below the rung's best 50% \(cut-off [\d.]+ over \d trials\)$")


def test_the_rung_keeps_the_best_fraction_of_what_it_has_seen_in_the_quality_direction() -> None:
    values = [30.0, 29.0, 28.0, 27.0, 26.0]
    # Five values, keep 0.5: the best two go on (floor(2.5) = 2); a tie with the cut-off goes on.
    assert [rung_rule(v, values, 0.5, 2, maximize=True)[0] for v in values] == [True, True, False, False, False]
    assert rung_rule(28.0, values, 0.5, 2, maximize=True)[1] == 29.0
    # Minimised (a rate-distortion loss): the lowest two go on.
    assert [rung_rule(v, values, 0.5, 2, maximize=False)[0] for v in values] == [False, False, False, True, True]
    # At least one value always goes on, fewer than min_trials all go on, NaN ranks worst and never goes on.
    assert rung_rule(27.0, [27.0, 30.0], 0.1, 2, True) == (False, 30.0)
    assert rung_rule(1.0, [1.0, 30.0, 40.0], 0.5, 4, True)[0]
    assert rung_rule(math.nan, [math.nan, 30.0], 0.5, 2, True) == (False, 30.0)
    assert rung_rule(30.0, [math.nan, 30.0], 0.5, 2, True) == (True, 30.0)


def test_a_rung_judges_each_report_against_every_one_before_it() -> None:
    rung = Rung("rd_loss", False, EarlyStopping(keep=0.5, min_trials=3), {"old": 10.0})
    assert rung.report("a", 250, {"rd_loss": 20.0, "psnr": 30.0}) == Verdict(proceed=True)  # 2 values < min_trials
    stopped = rung.report("b", 250, {"rd_loss": 15.0})
    assert stopped == Verdict(proceed=False,
                              reason="rd_loss 15 at step 250 is above the rung's best 50% (cut-off 10 over 3 trials)")
    assert rung.report("a", 250, {"rd_loss": 9.0}).proceed and len(rung.values) == 3  # a rerun replaces its value


def test_the_early_stopping_budget_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "search.yaml"
    path.write_text("family: sisr\ntasks: [x2]\n")
    assert load_config(path).early_stopping is None
    path.write_text("family: sisr\ntasks: [x2]\nbudget: {early_stopping: {}}\n")
    assert load_config(path).early_stopping == EarlyStopping(keep=0.5, min_trials=2)
    path.write_text("family: sisr\ntasks: [x2]\nbudget: {early_stopping: {keep: 0.25, min_trials: 4}}\n")
    config = load_config(path)
    assert config.early_stopping == EarlyStopping(keep=0.25, min_trials=4)
    assert {k: v for k, v in flat_params(config).items() if "early" in k} == {"early_stopping.keep": 0.25,
                                                                               "early_stopping.min_trials": 4}
    for text, message in (("{keep: 1}", "field 'keep' is 1.0, must be between 0 and 1"),
                          ("{keep: 0}", "field 'keep' is 0.0, must be between 0 and 1"),
                          ("{keep: half}", "field 'keep' is 'half', not float"),
                          ("{min_trials: 0}", "field 'min_trials' is 0, must be at least 1"),
                          ("{rung: 300}", "early_stopping': unknown field 'rung' \\(known: keep, min_trials\\)"),
                          ("true", "early_stopping': expected a mapping of fields, got bool")):
        path.write_text(f"family: sisr\ntasks: [x2]\nbudget: {{early_stopping: {text}}}\n")
        with pytest.raises(ConfigError, match=message) as info:
            load_config(path)
        assert "budget field 'early_stopping'" in str(info.value) and "\n" not in str(info.value)


def test_a_stopped_trial_crosses_process_boundaries_whole() -> None:
    report = RungReport(step=30, metrics={"psnr": 27.5})
    stop = pickle.loads(pickle.dumps(TrialStopped(report, "psnr 27.5 at step 30 is below", (1.0, 2.0))))
    assert (stop.rung, stop.reason, stop.interval) == (RungReport(step=30, metrics={"psnr": 27.5}),
                                                       "psnr 27.5 at step 30 is below", (1.0, 2.0))
    assert str(stop) == "psnr 27.5 at step 30 is below"


def test_the_rung_actor_answers_workers_and_a_gone_one_is_one_line(joined_ray) -> None:
    cluster = Cluster(RayOptions(num_cpus=1))
    try:
        rung = cluster.actor(Rung, "psnr", True, EarlyStopping(), {"a": 30.0})
        assert ask_actor(rung, "report", "b", 30, {"psnr": 31.0}) == Verdict(proceed=True)
        cluster.end_actor(rung)
        cluster.end_actor(rung)  # twice is fine
        # Ray kills an actor asynchronously: a call sent at once may still be answered, so ask until it is gone.
        deadline = time.monotonic() + 30
        with pytest.raises(ConnectionError, match=r"^actor call report failed: \w+") as info:
            while time.monotonic() < deadline:
                ask_actor(rung, "report", "c", 30, {"psnr": 31.0}, timeout=20)
                time.sleep(0.2)
        assert "\n" not in str(info.value)
    finally:
        cluster.close()


def _search(folder: Path, trials: int) -> Path:
    """A one-stage SISR search in ``folder`` whose first trial (the defaults) learns fastest: later trials are
    sampled at lower learning rates, so the rung, which compares them after 30 growing steps, stops some."""
    (folder / "space.yaml").write_text(
        "family: sisr\nparameters:\n  lr: {type: float, low: 1.0e-5, high: 3.0e-3, log: true, default: 3.0e-3}\n"
        "fixed: {grow_steps: 30, prune_steps: 6, finetune_steps: 4, batch_size: 2}\n")
    path = folder / "search.yaml"
    path.write_text(
        "name: early\nfamily: sisr\ntasks: [x2]\narch: {width: 8, depth: 1, lr_patch: 12}\ndata: {eval_limit: 1}\n"
        f"search_space: space.yaml\nbudget: {{trials_per_stage: {trials}, parallel_trials: 1,\n"
        "  early_stopping: {keep: 0.5, min_trials: 2}}\nselect: {rule: best_quality}\n")
    return path


def test_a_search_with_early_stopping_prunes_records_and_never_chooses_stopped_trials(
        joined_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["search", str(_search(tmp_path, 4)), "--json", "summary.json", "--quiet"]) == 0
    summary = json.loads(Path("summary.json").read_text())
    [stage] = summary["stages"]
    assert summary["trials"] == 4
    assert stage["stopped_early"] >= 1 and stage["finished"] + stage["stopped_early"] == 4
    runs = tmp_path / "pngrow-runs"
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    trials = {t.info.run_id: t for t in client.search_runs(
        [client.get_run(stage["run_id"]).info.experiment_id], f"tags.`mlflow.parentRunId` = '{stage['run_id']}'")}
    stopped = [t for t in trials.values() if t.info.status == "KILLED"]
    assert len(stopped) == stage["stopped_early"] and len(trials) == 4
    for run in stopped:  # the reason, what it measured at the rung, and no checkpoint
        assert REASON.match(run.data.tags[names.STOPPED_EARLY]), run.data.tags[names.STOPPED_EARLY]
        assert run.data.metrics["rung_step"] == 30 and "rung/psnr" in run.data.metrics
        assert "density" not in run.data.metrics
        assert not client.list_artifacts(run.info.run_id, "checkpoint")
    assert trials[stage["chosen_trial_run"]].info.status == "FINISHED"
    assert "outside the best 50% of the stage's so far stops there" in client.get_run(
        summary["search_id"]).data.tags["mlflow.note.content"]
    stage_run = client.get_run(stage["run_id"])
    assert stage_run.data.metrics["trials_stopped_early"] == len(stopped)
    assert stage_run.data.metrics["trials_finished"] == 4 - len(stopped)
    # Optuna: PRUNED with the value at the rung and the reason; finished trials carry their rung value too.
    [summary] = optuna.get_all_study_summaries(f"sqlite:///{runs / 'optuna.db'}")
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{runs / 'optuna.db'}")
    by_run = {t.user_attrs["mlflow_run_id"]: t for t in study.trials}
    for run_id, run in trials.items():
        trial = by_run[run_id]
        assert trial.user_attrs["rung_psnr"] == pytest.approx(run.data.metrics["rung/psnr"])
        assert trial.user_attrs["rung_step"] == 30
        if run.info.status == "KILLED":
            assert trial.state == optuna.trial.TrialState.PRUNED and trial.values is None
            assert trial.user_attrs["stopped_early"] == run.data.tags[names.STOPPED_EARLY]
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE
    _a_resume_keeps_stopped_trials_as_ended(tmp_path, client, stage["run_id"], trials, study)


def _a_resume_keeps_stopped_trials_as_ended(folder: Path, client: mlflow.MlflowClient, stage_run: str,
                                            trials: dict, study: optuna.Study) -> None:
    """What ``pngrow resume`` makes of the stage's trials: the stopped ones ended, not cut off nor re-run, and
    the rung seeded with every value it had."""
    from pngrow.pipeline.plan import SearchContext, prepare
    from pngrow.pipeline.resume import recover_trials
    from pngrow.pipeline.tracking import Tracking

    config = load_config(folder / "search.yaml", {"workdir": str(folder / "pngrow-runs")})
    tracking = Tracking(config.resolved_tracking_uri(), config.experiment, config.local_artifact_root())
    ctx = SearchContext(prepare(config), tracking, None, "", lambda line: None)  # type: ignore[arg-type]
    recovered = recover_trials(ctx, study, stage_run)
    stopped = {r for r, t in trials.items() if t.info.status == "KILLED"}
    assert recovered.stopped == len(stopped) and recovered.failed == 0
    assert {o.run_id for o in recovered.outcomes.values()} == set(trials) - stopped
    assert recovered.rung_values == pytest.approx({r: t.data.metrics["rung/psnr"] for r, t in trials.items()})
    after = {r: client.get_run(r) for r in trials}
    assert all(after[r].info.status == t.info.status and names.ERROR not in after[r].data.tags
               for r, t in trials.items())


def test_a_trial_whose_rung_cannot_be_asked_goes_on_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from pngrow.pipeline import early_stopping

    logged: list[dict] = []

    class Tracking:
        def log(self, run_id: str, **fields) -> None:  # noqa: ANN003
            logged.append(fields)

    def gone(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ConnectionError("actor call report failed: RayActorError: The actor died")

    monkeypatch.setattr(early_stopping, "ask_actor", gone)
    client = early_stopping.RungClient(object(), "run", Tracking())  # type: ignore[arg-type]
    assert client(30, {"psnr": 27.0}) is True and client.report == RungReport(step=30, metrics={"psnr": 27.0})
    assert logged[0] == {"metrics": {"rung/psnr": 27.0, "rung_step": 30}, "step": 30}
    assert logged[1] == {"tags": {names.RUNG_WARNING: "actor call report failed: RayActorError: The actor died; the "
                                                      "trial went on without its verdict"}}
