"""PnG against what a user would otherwise deploy, under one training budget per family.

Systems, each trained for ``steps`` gradient steps per task at the same batch size, learning rate and schedule:

* ``separate``: one dense model per task (CompressAI's per-quality zoo, BasicSR's per-scale EDSR runs);
* ``png-<block>[-active][-r<ratio>]``: one PnG shared model per block spec ``<shape>[/active][@<ratio>]`` (grow
  60%, prune 20%, fine-tune 20% of the steps); ``-active`` prunes with ``prune_scope="active"`` (a later task's reused
  blocks are pruned too, so it compacts), ``-r<ratio>`` to that prune ratio instead of the budget's 0.5;
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
from typing import Any, Callable, Sequence

import torch

from pngrow.workers.data import ImageSet, PatchSampler, load_folder
from pngrow.workers.latency import median_latencies
from pngrow.workers.metrics import bd_rate
from pngrow.workers.models import Family, get_family
from pngrow.workers.png import check_compaction, compact_task, count_macs, model_cost, parse_block_shape
from pngrow.workers.training import StageSettings, train_shared

from . import require_at_least
from .baselines import build_joint, train_joint

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
    block_shapes: tuple[str, ...] = ("4x4", "8x1024", "8x1024/active")  # "<shape>[/<scope>][+paired][@<ratio>]"
    prune_ratio: float = 0.5
    reuse_penalty: float = 0.0  # PnG's loss weight on the share of earlier blocks a later task selects


# quick: 20 minutes on 2 CPU cores; full: a GPU (EDSR-baseline and the CompressAI zoo's N=128, M=192 sizes).
BUDGETS: dict[tuple[str, str], Budget] = {
    ("sisr", "quick"): Budget(("x2", "x3", "x4"), 900, 8, 5e-4, {"width": 32, "depth": 4}, None, 96, 15),
    ("sisr", "full"): Budget(("x2", "x3", "x4"), 30000, 16, 2e-4, {"width": 64, "depth": 16}, None, 256, 30),
    ("nic", "quick"): Budget(("q7", "q5", "q3", "q1"), 250, 4, 5e-4, {"N": 64, "M": 96}, 6, 256, 15),
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


def _parse_spec(spec: str) -> tuple[str, str, bool, float | None]:
    """A PnG system's block shape, pruning scope, whether it is paired and prune ratio (None: the budget's) from its
    spec ``<shape>[/<scope>][+paired][@<ratio>]``.

    >>> _parse_spec("8x1024/active+paired@0.4"), _parse_spec("4x4")
    (('8x1024', 'active', True, 0.4), ('4x4', 'own', False, None))
    """
    rest, _, ratio = spec.partition("@")
    rest, plus, flag = rest.partition("+")
    if plus and flag != "paired":
        raise ValueError(f"block spec {spec!r}: {'+' + flag!r} is not +paired")
    shape, _, scope = rest.partition("/")
    try:
        return shape, scope or "own", bool(plus), float(ratio) if ratio else None
    except ValueError:
        raise ValueError(f"prune ratio {ratio!r} is not a number") from None


def _system(spec: str) -> str:
    """A PnG system's name from its block spec: ``8x1024/active`` is ``png-8x1024-active``, ``8x1024/active@0.40``
    ``png-8x1024-active-r0.4``, ``8x1024/active+paired`` ``png-8x1024-active-paired``."""
    shape, scope, paired, ratio = _parse_spec(spec)
    return (f"png-{shape}" + (f"-{scope}" if scope != "own" else "") + ("-paired" if paired else "")
            + (f"-r{ratio:g}" if ratio is not None else ""))


def _stage_settings(budget: Budget, block_shape: str | None, seed: int) -> StageSettings:
    if block_shape is None:  # a dense model: every step grows, nothing is pruned
        return StageSettings(prune_ratio=0.0, reuse="none", grow_steps=budget.steps, prune_steps=0, finetune_steps=0,
                             batch_size=budget.batch_size, lr=budget.lr, seed=seed)
    grow = round(0.6 * budget.steps)
    prune = round(0.2 * budget.steps)
    shape, scope, paired, ratio = _parse_spec(block_shape)
    return StageSettings(block_shape=parse_block_shape(shape), prune_ratio=budget.prune_ratio if ratio is None else ratio,
                         grow_steps=grow, prune_steps=prune, finetune_steps=budget.steps - grow - prune,
                         batch_size=budget.batch_size, lr=budget.lr, reuse_penalty=budget.reuse_penalty,
                         prune_scope=scope, paired=paired, seed=seed)


@dataclass
class _Trained:
    """Every system of a run, trained: PnG jobs by block spec, separate jobs by task, the joint model."""

    separate: dict[str, Any]
    png: dict[str, Any]
    joint: Any
    seconds: dict[str, float]


def _train_systems(family: Family, budget: Budget, train: ImageSet, first_image: ImageSet, device: str, seed: int,
                   log: Callable[[str], None]) -> _Trained:
    """Train the separate models, one PnG model per block spec and the joint model under one budget."""
    quiet = lambda message: None  # noqa: E731 - stage logs would drown the benchmark's own
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    separate = {}
    for task in budget.tasks:
        log(f"separate {task}: {budget.steps} steps")
        one = get_family(family.name, [task], **budget.arch)
        separate[task] = train_shared(one, [_stage_settings(budget, None, seed)], train, first_image, quiet, device)
    seconds["separate"] = time.perf_counter() - start
    png = {}
    for shape in budget.block_shapes:
        start = time.perf_counter()
        log(f"{_system(shape)}: {len(budget.tasks)} stages of {budget.steps} steps")
        settings = [_stage_settings(budget, shape, seed)] * len(budget.tasks)
        png[shape] = train_shared(family, settings, train, first_image, quiet, device)
        seconds[_system(shape)] = time.perf_counter() - start
    start = time.perf_counter()
    log(f"joint: {budget.steps * len(budget.tasks)} steps over all tasks")
    joint = build_joint(family).to(device)
    sampler = PatchSampler(train, max(family.patch_size(t) for t in family.tasks), seed=seed)
    train_joint(joint, family, sampler, budget.steps, budget.batch_size, budget.lr, seed, quiet)
    seconds["joint"] = time.perf_counter() - start
    return _Trained(separate, png, joint, seconds)


def run_benchmark(family_name: str, budget: Budget, train: ImageSet, evaluation: ImageSet, device: str = "cpu",
                  seed: int = 0, log: Callable[[str], None] = print) -> tuple[list[Row], dict[str, Any]]:
    """Train and measure every system; returns the per-task rows and a per-system summary."""
    family = get_family(family_name, list(budget.tasks), **budget.arch)
    # The first image checks each stage as it ends; every system is measured on the whole set below.
    trained = _train_systems(family, budget, train, evaluation.limit(1), device, seed, log)
    # "One dense model" is the mean of the separate ones (SISR's tails differ in size by scale).
    dense_params = round(statistics.mean(model_cost(job.shared).stored_params for job in trained.separate.values()))
    stored = {
        "separate": sum(model_cost(job.shared).stored_params for job in trained.separate.values()),
        "joint": sum(p.numel() for p in trained.joint.model.parameters()),
        **{_system(shape): model_cost(job.shared).stored_params for shape, job in trained.png.items()},
    }
    log("measuring quality, MACs and latency")
    latency_input = torch.rand(1, 3, budget.latency_size, budget.latency_size,
                               generator=torch.Generator().manual_seed(seed)).to(device)
    rows = [row for task in budget.tasks
            for row in _measure_task(family, task, trained, evaluation, budget, latency_input, stored, dense_params)]
    return rows, _summary(family, rows, stored, dense_params, trained.seconds)


def _measure_task(family: Family, task: str, trained: _Trained, evaluation: ImageSet, budget: Budget,
                  latency_input: torch.Tensor, stored: dict[str, int], dense_params: int) -> list[Row]:
    """One task's row for every system: quality, MACs, and latency taken in turns (PnG also compacted)."""
    cost_input = family.cost_inputs(task)[0].to(latency_input.device)
    exported = compact_task(trained.separate[task].shared, task, strategies=("dense",))
    compacted = {shape: compact_task(job.shared, task, latency_input) for shape, job in trained.png.items()}
    runs: dict[str, Callable[[], Any]] = {"separate": lambda: exported(latency_input),
                                          "joint": lambda: trained.joint(task, latency_input)}
    for shape, job in trained.png.items():
        runs[_system(shape)] = lambda job=job: job.shared(task, latency_input)
        runs[_system(shape) + "/compact"] = lambda c=compacted[shape]: c(latency_input)
    ms = median_latencies(runs, budget.latency_rounds, latency_input.device, warmup=1)
    rows = [Row("separate", task, family.evaluate(trained.separate[task].shared, task, evaluation),
                count_macs(exported, cost_input), ms["separate"], stored["separate"], dense_params)]
    for shape, job in trained.png.items():
        compact, system = compacted[shape], _system(shape)
        error = check_compaction(compact, job.shared, (latency_input,))  # a mismatch ends the run, named
        stage = next(s for s in job.stages if s.task == task)
        rows.append(Row(system, task, family.evaluate(job.shared, task, evaluation), stage.cost.macs,
                        ms[system], stored[system], dense_params,
                        compact_latency_ms=ms[system + "/compact"], compact_macs=count_macs(compact, cost_input),
                        compact_params=compact.parameter_count(), compact_max_error=error,
                        extra={"density": stage.cost.density, "dense_macs": stage.cost.dense_macs,
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
    systems = {}
    for system, tasks in by_system.items():
        entry: dict[str, Any] = {
            "stored_params": stored[system],
            "stored_vs_one_dense": stored[system] / dense_params,
            "train_seconds": timings[system],
        }
        if family.name == "nic":
            for metric in ("psnr", "ms_ssim"):
                curve = [(r.metrics["bpp"], _quality(r.metrics, metric)) for r in tasks.values()]
                reference = [(r.metrics["bpp"], _quality(r.metrics, metric)) for r in anchor.values()]
                entry[f"bd_rate_{metric}"] = bd_rate(reference, curve)
        else:
            entry["psnr_delta"] = {t: tasks[t].metrics["psnr"] - anchor[t].metrics["psnr"] for t in tasks}
        if tasks[next(iter(tasks))].compact_latency_ms is not None:
            entry["compact_speedup"] = {t: anchor[t].latency_ms / r.compact_latency_ms for t, r in tasks.items()}
        systems[system] = entry
    return {"family": family.name, "dense_params": dense_params, "systems": systems}


def _quality(metrics: dict[str, float], name: str) -> float:
    # MS-SSIM is compared in decibels, -10 log10(1 - MS-SSIM), as CompressAI's plots do.
    value = metrics[name]
    return -10 * math.log10(max(1e-12, 1 - value)) if name == "ms_ssim" else value


def markdown(rows: list[Row], summary: dict[str, Any], header: str) -> str:
    """The benchmark's two tables: per task, then per system."""
    nic = summary["family"] == "nic"
    lines = [header, "", "| system | task | PSNR dB | MS-SSIM | " + ("bpp | " if nic else "") +
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
    lines += ["", "| system | stored params | vs one dense model | " +
              ("BD-rate PSNR | BD-rate MS-SSIM |" if nic else "PSNR vs separate (dB) |") + " training s |",
              "|---" * (5 + nic) + "|"]
    for system, entry in summary["systems"].items():
        if nic:
            quality = [_percent(entry["bd_rate_psnr"]), _percent(entry["bd_rate_ms_ssim"])]
        else:
            quality = [" ".join(f"{t} {d:+.2f}" for t, d in entry["psnr_delta"].items())]
        lines.append("| " + " | ".join([system, f"{entry['stored_params']:,}", f"{entry['stored_vs_one_dense']:.2f}x",
                                         *quality, f"{entry['train_seconds']:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def _percent(value: float) -> str:
    return "n/a (no monotone overlap)" if math.isnan(value) else f"{value:+.1f}%"


def plot(rows: list[Row], family: str, path: Path) -> Path:
    """NIC: rate-distortion curves (bpp against PSNR); SISR: PSNR per scale and system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r.system for r in rows))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if family == "nic":
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
    """The machine in words: CPU cores and model, or the GPU."""
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
    return f"{torch.get_num_threads()} CPU threads ({cpu}), torch {torch.__version__}"


def write_compressai_results(rows: list[Row], stem: Path, description: str) -> list[Path]:
    """Each system's rate-distortion figures in CompressAI's results format (the writer ``pngrow eval`` uses), as
    ``<stem>-<system>.compressai.json``: ``python -m compressai.utils.plot -f ...`` draws them beside CompressAI's
    published curves. The bench times forward passes, not coding: encoding and decoding times are null."""
    from pngrow.pipeline.evaluate import RateFigures, codec_results, rate_order
    from pngrow.workers.models.nic import lambda_of

    paths = []
    for system in dict.fromkeys(r.system for r in rows):
        rates = rate_order([RateFigures(r.task, lambda_of(r.task), {"psnr-rgb": r.metrics["psnr"],
                                                                     "ms-ssim-rgb": r.metrics["ms_ssim"],
                                                                     "bpp": r.metrics["bpp"]})
                            for r in rows if r.system == system])
        path = Path(f"{stem}-{system}.compressai.json")
        path.write_text(json.dumps(codec_results(system, description, rates), indent=2) + "\n")
        paths.append(path)
    return paths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=sorted({f for f, _ in BUDGETS}))
    budget_group = parser.add_mutually_exclusive_group()
    budget_group.add_argument("--quick", action="store_const", const="quick", dest="budget",
                              help="the 2-CPU budget (about 20 minutes; the default)")
    budget_group.add_argument("--full", action="store_const", const="full", dest="budget", help="the GPU budget")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--train", type=Path, default=DATASETS / "train", help="training image folder")
    parser.add_argument("--eval", type=Path, default=None,
                        help="evaluation folder (default: ../shared/datasets/kodak for nic, set5 for sisr)")
    parser.add_argument("--steps", type=int, default=None, help="override the budget's steps per task")
    parser.add_argument("--batch-size", type=int, default=None, help="override the budget's batch size")
    parser.add_argument("--latency-size", type=int, default=None,
                        help="override the side of the square input latency is timed on")
    parser.add_argument("--latency-rounds", type=int, default=None, help="override how many rounds latency is timed")
    parser.add_argument("--block-shapes", default=None,
                        help="PnG systems, comma separated: a block shape, optionally /active (the pruning scope), "
                             "+paired (channel pairs pruned together) and @RATIO (the prune ratio; default 0.5), e.g. "
                             "4x4,8x1024,8x1024/active@0.4,8x1024/active+paired")
    parser.add_argument("--reuse-penalty", type=float, default=None,
                        help="PnG's loss weight on the share of earlier blocks a later task reuses (default 0)")
    parser.add_argument("--eval-images", type=int, default=None, help="evaluate on the first N images only")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default bench-results)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _declares_pairs(family_name: str, budget: Budget) -> bool:
    return bool(get_family(family_name, list(budget.tasks), **budget.arch).build_shared().channel_pairs)


def _budget(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Budget:
    """The named budget with the command line's overrides, each checked (a bad one ends with one line)."""
    budget = BUDGETS[(args.family, args.budget or "quick")]
    fields = ("steps", "batch_size", "latency_size", "latency_rounds")  # Budget fields of the same names
    require_at_least(parser, args, 1, *fields)
    budget = replace(budget, **{name: getattr(args, name) for name in fields if getattr(args, name) is not None})
    if args.block_shapes is not None:
        shapes = tuple(s.strip() for s in args.block_shapes.split(",") if s.strip())
        for shape in shapes:
            try:
                paired = _stage_settings(budget, shape, args.seed).paired
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench sisr --quick``: train and measure every system, write Parquet, Markdown and a PNG plot
    (and, for NIC, each system's CompressAI results file)."""
    parser = _parser()
    args = parser.parse_args(argv)
    budget_name = args.budget or "quick"
    budget = _budget(parser, args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here")
    eval_folder = args.eval or DATASETS / ("kodak" if args.family == "nic" else "set5")
    try:
        train = load_folder(args.train)
        evaluation = load_folder(eval_folder).limit(budget.eval_images)
    except ValueError as error:
        parser.error(f"{error} (--train/--eval name the image folders)")
    start = time.perf_counter()
    rows, summary = run_benchmark(args.family, budget, train, evaluation, args.device, args.seed,
                                  log=lambda message: print(message, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.family}-{budget_name}"
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"{args.family.upper()} benchmark, {budget_name} budget ({budget.steps} steps per task per system, "
              f"batch {budget.batch_size}, {budget.arch}, PnG reuse penalty {budget.reuse_penalty:g}), evaluated on "
              f"{len(evaluation)} images of {evaluation.source}; {machine(args.device)}; {seconds / 60:.1f} min. "
              f"Command: `{command}`")
    import pandas as pd

    pd.DataFrame([r.flat() for r in rows]).to_parquet(stem.with_suffix(".parquet"), index=False)
    stem.with_suffix(".md").write_text(markdown(rows, summary, header))
    stem.with_suffix(".json").write_text(json.dumps({**summary, "budget": asdict(budget), "seconds": seconds,
                                                    "machine": machine(args.device)}, indent=2))
    plot(rows, args.family, stem.with_suffix(".png"))
    if args.family == "nic":
        write_compressai_results(rows, stem, header)
    print(stem.with_suffix(".md").read_text())
    return 0
