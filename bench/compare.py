"""PnG against what a user would otherwise deploy, under one training budget per family.

Systems, each trained for ``steps`` gradient steps per task at the same batch size, learning rate and schedule:

* ``separate``: one dense model per task (CompressAI's per-quality zoo, BasicSR's per-scale EDSR runs);
* ``png-<block>[-active][-<growth>][-r<ratio>]``: one PnG shared model per block spec
  ``<shape>[/active][+<growth>][@<ratio>]`` (by default grow 60%, prune 20%, fine-tune 20% of the steps: the
  budget's ``png_phases``); ``-active`` prunes with ``prune_scope="active"`` (a later task's reused blocks are pruned
  too, so it compacts), ``+released`` or ``+zero`` says where a later task's free blocks start (default fresh; see
  :data:`~pngrow.workers.png.GROWTHS`), ``-r<ratio>`` prunes to that ratio instead of the budget's 0.5;
* ``joint``: one fully shared model trained on all tasks in turn (see :mod:`bench.baselines`).

Measured per task: PSNR and MS-SSIM (SISR on Y, border cropped by the scale; NIC on RGB), bpp from real bitstreams
(NIC), MACs per forward, and forward latency of every system taking turns on the same input and machine; for PnG also
the task compacted by :func:`compact_task` (checked against the masked model). Per system: stored parameters against
one dense model, and NIC's BD-rate against ``separate``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from pngrow.workers.classic_codecs import CLASSIC_CODECS
from pngrow.workers.data import ImageSet, PatchSampler, load_folder
from pngrow.workers.latency import median_latencies
from pngrow.workers.metrics import bd_rate
from pngrow.workers.models import Codec, Family, get_family
from pngrow.workers.png import check_compaction, compact_task, count_macs, model_cost, parse_block_shape
from pngrow.workers.settings import TaskSettings, native_precision
from pngrow.workers.training import train_shared

from . import require_at_least
from .baselines import build_joint, dense_model, train_joint

__all__ = ["BUDGETS", "Budget", "Row", "main", "run_benchmark"]

DATASETS = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"


@dataclass(frozen=True)
class Budget:
    """What every system of a family gets: steps per task, batch, model size, and how much is evaluated."""

    tasks: tuple[str, ...]
    steps: int
    batch_size: int
    lr: float
    arch: dict[str, Any]
    eval_images: int | None  # the first N of the evaluation folder; None for all
    latency_size: int  # side of the square input latency is measured on
    latency_rounds: int
    # "<shape>[/<scope>][+paired][+released|+zero][+alone][@<ratio>]"
    block_shapes: tuple[str, ...] = ("4x4", "8x1024", "8x1024/active")
    prune_ratio: float = 0.5
    prune_events: int = 10  # how many steps of PnG's pruning release blocks (see TaskSettings)
    png_phases: tuple[float, float] = (0.6, 0.2)  # PnG's shares of a task's steps that grow and prune; rest fine-tune
    reuse_penalty: float = 0.0  # PnG's loss weight on the share of earlier blocks a later task selects
    # A dense model trained first for base_steps at base_task, which every learned system starts from (task 1 of PnG,
    # each separate model, the joint model): the fair way to spend a long budget once (0: all start from scratch).
    base_steps: int = 0
    base_task: str = ""
    classic: tuple[str, ...] = ()  # classic codecs measured beside a codec family's systems (jpeg, webp)
    precision: str = "float32"  # how every system trains (see TaskSettings)
    channels_last: bool = False


# quick: 20 minutes on 2 CPU cores; cpu (NIC): long enough on 2 CPU cores for every codec to pass JPEG on Kodak;
# full: a GPU (EDSR-baseline and the CompressAI zoo's N=128, M=192 sizes).
BUDGETS: dict[tuple[str, str], Budget] = {
    ("sisr", "quick"): Budget(("x2", "x3", "x4"), 900, 8, 5e-4, {"width": 32, "depth": 4}, None, 96, 15),
    ("sisr", "full"): Budget(("x2", "x3", "x4"), 30000, 16, 2e-4, {"width": 64, "depth": 16}, None, 256, 30),
    ("nic", "quick"): Budget(("q7", "q5", "q3", "q1"), 250, 4, 5e-4, {"N": 64, "M": 96}, 6, 256, 15),
    # cpu: the highest rate first, as quick and full: with a latent gain per rate, each lower rate moves its step down
    # from the higher rate's blocks, and every rate came out at or under the loss of one pruned alone to the same
    # density (q4, trained first, the same; docs/benchmark.md). +alone measures that reference in the same run.
    ("nic", "cpu"): Budget(("q4", "q3", "q2", "q1"), 2500, 8, 5e-4, {"N": 64, "M": 96}, None, 512, 15,
                           ("8x1024/active+zero", "8x1024/active+alone"), prune_events=100, png_phases=(0.3, 0.35),
                           base_steps=15000, base_task="q3", classic=("jpeg", "webp"), precision="bfloat16",
                           channels_last=True),
    ("nic", "full"): Budget(("q7", "q5", "q3", "q1"), 100000, 8, 1e-4, {"N": 128, "M": 192}, None, 512, 30),
}


@dataclass
class Row:
    """One task of one system."""

    system: str
    task: str
    metrics: dict[str, float]
    macs: int
    latency_ms: float
    stored_params: int
    dense_params: int
    compact_latency_ms: float | None = None
    compact_macs: int | None = None
    compact_params: int | None = None
    compact_max_error: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("metrics", "extra")}
        return {**out, **self.metrics, **self.extra}


# A PnG spec's +flags: channel pairs pruned together; a later task's free blocks start as released or at zero; each
# task pruned alone, in a model of its own that shares nothing (the reference that prices sharing at equal density).
_FLAGS = ("paired", "released", "zero", "alone")


def _parse_spec(spec: str) -> tuple[str, str, frozenset[str], float | None]:
    """A PnG system's block shape, pruning scope, flags and prune ratio (None: the budget's) from its spec
    ``<shape>[/<scope>][+paired][+released|+zero][+alone][@<ratio>]``.

    >>> _parse_spec("8x1024/active+paired@0.4"), _parse_spec("4x4")
    (('8x1024', 'active', frozenset({'paired'}), 0.4), ('4x4', 'own', frozenset(), None))
    """
    rest, _, ratio = spec.partition("@")
    rest, *flags = rest.split("+")
    unknown = [flag for flag in flags if flag not in _FLAGS]
    if unknown:
        raise ValueError(f"block spec {spec!r}: {'+' + unknown[0]!r} is not {' or '.join('+' + f for f in _FLAGS)}")
    if {"released", "zero"} <= set(flags):
        raise ValueError(f"block spec {spec!r}: a task's free blocks start as released or at zero, not both")
    shape, _, scope = rest.partition("/")
    try:
        return shape, scope or "own", frozenset(flags), float(ratio) if ratio else None
    except ValueError:
        raise ValueError(f"prune ratio {ratio!r} is not a number") from None


def _system(spec: str) -> str:
    """A PnG system's name from its block spec: ``8x1024/active`` is ``png-8x1024-active``, ``8x1024/active@0.40``
    ``png-8x1024-active-r0.4``, ``8x1024/active+paired`` ``png-8x1024-active-paired``."""
    shape, scope, flags, ratio = _parse_spec(spec)
    return (f"png-{shape}" + (f"-{scope}" if scope != "own" else "") + "".join(f"-{f}" for f in _FLAGS if f in flags)
            + (f"-r{ratio:g}" if ratio is not None else ""))


def _task_settings(budget: Budget, block_shape: str | None, seed: int) -> TaskSettings:
    common = {"batch_size": budget.batch_size, "lr": budget.lr, "seed": seed, "precision": budget.precision,
              "channels_last": budget.channels_last}
    if block_shape is None:  # a dense model: every step grows, nothing is pruned
        return TaskSettings(prune_ratio=0.0, reuse="none", grow_steps=budget.steps, prune_steps=0, finetune_steps=0,
                            **common)
    grow = round(budget.png_phases[0] * budget.steps)
    prune = round(budget.png_phases[1] * budget.steps)
    shape, scope, flags, ratio = _parse_spec(block_shape)
    return TaskSettings(block_shape=parse_block_shape(shape),
                        prune_ratio=budget.prune_ratio if ratio is None else ratio,
                        grow_steps=grow, prune_steps=prune, finetune_steps=budget.steps - grow - prune,
                        reuse_penalty=budget.reuse_penalty, prune_scope=scope, paired="paired" in flags,
                        prune_events=budget.prune_events,
                        grow_from=next((f for f in ("released", "zero") if f in flags), "fresh"), **common)


@dataclass
class _Trained:
    """Every system of a run, trained: separate jobs by task, PnG jobs by block spec and task (one job for every
    task, or one per task for a spec with +alone), the joint model."""

    separate: dict[str, Any]
    png: dict[str, dict[str, Any]]
    joint: Any
    seconds: dict[str, float]


def _training_log(log: Callable[[str], None], system: str) -> Callable[[str], None]:
    """``log`` for one system's training figures, each line indented and named by the system."""
    return lambda message: log(f"  {system} {message}")


