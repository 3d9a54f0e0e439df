"""Pictures of a search: which task owns and reuses which blocks, quality against cost per task, and each stage's
Pareto front. ``pngrow report RUN`` writes them; every search logs them to its MLflow run under ``report/``.

The block pictures need the final model, so :func:`build_report` imports the worker code (PyTorch) when it draws;
importing this module does not.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from mlflow.entities import Run  # noqa: E402

from . import names  # noqa: E402
from .names import Kind  # noqa: E402
from .records import TrialOutcome  # noqa: E402
from .study import Candidate, pareto_front  # noqa: E402
from .tracking import Tracking  # noqa: E402

if TYPE_CHECKING:
    from ..workers.png import SharedNetwork

__all__ = ["build_report", "plot_pareto", "plot_quality_cost", "plot_sharing", "sharing_image"]

COLOURS = plt.get_cmap("tab10").colors


def sharing_image(shared: SharedNetwork, layer_index: int, task: str) -> np.ndarray:
    """An RGB picture (out x in channels) of one layer as ``task`` sees it: its own blocks in its colour, the
    earlier tasks' blocks it reuses in a light tint of their owner's colour, the rest white."""
    layer = shared.shared_layers()[layer_index]
    index = shared.task_index(task)
    owner = layer.owner.cpu().numpy().astype(int)
    active = layer.active_plane(index, shared.tasks[index]).cpu().numpy()
    image = np.ones(owner.shape + (3,))
    for t in range(index + 1):
        colour = np.array(COLOURS[t % len(COLOURS)])
        if t == index:
            image[owner == t] = colour
        else:
            image[(owner == t) & active] = 0.45 * colour + 0.55
    return image


def plot_sharing(shared: SharedNetwork, path: Path, max_layers: int = 40) -> Path:
    """Grid of :func:`sharing_image`: a row per task, a column per shared layer (the first ``max_layers``)."""
    layers = shared.shared_layers()[:max_layers]
    tasks = shared.task_names
    fig, axes = plt.subplots(len(tasks), len(layers), figsize=(1.1 * len(layers) + 1.5, 1.2 * len(tasks) + 1.2),
                             squeeze=False)
    for row, task in enumerate(tasks):
        for col, layer in enumerate(layers):
            ax = axes[row][col]
            ax.imshow(sharing_image(shared, col, task), interpolation="nearest", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(layer.name.replace("body.", "b."), fontsize=6, rotation=45, ha="left")
            if col == 0:
                ax.set_ylabel(task, rotation=0, ha="right", va="center", fontsize=9)
    handles = [Patch(color=COLOURS[i % len(COLOURS)], label=f"owned by {t}") for i, t in enumerate(tasks)]
    handles.append(Patch(facecolor="0.8", label="light: an earlier task's block, reused"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("Blocks each task computes with, per layer (rows: output channels, columns: input channels)",
                 fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.8, bottom=0.12, wspace=0.15, hspace=0.15)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_quality_cost(tasks: list[str], final: dict[str, dict[str, float]], rate_distortion: bool, path: Path,
                      baseline: dict[str, dict[str, float]] | None = None) -> Path:
    """Quality per task beside its cost: with ``rate_distortion`` (a :class:`~pngrow.workers.models.Codec`'s tasks
    are rates) an RD curve (PSNR against bpp), else PSNR per task (with bicubic, where evaluated: SISR's scales), and
    each task's density; ``baseline`` (task -> metrics of separate models) is drawn when given."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if rate_distortion:
        order = sorted(tasks, key=lambda t: final[t]["bpp"])
        left.plot([final[t]["bpp"] for t in order], [final[t]["psnr"] for t in order], "o-", label="pngrow (one model)")
        for t in order:
            left.annotate(t, (final[t]["bpp"], final[t]["psnr"]), textcoords="offset points", xytext=(4, -10))
        if baseline:
            base = sorted((t for t in tasks if t in baseline), key=lambda t: baseline[t]["bpp"])
            left.plot([baseline[t]["bpp"] for t in base], [baseline[t]["psnr"] for t in base], "s--",
                      label="separate models")
        left.set_xlabel("bits per pixel")
        left.set_title("Rate-distortion")
    else:
        x = np.arange(len(tasks))
        left.plot(x, [final[t]["psnr"] for t in tasks], "o-", label="pngrow (one model)")
        if all("bicubic_psnr" in final[t] for t in tasks):
            left.plot(x, [final[t]["bicubic_psnr"] for t in tasks], "x:", label="bicubic")
        if baseline:
            left.plot(x, [baseline.get(t, {}).get("psnr", np.nan) for t in tasks], "s--", label="separate models")
        left.set_xticks(x, tasks)
        left.set_xlabel("task (scale)")
        left.set_title("PSNR per scale")
    left.set_ylabel("PSNR (dB)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.bar(tasks, [final[t]["density"] for t in tasks], color=[COLOURS[i % 10] for i in range(len(tasks))])
    right.axhline(1.0, color="k", ls="--", lw=1, label="a separate dense model")
    right.set_ylim(0, 1.1)
    right.set_ylabel("density (share of dense weights used)")
    right.set_title("Cost of each task")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_pareto(task: str, candidates: list[Candidate], chosen: str, maximize: bool, quality: str, cost: str,
                path: Path) -> Path:
    """One stage's trials in (cost, quality), its Pareto front, and the trial handed to the next stage."""
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([c.cost for c in candidates], [c.quality for c in candidates], color="0.6", label="trials")
    front = pareto_front(candidates, maximize)
    ax.plot([c.cost for c in front], [c.quality for c in front], "o-", color=COLOURS[0], label="Pareto front")
    for c in candidates:
        if c.run_id == chosen:
            ax.scatter([c.cost], [c.quality], s=160, facecolors="none", edgecolors="r", lw=2, label="chosen")
        ax.annotate(str(c.number), (c.cost, c.quality), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"{cost} ({'share of the dense model, ' if cost == 'latency' else ''}lower is better)")
    ax.set_ylabel(f"{quality} ({'higher' if maximize else 'lower'} is better)")
    ax.set_title(f"Stage {task}: {len(candidates)} finished trials")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def build_report(tracking: Tracking, search: Run, out: Path,
                 baseline: dict[str, dict[str, float]] | None = None) -> list[Path]:
    """Write every picture of a finished search into ``out``; returns their paths."""
    from ..workers.models import Codec, load_model

    out.mkdir(parents=True, exist_ok=True)
    tags = search.data.tags
    final_stage = tags.get(names.FINAL_STAGE_RUN)
    if not final_stage:
        raise ValueError(f"search {search.info.run_id} has no final model yet (its run is {search.info.status})")
    with tempfile.TemporaryDirectory(prefix="pngrow-report-") as tmp:
        family, shared = load_model(tracking.download_checkpoint(final_stage, tmp))
    tasks = shared.task_names
    quality = tags.get(names.QUALITY) or family.quality_metric
    cost = tags.get(names.COST, "density")
    maximize = family.metric_directions[quality] == "maximize"
    final = {t: {k.split("/")[-1]: v for k, v in search.data.metrics.items() if k.startswith(f"final/{t}/")}
             for t in tasks}
    paths = [plot_sharing(shared, out / "sharing.png"),
             plot_quality_cost(tasks, final, isinstance(family, Codec), out / "quality_cost.png", baseline)]
    for stage in tracking.children(search, Kind.STAGE):
        candidates = _candidates(tracking.children(stage, Kind.TRIAL), quality, cost)
        if candidates:
            task = stage.data.tags[names.TASK]
            paths.append(plot_pareto(task, candidates, stage.data.tags.get(names.CHOSEN_TRIAL_RUN, ""), maximize,
                                     quality, cost, out / f"pareto_{_safe(task)}.png"))
    (out / "report.json").write_text(json.dumps({"search_id": search.info.run_id, "tasks": tasks, "final": final,
                                                 "quality": quality, "cost": cost}, indent=2) + "\n")
    return paths


def _candidates(trials: list[Run], quality: str, cost: str) -> list[Candidate]:
    """The finished trials that recorded an outcome, as (quality, cost) candidates."""
    outcomes = [TrialOutcome.from_run(t) for t in trials if t.info.status == "FINISHED" and TrialOutcome.recorded(t)]
    numbers = {t.info.run_id: int(t.data.tags.get(names.OPTUNA_TRIAL, -1)) for t in trials}
    return [Candidate(numbers[o.run_id], o.metrics[quality], o.cost(cost), o.run_id, o.relative_latency)
            for o in outcomes if quality in o.metrics]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def load_baseline(path: str | None) -> dict[str, Any] | None:
    """Separate-model figures (task -> metrics), e.g. from the benchmark's JSON ``separate`` entry."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise ValueError(f"baseline file {path!r} does not exist")
    data = json.loads(Path(path).read_text())
    return data.get("separate", data)
