"""The embedded default: the README's tiny search with in-process Ray, MLflow in SQLite and Optuna in SQLite."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import ray
import skimage.data
import torch
import yaml
from PIL import Image

from pngrow.pipeline.cli import main
from pngrow.pipeline.search import union_seconds
from pngrow.pipeline.shared_model import _image_array
from pngrow.workers.data import default_images
from pngrow.workers.models import get_family, load_model

EXAMPLE = Path(__file__).parents[2] / "search_spaces" / "examples" / "tiny-sisr.yaml"


def test_union_of_training_intervals() -> None:
    assert union_seconds([]) == 0
    assert union_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7)]) == 4.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("family: sisr\ntasks: [x2]\nsearch_space: nic-tiny", "search space 'nic-tiny' is for family 'nic', not 'sisr'"),
        ("family: sisr\ntasks: [x2]\nobjectives: {quality: ssim}", "quality objective 'ssim' is not one of sisr's"),
        ("family: sisr\ntasks: [x2]\nselect: {rule: cheapest}", "selection rule 'cheapest' is not one of"),
        ("family: sisr\ntasks: [x2, x5]", "SISR task 'x5' is not one of x2, x3, x4, x8"),
        ("family: sisr\ntasks: [x2]\ndata: {train: /no/such/folder}", "data train: image folder '/no/such/folder' does"),
        ("family: sisr\ntasks: [x2]\narch: {widht: 8}", "unknown sisr architecture option 'widht'"),
    ],
)
def test_bad_searches_fail_before_any_service_starts(tmp_path: Path, capsys, config: str, message: str) -> None:
    path = tmp_path / "search.yaml"
    path.write_text(config)
    assert main(["search", str(path), "--workdir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_unreadable_training_images_are_refused_before_the_search_starts(tmp_path: Path, capsys) -> None:
    data = tmp_path / "train"
    data.mkdir()
    Image.new("RGB", (64, 64)).save(data / "good.png")
    (data / "cut.png").write_bytes((data / "good.png").read_bytes()[:40])
    (tmp_path / "search.yaml").write_text(f"family: sisr\ntasks: [x2]\ndata: {{train: {data}}}\n")
    assert main(["search", str(tmp_path / "search.yaml"), "--workdir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"data train: cannot read image '{data / 'cut.png'}'" in err and err.count("\n") == 1
    (data / "cut.png").unlink()
    (data / "notes.txt").write_text("not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "search.yaml").write_text(f"family: sisr\ntasks: [x2]\ndata: {{eval: {empty}}}\n")
    assert main(["search", str(tmp_path / "search.yaml"), "--workdir", str(tmp_path / "runs")]) == 2
    assert "data eval: image folder" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_block_shape_larger_than_the_model_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "space.yaml").write_text("family: sisr\nparameters: {}\nfixed: {block_shape: 32x32}\n")
    (tmp_path / "search.yaml").write_text(f"family: sisr\ntasks: [x2]\narch: {{width: 16}}\n"
                                          f"search_space: {tmp_path / 'space.yaml'}\n")
    assert main(["search", str(tmp_path / "search.yaml"), "--workdir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert ("block shape 32x32 does not fit the sisr model: every shared layer would be one block (e.g. 'head', 16x3 "
            "channels)") in err
    assert not (tmp_path / "runs").exists()


def test_status_and_promote_without_a_store_say_so(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["status", "--workdir", str(tmp_path)]) == 2
    assert "no pngrow tracking store" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's tiny search, run once in a folder of its own (``pngrow-runs/``, ``summary.json``)."""
    assert not ray.is_initialized(), "the embedded default starts its own Ray"
    folder = tmp_path_factory.mktemp("tiny-search")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(folder)
        assert main(["search", str(EXAMPLE), "--json", "summary.json"]) == 0
    return folder