def _train_systems(family: Family, budget: Budget, train: ImageSet, first_image: ImageSet, device: str, seed: int,
                   log: Callable[[str], None], base: Path | None) -> _Trained:
    """Train the separate models, one PnG model per block spec and the joint model under one budget."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    initial = _base(family, budget, train, device, seed, log, base) if budget.base_steps else None
    seconds["base"] = time.perf_counter() - start
    start = time.perf_counter()
    separate = {}
    for task in budget.tasks:
        log(f"separate {task}: {budget.steps} steps")
        one = get_family(family.name, [task], **budget.arch)
        separate[task] = train_shared(one, [_task_settings(budget, None, seed)], train, first_image,
                                      _training_log(log, "separate"), device, initial,
                                      initial_task=budget.base_task or None)
    seconds["separate"] = time.perf_counter() - start
    png = {}
    for shape in budget.block_shapes:
        start = time.perf_counter()
        log(f"{_system(shape)}: {len(budget.tasks)} tasks of {budget.steps} steps")
        settings, system_log = _task_settings(budget, shape, seed), _training_log(log, _system(shape))
        if "alone" in _parse_spec(shape)[2]:
            png[shape] = {task: train_shared(get_family(family.name, [task], **budget.arch), [settings], train,
                                             first_image, system_log, device, initial,
                                             initial_task=budget.base_task or None) for task in budget.tasks}
        else:
            job = train_shared(family, [settings] * len(budget.tasks), train, first_image, system_log, device,
                               initial, initial_task=budget.base_task or None)
            png[shape] = dict.fromkeys(budget.tasks, job)
        seconds[_system(shape)] = time.perf_counter() - start
    start = time.perf_counter()
    log(f"joint: {budget.steps * len(budget.tasks)} steps over all tasks")
    joint = build_joint(family, initial).to(device)
    sampler = PatchSampler(train, max(family.patch_size(t) for t in family.tasks), seed=seed)
    train_joint(joint, family, sampler, budget.steps, _task_settings(budget, None, seed), _training_log(log, "joint"))
    seconds["joint"] = time.perf_counter() - start
    return _Trained(separate, png, joint, seconds)


def base_provenance(family_name: str, budget: Budget, train: ImageSet, seed: int) -> dict[str, str]:
    """What makes a base model what it is; stored in a saved base's metadata and checked when it is reused.

    >>> from pngrow.workers.data import ImageSet
    >>> base_provenance("nic", BUDGETS[("nic", "cpu")], ImageSet("photos", (), ()), 0)["steps"]
    '15000'
    """
    return {"family": family_name, "arch": json.dumps(budget.arch, sort_keys=True), "task": budget.base_task,
            "steps": str(budget.base_steps), "batch_size": str(budget.batch_size), "lr": f"{budget.lr:g}",
            "precision": budget.precision, "channels_last": str(budget.channels_last), "seed": str(seed),
            "train": f"{train.source} ({len(train)} images)"}


def check_base(path: Path, wanted: dict[str, str]) -> None:
    """Raise ValueError (one line naming the file and the field) unless ``path`` is a saved base of provenance
    ``wanted`` (see :func:`base_provenance`)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            saved = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"--base {str(path)!r} is not a safetensors file: {error}") from None
    differs = next((k for k in wanted if saved.get(k) != wanted[k]), None)
    if differs:
        raise ValueError(f"--base {str(path)!r} was trained with {differs} {saved.get(differs)!r}, not "
                         f"{wanted[differs]!r}")


