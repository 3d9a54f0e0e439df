from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.interpolate import PchipInterpolator

from bench import compare
from bench.compare import Budget, Row, main, run_benchmark
from pngrow.workers.data import ImageSet
from pngrow.workers.models import get_family
from pngrow.workers.png import model_cost


def _images(count: int, size: int, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    smooth = [torch.nn.functional.interpolate(torch.rand(1, 3, size // 8, size // 8, generator=g), size=(size, size),
                                              mode="bilinear")[0] for _ in range(count)]
    return ImageSet("smooth noise", tuple(f"im{i}" for i in range(count)),
                    tuple((s * 255).round().to(torch.uint8) for s in smooth))


TINY_SISR = Budget(("x2", "x4"), 3, 2, 5e-4, {"width": 8, "depth": 1, "lr_patch": 8}, None, 24, 2,
                   ("4x4", "2x1024", "2x1024/active"))
TINY_NIC = Budget(("q6", "q4", "q3", "q1"), 2, 2, 5e-4, {"N": 16, "M": 24, "patch": 64}, 1, 64, 2, ("4x1024",))


def test_every_system_is_measured_on_every_task_under_the_same_budget() -> None:
    rows, summary = run_benchmark("sisr", TINY_SISR, _images(2, 64), _images(2, 64, seed=1), log=lambda m: None)
    systems = ["separate", "png-4x4", "png-2x1024", "png-2x1024-active", "joint"]
    assert [(r.system, r.task) for r in rows] == [(s, t) for t in ("x2", "x4") for s in systems]
    for row in rows:
        assert math.isfinite(row.metrics["psnr"]) and 0 < row.metrics["ms_ssim"] <= 1
        assert row.latency_ms > 0 and row.macs > 0
        if row.system.startswith("png"):
            assert row.compact_max_error is not None and row.compact_max_error < 1e-4
            assert row.compact_latency_ms > 0 and row.macs <= row.compact_macs <= row.extra["dense_macs"]
    entry = summary["systems"]
    assert entry["separate"]["stored_vs_one_dense"] == pytest.approx(2.0, rel=0.01)
    assert entry["png-4x4"]["stored_params"] < entry["separate"]["stored_params"]
    by = {(r.system, r.task): r.metrics["psnr"] for r in rows}
    for system in systems:
        expected = {t: by[system, t] - by["separate", t] for t in ("x2", "x4")}
        assert entry[system]["psnr_delta"] == pytest.approx(expected)
    assert set(entry["png-2x1024"]["compact_speedup"]) == {"x2", "x4"}
    # The active scope leaves the later task (x4) half of the body's rows to compute; "own" lets it reuse them all.
    density = {(r.system, r.task): r.extra["density"] for r in rows if r.system.startswith("png")}
    assert density["png-2x1024-active", "x4"] == pytest.approx(0.5, abs=0.05)
    assert density["png-2x1024-active", "x4"] < density["png-2x1024", "x4"]


def test_a_spec_pruned_alone_trains_a_model_per_task_and_stores_them_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """``+alone``: the PnG spec's pruning, each task in a model of its own sharing nothing, so its storage is the sum
    of one pruned model per task and each task keeps half of its own model's blocks."""
    trained: list[tuple[list[str], object]] = []
    real = compare.train_shared

    def recording(family, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        job = real(family, *args, **kwargs)
        trained.append((list(family.tasks), job))
        return job

    monkeypatch.setattr(compare, "train_shared", recording)
    budget = replace(TINY_SISR, block_shapes=("2x1024/active", "2x1024/active+alone"))
    rows, summary = run_benchmark("sisr", budget, _images(2, 64), _images(2, 64, seed=1), log=lambda m: None)
    assert [tasks for tasks, _ in trained] == [["x2"], ["x4"], ["x2", "x4"], ["x2"], ["x4"]]
    alone = summary["systems"]["png-2x1024-active-alone"]
    assert alone["stored_params"] == sum(model_cost(job.shared).stored_params for _, job in trained[3:])
    assert alone["stored_params"] > summary["systems"]["png-2x1024-active"]["stored_params"]  # two heads, two bodies
    for row in (r for r in rows if r.system == "png-2x1024-active-alone"):
        assert row.extra["density"] == pytest.approx(0.5, abs=0.05) and row.compact_max_error < 1e-4, row.task


def _bjontegaard_rate(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> float:
    """BD-rate in percent computed here: log-rate as a monotone piecewise cubic (PCHIP) of quality for each curve,
    integrated exactly over the quality range both cover; NaN where a curve's quality does not rise with its rate."""
    logs = []
    for points in (anchor, test):
        rates, quality = np.array(sorted(points)).T
        if (np.diff(quality) <= 0).any():
            return math.nan
        logs.append(PchipInterpolator(quality, np.log(rates)))
    low = max(min(q for _, q in anchor), min(q for _, q in test))
    high = min(max(q for _, q in anchor), max(q for _, q in test))
    mean_log_ratio = (logs[1].integrate(low, high) - logs[0].integrate(low, high)) / (high - low)
    return 100 * (math.exp(mean_log_ratio) - 1)


def _curve(rows: list[Row], system: str, metric: str) -> list[tuple[float, float]]:
    quality = lambda m: -10 * math.log10(1 - m[metric]) if metric == "ms_ssim" else m[metric]  # noqa: E731 - in dB
    return [(r.metrics["bpp"], quality(r.metrics)) for r in rows if r.system == system]


def test_nic_is_compared_by_bd_rate_from_real_bitstreams() -> None:
    rows, summary = run_benchmark("nic", TINY_NIC, _images(2, 64), _images(2, 64, seed=1), log=lambda m: None)
    assert {r.system for r in rows} == {"separate", "png-4x1024", "joint"}
    assert all(r.metrics["bpp"] > 0 for r in rows)
    # Every system's BD-rate against the separate models is the one computed here from the measured rows. Two
    # steps of training do not order four rates: there it is NaN, which a finite figure would hide (the budgets
    # that order them train for minutes; the known values are checked below, on curves built for them).
    for system, entry in summary["systems"].items():
        for metric in ("psnr", "ms_ssim"):
            expected = _bjontegaard_rate(_curve(rows, "separate", metric), _curve(rows, system, metric))
            assert entry[f"bd_rate_{metric}"] == pytest.approx(expected, rel=1e-9, nan_ok=True), (system, metric)


def _row(system: str, task: str, **metrics: float) -> Row:
    return Row(system, task, metrics, macs=1, latency_ms=1.0, stored_params=1, dense_params=1)


def test_a_png_model_0_3_db_below_the_separate_ones_has_a_psnr_delta_of_minus_0_3() -> None:
    rows = [_row("separate", "x2", psnr=34.0), _row("separate", "x4", psnr=28.5),
            _row("png-4x4", "x2", psnr=33.7), _row("png-4x4", "x4", psnr=28.5)]
    summary = compare._summary(get_family("sisr", ["x2", "x4"]), rows, {"separate": 2, "png-4x4": 1}, 1,
                               {"separate": 1.0, "png-4x4": 1.0})
    assert summary["systems"]["png-4x4"]["psnr_delta"] == pytest.approx({"x2": -0.3, "x4": 0.0})
    assert summary["systems"]["separate"]["psnr_delta"] == {"x2": 0.0, "x4": 0.0}


@pytest.mark.parametrize(("factor", "expected"), [(0.9, -10.0), (1.25, 25.0)])
def test_a_codec_spending_a_known_share_of_the_rate_has_that_bd_rate(factor: float, expected: float) -> None:
    anchor = [(0.2, 28.0, 0.90), (0.4, 31.0, 0.94), (0.7, 33.5, 0.96), (1.1, 35.5, 0.975)]  # bpp, PSNR, MS-SSIM
    tasks = ("q6", "q4", "q3", "q1")
    rows = [_row("separate", t, bpp=b, psnr=p, ms_ssim=m) for t, (b, p, m) in zip(tasks, anchor)]
    rows += [_row("png-4x1024", t, bpp=factor * b, psnr=p, ms_ssim=m) for t, (b, p, m) in zip(tasks, anchor)]
    summary = compare._summary(get_family("nic", list(tasks)), rows, {"separate": 4, "png-4x1024": 1}, 1,
                               {"separate": 1.0, "png-4x1024": 1.0})
    png = summary["systems"]["png-4x1024"]
    assert png["bd_rate_psnr"] == pytest.approx(expected) and png["bd_rate_ms_ssim"] == pytest.approx(expected)
    assert summary["systems"]["separate"]["bd_rate_psnr"] == pytest.approx(0.0, abs=1e-9)


def test_a_codec_whose_curve_is_no_rate_scaling_has_the_bjontegaard_integrals_bd_rate() -> None:
    anchor = [(0.2, 28.0, 0.90), (0.4, 31.0, 0.94), (0.7, 33.5, 0.96), (1.1, 35.5, 0.975)]  # bpp, PSNR, MS-SSIM
    other = [(0.15, 27.5, 0.89), (0.35, 30.8, 0.935), (0.66, 33.9, 0.962), (1.0, 36.1, 0.978)]
    tasks = ("q6", "q4", "q3", "q1")
    rows = [_row("separate", t, bpp=b, psnr=p, ms_ssim=m) for t, (b, p, m) in zip(tasks, anchor)]
    rows += [_row("png-4x1024", t, bpp=b, psnr=p, ms_ssim=m) for t, (b, p, m) in zip(tasks, other)]
    summary = compare._summary(get_family("nic", list(tasks)), rows, {"separate": 4, "png-4x1024": 1}, 1,
                               {"separate": 1.0, "png-4x1024": 1.0})
    for metric in ("psnr", "ms_ssim"):
        expected = _bjontegaard_rate(_curve(rows, "separate", metric), _curve(rows, "png-4x1024", metric))
        assert math.isfinite(expected) and expected < 0  # less rate at equal quality
        assert summary["systems"]["png-4x1024"][f"bd_rate_{metric}"] == pytest.approx(expected, rel=1e-9)


def test_main_writes_parquet_markdown_json_and_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(compare.BUDGETS, ("sisr", "quick"), TINY_SISR)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, image in zip(("a", "b"), _images(2, 64).images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{name}.png")
    out = tmp_path / "out"
    assert main(["sisr", "--budget", "quick", "--train", str(folder), "--eval", str(folder), "--out", str(out),
                 "--reuse-penalty", "0.5"]) == 0
    table = pd.read_parquet(out / "sisr-quick.parquet")
    assert len(table) == 10 and {"psnr", "ms_ssim", "latency_ms", "stored_params"} <= set(table.columns)
    markdown = (out / "sisr-quick.md").read_text()
    assert "| png-4x4 | x4 |" in markdown and "python -m bench sisr --budget quick" in markdown
    assert "reuse penalty 0.5" in markdown
    assert "PnG grows 60% and prunes 20% of a task's steps in 10 events" in markdown
    budget = json.loads((out / "sisr-quick.json").read_text())["budget"]
    assert budget["steps"] == 3 and budget["reuse_penalty"] == 0.5
    assert (out / "sisr-quick.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["jpeg"], "invalid choice: 'jpeg'"),
        (["sisr", "--steps", "0"], "--steps 0 must be at least 1"),
        (["sisr", "--latency-rounds", "-2"], "--latency-rounds -2 must be at least 1"),
        (["sisr", "--block-shapes", "4by4"], "block shape '4by4'"),
        (["sisr", "--block-shapes", "8x1024/fast"], "--block-shapes '8x1024/fast': prune scope 'fast' is not one of"),
        (["sisr", "--block-shapes", "8x1024+pairs"], "--block-shapes '8x1024+pairs': block spec '8x1024+pairs': "
                                                     "'+pairs' is not +paired or +released or +zero or +alone"),
        (["nic", "--block-shapes", "8x1024+zero+released"],
         "a task's free blocks start as released or at zero, not both"),
        (["nic", "--block-shapes", "8x1024/active+paired"], "the nic model declares no channel pairs"),
        (["sisr", "--reuse-penalty", "-0.5"], "--reuse-penalty -0.5 must be at least 0"),
        (["sisr", "--reuse-penalty", "nan"], "--reuse-penalty nan must be at least 0"),
        (["sisr", "--train", "/nonexistent"], "'/nonexistent' does not exist"),
        (["nic", "--device", "cuda:7"], "--device cuda:7"),
    ],
)
def test_bad_arguments_get_one_line_naming_them(argv, message, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_nic_rows_are_written_in_compressai_results_format(tmp_path: Path) -> None:
    rows = [_row("separate", task, psnr=30.0 + i, ms_ssim=0.9, bpp=0.1 * (i + 1))
            for i, task in enumerate(["q1", "q3", "q5"])]
    rows.insert(0, rows.pop())  # measured in another order (q5 first): written in rate order
    [path] = compare.write_compressai_results(rows, tmp_path / "nic-quick", "demo")
    document = json.loads(path.read_text())
    assert path.name == "nic-quick-separate.compressai.json" and document["name"] == "separate"
    assert document["tasks"] == ["q1", "q3", "q5"]
    assert document["results"]["psnr-rgb"] == [30.0, 31.0, 32.0] and document["results"]["bpp"] == pytest.approx(
        [0.1, 0.2, 0.3])
    assert document["results"]["encoding_time"] == [None, None, None]  # the bench does not time coding


def test_a_png_spec_names_its_block_shape_scope_and_prune_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    settings = compare._task_settings(TINY_SISR, "8x1024/active@0.35", seed=0)
    assert (settings.block_shape, settings.prune_scope, settings.prune_ratio) == ((8, 1024), "active", 0.35)
    assert compare._task_settings(TINY_SISR, "4x4", seed=0).prune_ratio == TINY_SISR.prune_ratio
    assert compare._system("8x1024/active@0.350") == "png-8x1024-active-r0.35"
    assert compare._system("8x1024/active") == "png-8x1024-active" and compare._system("4x4@0.5") == "png-4x4-r0.5"
    paired = compare._task_settings(TINY_SISR, "8x1024/active+paired@0.4", seed=0)
    assert (paired.paired, paired.prune_scope, paired.prune_ratio) == (True, "active", 0.4)
    assert not compare._task_settings(TINY_SISR, "8x1024/active", seed=0).paired
    assert compare._system("8x1024/active+paired@0.4") == "png-8x1024-active-paired-r0.4"
    zero = compare._task_settings(replace(TINY_SISR, prune_events=7, steps=20, png_phases=(0.3, 0.35)),
                                  "8x1024/active+zero", seed=0)
    assert (zero.grow_from, zero.prune_events, compare._system("8x1024/active+zero")) == ("zero", 7,
                                                                                         "png-8x1024-active-zero")
    assert (zero.grow_steps, zero.prune_steps, zero.finetune_steps) == (6, 7, 7)
    assert compare._task_settings(TINY_SISR, "4x4+released", seed=0).grow_from == "released"
    assert compare._task_settings(TINY_SISR, "4x4", seed=0).grow_from == "fresh"
    for spec, message in (("8x1024@half", "prune ratio 'half' is not a number"),
                          ("8x1024/active@1.5", "prune ratio 1.5 is outside")):
        with pytest.raises(SystemExit):
            main(["sisr", "--block-shapes", spec])
        (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
        assert line.startswith(f"python -m bench: error: --block-shapes '{spec}': {message}")


def test_every_codec_starts_from_one_base_and_is_measured_beside_jpeg(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cpu budget's shape at a tiny size: one dense base model that every learned system starts from, and JPEG
    measured on the same images at qualities whose rates span the learned systems'."""
    starts: list[dict] = []
    trained_for: list[str | None] = []  # what each system's first task is told its start was trained for
    real = compare.train_shared

    def recording(family, settings, train, evaluation, log, device, initial=None, initial_task=None):  # noqa: ANN001, ANN202
        starts.append(initial)
        trained_for.append(initial_task)
        return real(family, settings, train, evaluation, log, device, initial, initial_task=initial_task)

    monkeypatch.setattr(compare, "train_shared", recording)
    budget = replace(TINY_NIC, tasks=("q1", "q4"), base_steps=2, base_task="q3", classic=("jpeg",))
    rows, summary = run_benchmark("nic", budget, _images(2, 128), _images(2, 128, seed=1), log=lambda m: None)
    assert len(starts) == 3 and all(start is starts[0] for start in starts)  # two separate models and PnG
    assert trained_for == ["q3"] * 3  # each moves its latent gain from the base's rate the same way
    assert "g_a.0.weight" in starts[0]
    jpeg = [r for r in rows if r.system == "jpeg"]
    learned = [r.metrics["bpp"] for r in rows if r.system != "jpeg"]
    assert len(jpeg) >= 2 and all(r.task.startswith("quality ") for r in jpeg)
    assert min(r.metrics["bpp"] for r in jpeg) <= min(learned) or jpeg[0].task == "quality 1"
    assert max(r.metrics["bpp"] for r in jpeg) >= max(learned) or jpeg[-1].task == "quality 95"
    assert set(summary["systems"]["jpeg"]) >= {"bd_rate_psnr", "bd_rate_ms_ssim"}
    assert "stored_params" not in summary["systems"]["jpeg"]
    assert all("bd_rate_psnr_vs_jpeg" in entry for entry in summary["systems"].values())


def test_a_codec_spending_a_known_share_of_jpeg_s_rate_has_that_bd_rate_against_it() -> None:
    jpeg = [(0.25, 26.0, 0.90), (0.45, 28.5, 0.94), (0.8, 31.5, 0.96), (1.3, 34.0, 0.975)]
    rows = [_row("jpeg", f"quality {q}", bpp=b, psnr=p, ms_ssim=m) for q, (b, p, m) in zip((10, 30, 60, 85), jpeg)]
    tasks = ("q1", "q2", "q3", "q4")
    rows += [_row("separate", t, bpp=0.7 * b, psnr=p, ms_ssim=m) for t, (b, p, m) in zip(tasks, jpeg)]
    rows += [_row("png-8x1024-active", t, bpp=0.77 * b, psnr=p, ms_ssim=m) for t, (b, p, m) in zip(tasks, jpeg)]
    summary = compare._summary(get_family("nic", list(tasks)), rows, {"separate": 4, "png-8x1024-active": 1}, 1,
                               {"separate": 1.0, "png-8x1024-active": 1.0})
    systems = summary["systems"]
    assert systems["separate"]["bd_rate_psnr_vs_jpeg"] == pytest.approx(-30.0)
    assert systems["png-8x1024-active"]["bd_rate_psnr_vs_jpeg"] == pytest.approx(-23.0)
    assert systems["png-8x1024-active"]["bd_rate_psnr"] == pytest.approx(10.0)
    assert systems["jpeg"]["bd_rate_psnr_vs_jpeg"] == pytest.approx(0.0, abs=1e-9)
    assert systems["jpeg"]["bd_rate_psnr"] == pytest.approx(100 / 0.7 - 100)
    table = compare.markdown(rows, summary, "header")
    assert "| jpeg | quality 30 | 0.450 | 28.50 | 0.9400 |" in table
    assert "| png-8x1024-active | 1 | 1.00x | +10.0% | +10.0% | -23.0% | 1 |" in table


def test_a_saved_base_is_read_by_a_rerun_of_the_same_provenance_and_refused_by_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained, starts = [], []
    real_base, real_train = compare._train_base, compare.train_shared
    monkeypatch.setattr(compare, "_train_base", lambda *a: trained.append(1) or real_base(*a))
    monkeypatch.setattr(compare, "train_shared", lambda *a, **kw: starts.append(a[-1]) or real_train(*a, **kw))
    budget = replace(TINY_NIC, tasks=("q1", "q4"), block_shapes=(), base_steps=2, base_task="q3")
    train, evaluation, path = _images(2, 128), _images(1, 128, seed=1), tmp_path / "base.safetensors"
    for _ in range(2):
        run_benchmark("nic", budget, train, evaluation, log=lambda m: None, base=path)
    assert len(trained) == 1 and path.is_file() and not path.with_name("base.safetensors.partial").exists()
    assert starts[0].keys() == starts[2].keys()
    assert all(torch.equal(starts[0][k], starts[2][k]) for k in starts[0])  # the rerun starts where the first did
    with pytest.raises(ValueError, match=f"--base '{path}' was trained with seed '0', not '1'"):
        run_benchmark("nic", budget, train, evaluation, seed=1, log=lambda m: None, base=path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nic", "--budget", "fast"], "--budget 'fast' is not one of nic's budgets: quick, cpu, full"),
        (["nic", "--tasks", "q1,q9"], "--tasks 'q1,q9': NIC task 'q9' is not q1..q8 or lambda=<positive number>"),
        (["nic", "--tasks", "q3"], "--tasks 'q3': a rate-distortion curve needs at least two rates"),
    ],
)
def test_a_bad_budget_or_rate_list_is_one_line(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"python -m bench: error: {message}"


def test_an_evaluation_folder_without_an_image_one_tile_in_size_is_one_line(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "small"
    folder.mkdir()
    for name, image in zip(("a", "b"), _images(2, 48).images):  # under the codec's 64x64
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{name}.png")
    with pytest.raises(SystemExit):
        main(["nic", "--train", str(folder), "--eval", str(folder)])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"python -m bench: error: evaluation folder '{folder}' has no image of at least 64x64 pixels, one tile of the "
        "nic model")


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_machine_line_names_the_cpus_native_precision(precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A codec trains about twice as fast where the CPU computes bfloat16 in hardware: every bench's machine line says
    which kind of CPU its seconds come from."""
    monkeypatch.setattr(compare, "native_precision", lambda device="cpu": precision)
    assert f"native precision {precision})" in compare.machine("cpu")