@pytest.mark.slow
def test_tiny_search_runs_embedded(tiny_search: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    tmp_path = tiny_search
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    summary = json.loads(Path("summary.json").read_text())
    assert summary["trials"] == 6 and 0 <= summary["overhead"] < 1
    # Where the wall time went, part by part, every part of it.
    phases = summary["phase_seconds"]
    assert list(phases) == ["setup", "ray", "search run", "stage x2", "stage x3", "final check", "model"]
    assert all(s > 0 for s in phases.values()) and sum(phases.values()) == pytest.approx(summary["wall_seconds"], abs=1)
    runs = tmp_path / "pngrow-runs"
    checkpoints = list((runs / "artifacts").glob("*/artifacts/checkpoint/weights.safetensors"))
    assert len(checkpoints) == 6 + 2  # every trial and every stage
    studies = optuna.get_all_study_summaries(f"sqlite:///{runs / 'optuna.db'}")
    assert sorted(s.n_trials for s in studies) == [3, 3]
    # The drift check ran: every earlier task is unchanged on the final model.
    for stage in summary["stages"]:
        assert summary["final_metrics"][stage["task"]]["psnr"] == stage["metrics"]["psnr"]
    # Each stage's figure is its checkpoint's: evaluated again here, in this process, on the same images.
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    evaluation = default_images("eval").limit(yaml.safe_load(EXAMPLE.read_text())["data"]["eval_limit"])
    for stage in summary["stages"]:
        checkpoint = client.download_artifacts(stage["run_id"], "checkpoint", str(tmp_path / stage["run_id"]))
        family, shared = load_model(checkpoint)
        evaluated = family.evaluate(shared.eval(), stage["task"], evaluation)["psnr"]
        assert stage["metrics"]["psnr"] == pytest.approx(evaluated, abs=1e-3)
    # The first stage grows from scratch, the second adds x3 at a lower cost than two separate models: the shared
    # model stores fewer parameters than a dense x2 model and a dense x3 model of the same size, counted here.
    arch = yaml.safe_load(EXAMPLE.read_text())["arch"]
    separate = sum(sum(p.numel() for p in get_family("sisr", [task], **arch).build_model().parameters())
                   for task in ("x2", "x3"))
    assert summary["stages"][0]["stored_params"] < summary["stages"][1]["stored_params"] < separate
    # What a reviewer sees in the MLflow UI: a model-training experiment, a described search, each trial's datasets.
    search = client.get_run(summary["search_id"])
    assert client.get_experiment(search.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert "searches `prune_ratio`" in search.data.tags["mlflow.note.content"]
    trial = client.get_run(summary["stages"][0]["chosen_trial_run"])
    # It logged how long after it began its first step was done (data, model and all) and its evaluation's time.
    times = trial.data.metrics
    assert 0 < times["first_step_seconds"] < times["trial_seconds"] and 0 < times["eval_seconds"] < times["trial_seconds"]
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in trial.inputs.dataset_inputs}
    assert inputs["training"].digest == default_images("train").digest
    assert inputs["evaluation"].digest == evaluation.digest and "skimage.data" in inputs["evaluation"].source
    for run in (search, client.get_run(summary["stages"][1]["run_id"])):  # shown on the stage and search rows too
        assert {d.dataset.digest for d in run.inputs.dataset_inputs} == {inputs["training"].digest, evaluation.digest}
    capsys.readouterr()

    assert main(["status"]) == 0
    assert "tiny-sisr" in capsys.readouterr().out
    assert main(["promote", "tiny-sisr", "--name", "sisr-local", "--alias", "v1"]) == 2
    assert "alias 'v1'" in capsys.readouterr().err
    assert main(["promote", "tiny-sisr", "--name", "sisr-local"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/sisr-local@champion")
    image = skimage.data.chelsea()[:40, :50]
    for task, scale in (("x2", 2), ("x3", 3)):
        assert _image_array(model.predict({"task": task, "image": image})["image"][0]).shape == (40 * scale, 50 * scale, 3)
    with pytest.raises(ValueError, match="task 'x4' is not one of this model's tasks: x2, x3"):
        model.predict({"task": "x4", "image": image})
    assert np.asarray(image).dtype == np.uint8


@pytest.mark.slow
def test_an_earlier_task_changed_in_the_final_model_fails_the_final_check(tiny_search: Path, joined_ray, monkeypatch,
                                                                          capsys) -> None:
    """One weight of x2's own tail moved by one float step in the final checkpoint (x3's stage): x2's fingerprint
    changes, too little for its PSNR to drift, and the final check of a resumed search refuses the model by name.
    (It changes the tiny search's store: after the test above.)"""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tiny_search)
    summary = json.loads(Path("summary.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{tiny_search / 'pngrow-runs' / 'mlflow.db'}")
    final = client.get_run(summary["stages"][-1]["run_id"])
    checkpoint = Path(final.info.artifact_uri.removeprefix("file://")) / "checkpoint"
    family, shared = load_model(checkpoint)
    committed = shared.fingerprint("x2")
    assert committed == client.get_run(summary["search_id"]).data.tags["pngrow.fingerprint.x2"]
    name, weight = next((n, t) for n, t in sorted(shared.head_tensors("x2").items()) if t.is_floating_point())
    with torch.no_grad():
        flat = weight.view(-1)
        flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))
    family.save(shared, checkpoint)
    assert load_model(checkpoint)[1].fingerprint("x2") != committed, name
    # The driver died before its final check: the search is resumed from its committed stages.
    client.set_terminated(summary["search_id"], "FAILED")
    capsys.readouterr()
    assert main(["resume", summary["search_id"], "--quiet"]) == 2
    assert ("task 'x2' changed after later tasks were grown (its fingerprint differs)"
            in capsys.readouterr().err.strip().splitlines()[-1])
    assert client.get_run(summary["search_id"]).info.status == "FAILED"


@pytest.mark.slow
def test_latency_search_times_every_trial_and_hands_on_the_fastest(joined_ray, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text(
        "family: sisr\nparameters:\n"
        "  block_shape: {type: categorical, choices: ['4x4', '8x1024'], default: '8x1024'}\n"
        "  prune_scope: {type: categorical, choices: [own, active], default: active}\n"
        "fixed: {grow_steps: 30, prune_steps: 12, finetune_steps: 6, batch_size: 4, lr: 1.0e-3}\n")
    (tmp_path / "search.yaml").write_text(
        "name: tiny-latency\nfamily: sisr\ntasks: [x2, x3]\narch: {width: 16, depth: 2, lr_patch: 16}\n"
        "data: {eval_limit: 1}\nsearch_space: space.yaml\nbudget: {trials_per_stage: 3, parallel_trials: 1}\n"
        "objectives: {quality: psnr, cost: [latency, stored_params], latency: {size: 48, rounds: 3}}\n"
        "select: {rule: fastest_within, tolerance: 0.5}\nray: {cpus_per_trial: 2}\n")
    assert main(["search", "search.yaml", "--json", "summary.json"]) == 0
    summary = json.loads(Path("summary.json").read_text())
    runs = tmp_path / "pngrow-runs"
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    relative = []
    for stage in summary["stages"]:
        trials = client.search_runs([client.get_run(stage["run_id"]).info.experiment_id],
                                    f"tags.mlflow.parentRunId = '{stage['run_id']}'")
        assert len(trials) == 3
        figures = {t.info.run_id: t.data.metrics for t in trials}
        relative += [m["relative_latency"] for m in figures.values()]
        for metrics in figures.values():
            assert metrics["latency_ms"] > 0 and metrics["dense_latency_ms"] > 0
            assert metrics["speedup"] == pytest.approx(metrics["dense_latency_ms"] / metrics["latency_ms"])
            assert metrics["relative_latency"] == pytest.approx(1 / metrics["speedup"])
        # The rule's choice, computed here from the trials' own figures: the fastest against its own dense model
        # within 0.5 dB of the best.
        best = max(m["eval/psnr"] for m in figures.values())
        near = {run: m["relative_latency"] for run, m in figures.items() if m["eval/psnr"] >= best - 0.5}
        assert client.get_run(stage["run_id"]).data.tags["pngrow.chosen_trial_run"] == min(near, key=near.get)
    told = []
    for study in optuna.get_all_study_summaries(f"sqlite:///{runs / 'optuna.db'}"):
        loaded = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{runs / 'optuna.db'}")
        assert loaded.metric_names == ["psnr", "latency", "stored_params"]
        assert all(len(t.values) == 3 for t in loaded.trials)
        told += [t.values[1] for t in loaded.trials]  # the latency objective: relative to the dense model
    assert sorted(told) == pytest.approx(sorted(relative))
    search = client.get_run(summary["search_id"])
    pictures = client.list_artifacts(search.info.run_id, "report")
    assert {"report/pareto_x2.png", "report/pareto_x3.png"} <= {p.path for p in pictures}