def _base(family: Family, budget: Budget, train: ImageSet, device: str, seed: int, log: Callable[[str], None],
          path: Path | None) -> dict[str, torch.Tensor]:
    """The base model's state dict: read from ``path`` where a base of the same provenance was saved there (another
    provenance is one line naming the field), else trained and, with a ``path``, saved there."""
    from safetensors.torch import load_file, save_file

    wanted = base_provenance(family.name, budget, train, seed)
    if path is not None and path.is_file():
        check_base(path, wanted)
        log(f"base: {budget.base_steps} steps at {budget.base_task}, read from {path}")
        return load_file(str(path))
    state = _train_base(family, budget, train, device, seed, log)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file({k: v.contiguous() for k, v in state.items()}, str(partial), metadata=wanted)
        partial.replace(path)  # a killed save leaves no file that reads as a base
        log(f"base: saved to {path}")
    return state


def _train_base(family: Family, budget: Budget, train: ImageSet, device: str, seed: int,
                log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """The dense state dict every learned system starts from: the family's model trained ``base_steps`` at
    ``base_task``, by the same optimiser and cosine schedule as every other system."""
    log(f"base: {budget.base_steps} steps at {budget.base_task}")
    one = get_family(family.name, [budget.base_task], **budget.arch)
    base = dense_model(one).to(device)
    sampler = PatchSampler(train, one.patch_size(budget.base_task), seed=seed)
    train_joint(base, one, sampler, budget.base_steps, _task_settings(budget, None, seed), _training_log(log, "base"))
    return {name: tensor.detach().cpu() for name, tensor in base.model.state_dict().items()}


def run_benchmark(family_name: str, budget: Budget, train: ImageSet, evaluation: ImageSet, device: str = "cpu",
                  seed: int = 0, log: Callable[[str], None] = print,
                  base: Path | None = None) -> tuple[list[Row], dict[str, Any]]:
    """Train and measure every system; returns the per-task rows and a per-system summary. ``base`` is a file the
    budget's base model is read from (where one of the same provenance is there) or saved to."""
    family = get_family(family_name, list(budget.tasks), **budget.arch)
    # The first image checks each task as its training ends; every system is measured on the whole set below.
    trained = _train_systems(family, budget, train, evaluation.limit(1), device, seed, log, base)
    # "One dense model" is the mean of the separate ones (SISR's tails differ in size by scale).
    dense_params = round(statistics.mean(model_cost(job.shared).stored_params for job in trained.separate.values()))
    stored = {
        "separate": sum(model_cost(job.shared).stored_params for job in trained.separate.values()),
        "joint": sum(p.numel() for p in trained.joint.model.parameters()),
        **{_system(shape): sum(model_cost(job.shared).stored_params for job in _distinct(jobs.values()))
           for shape, jobs in trained.png.items()},
    }
    log("measuring quality, MACs and latency")
    latency_input = torch.rand(1, 3, budget.latency_size, budget.latency_size,
                               generator=torch.Generator().manual_seed(seed)).to(device)
    rows = [row for task in budget.tasks
            for row in _measure_task(family, task, trained, evaluation, budget, latency_input, stored, dense_params)]
    rows += _classic_rows(budget, evaluation, rows, dense_params, log)
    return rows, _summary(family, rows, stored, dense_params, trained.seconds)


def _distinct(jobs: Iterable[Any]) -> list[Any]:
    """A PnG system's trained models, each once: one shared by every task, or one per task (+alone)."""
    return list({id(job): job for job in jobs}.values())


def _classic_rows(budget: Budget, evaluation: ImageSet, learned: list[Row], dense_params: int,
                  log: Callable[[str], None]) -> list[Row]:
    """Each classic codec of the budget on the same images, at the qualities whose bpp spans the learned systems'
    (one beyond each end), measured as the learned codecs are: a row per quality, ``task`` naming it."""
    rows = []
    low, high = (f(r.metrics["bpp"] for r in learned) for f in (min, max)) if budget.classic else (0.0, 0.0)
    for name in budget.classic:
        codec = CLASSIC_CODECS[name]
        if not codec.available:
            log(f"{name}: this Pillow cannot write {codec.format}; left out")
            continue
        log(f"{name}: the qualities spanning {low:.3f} to {high:.3f} bpp")
        rows += [Row(name, f"quality {point.quality}", {"psnr": point.psnr, "ms_ssim": point.ms_ssim, "bpp": point.bpp},
                     macs=0, latency_ms=math.nan, stored_params=0, dense_params=dense_params)
                 for point in codec.curve(evaluation.images, low, high)]
    return rows


def _measure_task(family: Family, task: str, trained: _Trained, evaluation: ImageSet, budget: Budget,
                  latency_input: torch.Tensor, stored: dict[str, int], dense_params: int) -> list[Row]:
    """One task's row for every system: quality, MACs, and latency taken in turns (PnG also compacted)."""
    cost_input = family.cost_inputs(task)[0].to(latency_input.device)
    exported = compact_task(trained.separate[task].shared, task, strategies=("dense",))
    png = {shape: jobs[task] for shape, jobs in trained.png.items()}
    compacted = {shape: compact_task(job.shared, task, latency_input) for shape, job in png.items()}
    runs: dict[str, Callable[[], Any]] = {"separate": lambda: exported(latency_input),
                                          "joint": lambda: trained.joint(task, latency_input)}
    for shape, job in png.items():
        runs[_system(shape)] = lambda job=job: job.shared(task, latency_input)
        runs[_system(shape) + "/compact"] = lambda c=compacted[shape]: c(latency_input)
    ms = median_latencies(runs, budget.latency_rounds, latency_input.device, warmup=1)
    rows = [Row("separate", task, family.evaluate(trained.separate[task].shared, task, evaluation),
                count_macs(exported, cost_input), ms["separate"], stored["separate"], dense_params)]
    for shape, job in png.items():
        compact, system = compacted[shape], _system(shape)
        error = check_compaction(compact, job.shared, (latency_input,))  # a mismatch ends the run, named
        trained_task = next(r for r in job.task_results if r.task == task)
        rows.append(Row(system, task, family.evaluate(job.shared, task, evaluation), trained_task.cost.macs,
                        ms[system], stored[system], dense_params,
                        compact_latency_ms=ms[system + "/compact"], compact_macs=count_macs(compact, cost_input),
                        compact_params=compact.parameter_count(), compact_max_error=error,
                        extra={"density": trained_task.cost.density, "dense_macs": trained_task.cost.dense_macs,
                               "compact_layers": ",".join(p.strategy for p in compact.plans)}))
    rows.append(Row("joint", task, family.evaluate(trained.joint, task, evaluation),  # type: ignore[arg-type]
                    count_macs(trained.joint, task, cost_input), ms["joint"], stored["joint"], dense_params))
    return rows


def _summary(family: Family, rows: list[Row], stored: dict[str, int], dense_params: int,
             timings: dict[str, float]) -> dict[str, Any]:
    by_system: dict[str, dict[str, Row]] = {}
    for row in rows:
        by_system.setdefault(row.system, {})[row.task] = row
    anchor = by_system["separate"]
    classic = {name: by_system[name] for name in CLASSIC_CODECS if name in by_system}
    systems = {}
    for system, tasks in by_system.items():
        entry: dict[str, Any] = {}
        if system in stored:  # a learned system (a classic codec stores no model)
            entry.update(stored_params=stored[system], stored_vs_one_dense=stored[system] / dense_params,
                         train_seconds=timings[system])
        if isinstance(family, Codec):
            entry.update(_bd_rates(tasks, anchor, classic))
        else:
            entry["psnr_delta"] = {t: tasks[t].metrics["psnr"] - anchor[t].metrics["psnr"] for t in tasks}
        if tasks[next(iter(tasks))].compact_latency_ms is not None:
            entry["compact_speedup"] = {t: anchor[t].latency_ms / r.compact_latency_ms for t, r in tasks.items()}
        systems[system] = entry
    return {"family": family.name, "dense_params": dense_params, "systems": systems}


def _bd_rates(tasks: dict[str, Row], anchor: dict[str, Row], classic: dict[str, dict[str, Row]]) -> dict[str, float]:
    """A codec's BD-rates: against the separate models in PSNR and MS-SSIM, and against each classic codec in PSNR."""
    def curve(rows: dict[str, Row], metric: str = "psnr") -> list[tuple[float, float]]:
        return [(r.metrics["bpp"], _quality(r.metrics, metric)) for r in rows.values()]

    rates = {f"bd_rate_{metric}": bd_rate(curve(anchor, metric), curve(tasks, metric))
             for metric in ("psnr", "ms_ssim")}
    rates.update({f"bd_rate_psnr_vs_{name}": bd_rate(curve(points), curve(tasks)) for name, points in classic.items()})
    return rates


def _quality(metrics: dict[str, float], name: str) -> float:
    # MS-SSIM is compared in decibels, -10 log10(1 - MS-SSIM), as CompressAI's plots do.
    value = metrics[name]
    return -10 * math.log10(max(1e-12, 1 - value)) if name == "ms_ssim" else value


def markdown(rows: list[Row], summary: dict[str, Any], header: str) -> str:
    """The benchmark's tables: per task of the learned systems, the classic codecs' points (if any), per system."""
    nic = _codes(summary["family"])
    learned = [r for r in rows if r.system not in CLASSIC_CODECS]
    classic = [r for r in rows if r.system in CLASSIC_CODECS]
    tables = [_task_table(learned, nic), *([_classic_table(classic)] if classic else []), _system_table(summary, nic)]
    return "\n\n".join([header, *tables]) + "\n"


def _task_table(rows: list[Row], nic: bool) -> str:
    lines = ["| system | task | PSNR dB | MS-SSIM | " + ("bpp | " if nic else "") +
             "MACs (M) | latency ms | compacted ms | speedup vs separate | compacted MACs (M) | density |",
             "|---" * (10 + nic) + "|"]
    anchor = {r.task: r for r in rows if r.system == "separate"}
    for r in rows:
        compact_ms = r.compact_latency_ms if r.compact_latency_ms is not None else r.latency_ms
        cells = [r.system, r.task, f"{r.metrics['psnr']:.2f}", f"{r.metrics['ms_ssim']:.4f}"]
        if nic:
            cells.append(f"{r.metrics['bpp']:.3f}")
        cells += [f"{r.macs / 1e6:.1f}", f"{r.latency_ms:.1f}",
                  "" if r.compact_latency_ms is None else f"{r.compact_latency_ms:.1f}",
                  f"{anchor[r.task].latency_ms / compact_ms:.2f}x",
                  "" if r.compact_macs is None else f"{r.compact_macs / 1e6:.1f}",
                  f"{r.extra['density']:.2f}" if "density" in r.extra else "1.00"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _classic_table(rows: list[Row]) -> str:
    lines = ["| classic codec | setting | bpp | PSNR dB | MS-SSIM |", "|---|---|---|---|---|"]
    lines += [f"| {r.system} | {r.task} | {r.metrics['bpp']:.3f} | {r.metrics['psnr']:.2f} | "
              f"{r.metrics['ms_ssim']:.4f} |" for r in rows]
    return "\n".join(lines)


def _system_table(summary: dict[str, Any], nic: bool) -> str:
    systems = summary["systems"]
    versus = sorted({key.removeprefix("bd_rate_psnr_vs_") for entry in systems.values() for key in entry
                     if key.startswith("bd_rate_psnr_vs_")})
    head = ["system", "stored params", "vs one dense model",
            *(["BD-rate PSNR", "BD-rate MS-SSIM", *(f"BD-rate vs {name}" for name in versus)] if nic
              else ["PSNR vs separate (dB)"]), "training s"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for system, entry in systems.items():
        if nic:
            quality = [_percent(entry["bd_rate_psnr"]), _percent(entry["bd_rate_ms_ssim"]),
                       *(_percent(entry[f"bd_rate_psnr_vs_{name}"]) for name in versus)]
        else:
            quality = [" ".join(f"{t} {d:+.2f}" for t, d in entry["psnr_delta"].items())]
        stored = [f"{entry['stored_params']:,}", f"{entry['stored_vs_one_dense']:.2f}x"] if "stored_params" in entry \
            else ["", ""]
        trained = f"{entry['train_seconds']:.0f}" if "train_seconds" in entry else ""
        lines.append("| " + " | ".join([system, *stored, *quality, trained]) + " |")
    return "\n".join(lines)


def _percent(value: float) -> str:
    return "n/a (no monotone overlap)" if math.isnan(value) else f"{value:+.1f}%"


def _codes(family: str) -> bool:
    """Whether the family named ``family`` entropy-codes images (a :class:`~pngrow.workers.models.Codec`): its tasks
    are rates, compared by BD-rate on Kodak."""
    return isinstance(get_family(family), Codec)


def plot(rows: list[Row], family: str, path: Path) -> Path:
    """A codec family (NIC): rate-distortion curves (bpp against PSNR); else (SISR): PSNR per task and system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r.system for r in rows))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if _codes(family):
        for system in systems:
            points = sorted((r.metrics["bpp"], r.metrics["psnr"]) for r in rows if r.system == system)
            ax.plot(*zip(*points), "o-", label=system)
        ax.set_xlabel("bits per pixel")
    else:
        tasks = list(dict.fromkeys(r.task for r in rows))
        width = 0.8 / len(systems)
        for i, system in enumerate(systems):
            values = [next(r.metrics["psnr"] for r in rows if r.system == system and r.task == t) for t in tasks]
            ax.bar([k + i * width for k in range(len(tasks))], values, width, label=system)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(tasks))], tasks)
        low = min(r.metrics["psnr"] for r in rows)
        ax.set_ylim(low - 1, max(r.metrics["psnr"] for r in rows) + 0.5)
    ax.set_ylabel("PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def machine(device: str) -> str:
    """The machine in words: CPU threads, model and native precision (bfloat16 only where the CPU computes it in
    hardware, which makes a codec's training about twice as fast), or the GPU.

    >>> machine("cpu")  # doctest: +SKIP
    '2 CPU threads (AMD EPYC, native precision float32), torch 2.14.1'
    """
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{torch.get_num_threads()} CPU threads ({cpu}, native precision {native_precision('cpu')}), "
            f"torch {torch.__version__}")


def write_compressai_results(rows: list[Row], stem: Path, description: str) -> list[Path]:
    """Each system's rate-distortion figures in CompressAI's results format (the writer ``pngrow eval`` uses), as
    ``<stem>-<system>.compressai.json``: ``python -m compressai.utils.plot -f ...`` draws them beside CompressAI's
    published curves. The bench times forward passes, not coding: encoding and decoding times are null."""
    from pngrow.pipeline.evaluate import RateFigures, codec_results, rate_order
    from pngrow.workers.models.nic import lambda_of

    paths = []
    for system in dict.fromkeys(r.system for r in rows):
        # in rate order: a learned codec's by lambda, a classic codec's (whose settings are no lambda) by bpp
        order = (lambda r: r.metrics["bpp"]) if system in CLASSIC_CODECS else (lambda r: lambda_of(r.task))
        figures = lambda r: {"psnr-rgb": r.metrics["psnr"], "ms-ssim-rgb": r.metrics["ms_ssim"],  # noqa: E731
                             "bpp": r.metrics["bpp"]}
        rates = rate_order([RateFigures(r.task, order(r), figures(r)) for r in rows if r.system == system])
        path = Path(f"{stem}-{system}.compressai.json")
        path.write_text(json.dumps(codec_results(system, description, rates), indent=2) + "\n")
        paths.append(path)
    return paths


PUBLISHED = DATASETS.parent / "reference" / "compressai-kodak"  # CompressAI's own Kodak results


def plot_beside_published(results: list[Path], path: Path) -> Path | None:
    """Every system's curve drawn by CompressAI's own tool (``compressai.utils.plot``) beside CompressAI's
    published scale hyperprior (eight separate models) and its variable-rate model, all on Kodak; None (and nothing
    drawn) where the published results are not at hand."""
    published = [PUBLISHED / "compressai-bmshj2018-hyperprior_mse_cpu.json",
                 PUBLISHED / "bmshj2018-hyperprior-vbr-ans.json"]
    if not all(p.is_file() for p in published):
        return None
    import subprocess

    done = subprocess.run([sys.executable, "-m", "compressai.utils.plot", "-f", *map(str, results),
                           *map(str, published), "-o", str(path)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"compressai.utils.plot failed: {done.stderr.strip().splitlines()[-1:]}")
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=sorted({f for f, _ in BUDGETS}))
    parser.add_argument("--budget", default="quick",
                        help="quick (2 CPU cores, about 20 minutes; the default), cpu (NIC: 2 CPU cores, "
                             "about 2 hours, every codec past JPEG) or full (a GPU)")
    parser.add_argument("--tasks", default=None,
                        help="the tasks, comma separated, in training order (e.g. q1,q2,q3,q4)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--train", type=Path, default=DATASETS / "train", help="training image folder")
    parser.add_argument("--eval", type=Path, default=None,
                        help="evaluation folder (default: ../shared/datasets/kodak for nic, set5 for sisr)")
    parser.add_argument("--steps", type=int, default=None, help="override the budget's steps per task")
    parser.add_argument("--batch-size", type=int, default=None, help="override the budget's batch size")
    parser.add_argument("--base-steps", type=int, default=None,
                        help="override the steps of the dense base model every learned system starts from (0: none)")
    parser.add_argument("--latency-size", type=int, default=None,
                        help="override the side of the square input latency is timed on")
    parser.add_argument("--latency-rounds", type=int, default=None, help="override how many rounds latency is timed")
    parser.add_argument("--block-shapes", default=None,
                        help="PnG systems, comma separated: a block shape, optionally /active (the pruning scope), "
                             "+paired (channel pairs pruned together), +released or +zero (where a later task's free "
                             "blocks start), +alone (each task pruned in a model of its own, sharing nothing) and "
                             "@RATIO (the prune ratio; default 0.5), e.g. 4x4,8x1024/active@0.4,8x1024/active+alone")
    parser.add_argument("--reuse-penalty", type=float, default=None,
                        help="PnG's loss weight on the share of earlier blocks a later task reuses (default 0)")
    parser.add_argument("--eval-images", type=int, default=None, help="evaluate on the first N images only")
    parser.add_argument("--base", type=Path, default=None,
                        help="a safetensors file for the base model: read where one of the same budget, seed and "
                             "training set is there, else trained and saved there (a rerun skips the base's steps)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default bench-results)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _declares_pairs(family_name: str, budget: Budget) -> bool:
    return bool(get_family(family_name, list(budget.tasks), **budget.arch).build_shared().channel_pairs)


def _budget(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Budget:
    """The named budget with the command line's overrides, each checked (a bad one ends with one line)."""
    if (args.family, args.budget) not in BUDGETS:
        known = ", ".join(name for family, name in BUDGETS if family == args.family)
        parser.error(f"--budget {args.budget!r} is not one of {args.family}'s budgets: {known}")
    budget = BUDGETS[(args.family, args.budget)]
    if args.tasks is not None:
        tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        try:
            get_family(args.family, list(tasks), **budget.arch)
        except ValueError as error:
            parser.error(f"--tasks {args.tasks!r}: {error}")
        if len(tasks) < 2 and _codes(args.family):
            parser.error(f"--tasks {args.tasks!r}: a rate-distortion curve needs at least two rates")
        budget = replace(budget, tasks=tasks)
    fields = ("steps", "batch_size", "latency_size", "latency_rounds")  # Budget fields of the same names
    require_at_least(parser, args, 1, *fields)
    require_at_least(parser, args, 0, "base_steps")
    if args.base_steps and not budget.base_task:
        parser.error(f"--base-steps {args.base_steps}: the {args.budget} budget trains no base model (no base task)")
    budget = replace(budget, **{name: getattr(args, name) for name in (*fields, "base_steps")
                                if getattr(args, name) is not None})
    if args.block_shapes is not None:
        shapes = tuple(s.strip() for s in args.block_shapes.split(",") if s.strip())
        for shape in shapes:
            try:
                paired = _task_settings(budget, shape, args.seed).paired
            except ValueError as error:
                parser.error(f"--block-shapes {shape!r}: {error}")
            if paired and not _declares_pairs(args.family, budget):
                parser.error(f"--block-shapes {shape!r}: the {args.family} model declares no channel pairs")
        budget = replace(budget, block_shapes=shapes)
    if args.eval_images is not None:
        budget = replace(budget, eval_images=args.eval_images)
    if args.reuse_penalty is not None:
        if not args.reuse_penalty >= 0:
            parser.error(f"--reuse-penalty {args.reuse_penalty} must be at least 0")
        budget = replace(budget, reuse_penalty=args.reuse_penalty)
    return budget


def _images(parser: argparse.ArgumentParser, args: argparse.Namespace, budget: Budget) -> tuple[ImageSet, ImageSet]:
    """The training images and the evaluation images (those at least one tile of the family's model in size: a
    codec's 64x64; a folder with none is one line)."""
    eval_folder = args.eval or DATASETS / ("kodak" if _codes(args.family) else "set5")
    try:
        train, evaluation = load_folder(args.train), load_folder(eval_folder)
    except ValueError as error:
        parser.error(f"{error} (--train/--eval name the image folders)")
    side = get_family(args.family, list(budget.tasks), **budget.arch).size_multiple
    fits = [i for i, image in enumerate(evaluation.images) if min(image.shape[1:]) >= side]
    if not fits:
        parser.error(f"evaluation folder {str(eval_folder)!r} has no image of at least {side}x{side} pixels, one tile "
                     f"of the {args.family} model")
    if len(fits) < len(evaluation):
        evaluation = ImageSet(evaluation.source, *(tuple(seq[i] for i in fits) for seq in (evaluation.names,
                                                                                           evaluation.images)))
    return train, evaluation.limit(budget.eval_images)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench sisr --budget quick``: train and measure every system, write Parquet, Markdown, JSON and a
    PNG plot (and, for a codec family, each system's CompressAI results file, plotted beside CompressAI's published
    curves by CompressAI's own tool)."""
    parser = _parser()
    args = parser.parse_args(argv)
    budget = _budget(parser, args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here")
    train, evaluation = _images(parser, args, budget)
    base_read = args.base is not None and args.base.is_file()
    if args.base is not None and not budget.base_steps:
        parser.error(f"--base {str(args.base)!r}: the {args.budget} budget trains no base model")
    if base_read:
        try:
            check_base(args.base, base_provenance(args.family, budget, train, args.seed))
        except ValueError as error:
            parser.error(str(error))
    start = time.perf_counter()
    rows, summary = run_benchmark(args.family, budget, train, evaluation, args.device, args.seed,
                                  log=lambda message: print(message, file=sys.stderr, flush=True), base=args.base)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (f"{args.family}-{args.budget}" + ("" if args.seed == 0 else f"-seed{args.seed}"))
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    base = f", all from a dense {budget.base_task} model of {budget.base_steps} steps" if budget.base_steps else ""
    base += f" read from {args.base}" if base_read else ""
    header = (f"{args.family.upper()} benchmark, {args.budget} budget ({budget.steps} steps per task per system{base}, "
              f"batch {budget.batch_size}, {budget.arch}; PnG grows {budget.png_phases[0]:.0%} and prunes "
              f"{budget.png_phases[1]:.0%} of a task's steps in {budget.prune_events} events, reuse penalty "
              f"{budget.reuse_penalty:g}), evaluated on {len(evaluation)} images of {evaluation.source}; "
              f"{machine(args.device)}; {seconds / 60:.1f} min, "
              f"seed {args.seed}. Command: `{command}`")
    import pandas as pd

    pd.DataFrame([r.flat() for r in rows]).to_parquet(stem.with_suffix(".parquet"), index=False)
    stem.with_suffix(".md").write_text(markdown(rows, summary, header))
    stem.with_suffix(".json").write_text(json.dumps({**summary, "budget": asdict(budget), "seconds": seconds,
                                                    "machine": machine(args.device), "seed": args.seed}, indent=2))
    plot(rows, args.family, stem.with_suffix(".png"))
    if _codes(args.family):
        results = write_compressai_results(rows, stem, header)
        if Path(evaluation.source).name == "kodak":  # the published curves are on Kodak
            plot_beside_published(results, Path(f"{stem}-beside-published.png"))
    print(stem.with_suffix(".md").read_text())
    return 0
