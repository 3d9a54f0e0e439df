"""The ``pngrow`` command line. ``main(argv)`` returns the exit status, so tests call it directly.

``pngrow run`` trains one shared model for a family's tasks by prune-and-grow on this machine and prints a table.
``pngrow search CONFIG`` runs a search on Ray with Optuna and MLflow; ``pngrow status`` lists searches;
``pngrow promote`` registers a search's shared model in the MLflow Model Registry.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["build_parser", "main"]


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()] if text else []


def _per_task(values: list[str], tasks: list[str], option: str) -> list[str]:
    if len(values) == 1:
        return values * len(tasks)
    if len(values) != len(tasks):
        raise ValueError(f"{option} {','.join(values)!r} gives {len(values)} values for {len(tasks)} tasks")
    return values


def _float(text: str, option: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{option} {text!r} is not a number") from None


def _arch_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--arch {pair!r} is not KEY=VALUE")
        options[key] = value
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pngrow", description="One network for several restoration tasks (PnG).")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train one shared model for a family's tasks on this machine")
    run.add_argument("--family", default="sisr", help="model family: sisr (default) or nic")
    run.add_argument("--tasks", help="comma-separated task order, e.g. x2,x3,x4 or q6,q4,q2 (family default)")
    run.add_argument("--arch", action="append", default=[], metavar="KEY=VALUE",
                     help="architecture option, e.g. width=64 depth=16 (sisr) or N=128 M=192 codec=... (nic)")
    run.add_argument("--block-shape", default="4x4", help="OUTxIN channels per block, one or one per task")
    run.add_argument("--prune", default="0.5", help="ratio of each task's blocks to release, one or one per task")
    run.add_argument("--reuse", default="learned", choices=["learned", "all", "none"],
                     help="how a task reuses earlier blocks: a learned selection, all of them, or none")
    run.add_argument("--reuse-penalty", type=float, default=0.0, help="loss weight on the share of reused blocks")
    for name in ("grow-steps", "prune-steps", "finetune-steps", "batch-size"):
        run.add_argument(f"--{name}", type=int, help="family default when omitted")
    run.add_argument("--lr", type=float, default=5e-4)
    run.add_argument("--selection-lr", type=float, default=1e-3)
    run.add_argument("--data", help="folder of training images (default: scikit-image's bundled photos)")
    run.add_argument("--eval-data", help="folder of evaluation images (default: scikit-image's bundled photos)")
    run.add_argument("--eval-limit", type=int, help="evaluate on the first N images only")
    run.add_argument("--init", help="dense weights (safetensors state dict of the family's model) for task 1 to start from")
    run.add_argument("--json", help="write the per-task results here")
    run.add_argument("--out", help="save the shared model here (safetensors + JSON)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="cpu", help="cpu or cuda")
    run.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for PyTorch")
    run.add_argument("--quiet", action="store_true", help="print only the final table")
    run.set_defaults(handler=_run)

    search = commands.add_parser("search", help="search a shared model on Ray (Optuna per task, MLflow lineage)")
    search.add_argument("config", help="search config YAML, e.g. search_spaces/examples/tiny-sisr.yaml")
    _search_options(search)
    search.set_defaults(handler=_search)

    resume = commands.add_parser("resume", help="continue a search whose driver died, keeping its finished work")
    resume.add_argument("search_id", help="the search's id (pngrow status lists them)")
    _search_options(resume)
    resume.set_defaults(handler=_resume)

    status = commands.add_parser("status", help="running and finished searches, their stages and progress")
    _tracking_options(status)
    status.add_argument("--limit", type=int, default=20, help="newest searches to show (default 20)")
    status.set_defaults(handler=_status)

    promote = commands.add_parser("promote", help="register a search's (or stage's) shared model, set an alias")
    promote.add_argument("run", metavar="SEARCH_OR_RUN", help="a search's id or name, or a stage run's id")
    promote.add_argument("--name", required=True, help="registered model name")
    promote.add_argument("--alias", default="champion", help="alias to point at the new version (default champion)")
    _tracking_options(promote)
    promote.set_defaults(handler=_promote)

    grow = commands.add_parser("grow", help="grow new tasks into a released shared model, register the result")
    grow.add_argument("--from", dest="base", required=True, metavar="URI",
                      help="the released model: models:/NAME@ALIAS, models:/NAME/VERSION or a model folder")
    grow.add_argument("--task", dest="tasks", action="append", required=True, help="a task to add (repeatable)")
    grow.add_argument("--config", help="search config whose budget, space, data and services to use (its family, "
                                       "tasks and arch are the base model's)")
    grow.add_argument("--name", help="registered model for the new version (default: the base's, for models:/)")
    grow.add_argument("--alias", help="alias to point at the new version (default: none moves)")
    _search_options(grow)
    grow.set_defaults(handler=_grow)

    report = commands.add_parser("report", help="draw a search's pictures: block sharing, quality vs cost, Pareto")
    report.add_argument("run", metavar="SEARCH", help="a search's id or name")
    report.add_argument("--out", help="folder for the pictures (default report-<search id>)")
    report.add_argument("--baseline", help="JSON of separate-model figures per task to draw beside (bench output)")
    _tracking_options(report)
    report.set_defaults(handler=_report)

    compress = commands.add_parser("compress", help="write the bitstream of an image at a NIC task's rate")
    _model_options(compress)
    compress.add_argument("--task", required=True, help="the rate, e.g. q4")
    compress.add_argument("input", help="image file (PNG, JPEG, ...)")
    compress.add_argument("output", help="bitstream file to write")
    compress.set_defaults(handler=_compress)

    decompress = commands.add_parser("decompress", help="decode a pngrow bitstream (its task is in its header)")
    _model_options(decompress)
    decompress.add_argument("input", help="bitstream file")
    decompress.add_argument("output", help="PNG file to write")
    decompress.set_defaults(handler=_decompress)

    upscale = commands.add_parser("upscale", help="super-resolve an image with a SISR task")
    _model_options(upscale)
    which = upscale.add_mutually_exclusive_group(required=True)
    which.add_argument("--scale", type=int, help="zoom factor, e.g. 3")
    which.add_argument("--task", help="the task, e.g. x3")
    upscale.add_argument("input", help="image file")
    upscale.add_argument("output", help="PNG file to write")
    upscale.set_defaults(handler=_upscale)
    return parser


def _search_options(search: argparse.ArgumentParser) -> None:
    """Where a search's services are (each overrides the config) and what it prints; for search, resume, grow."""
    search.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, else MLFLOW_TRACKING_URI, "
                                               "else ./pngrow-runs/mlflow.db)")
    search.add_argument("--optuna-storage", help="Optuna storage URL (default: the config's, else ./pngrow-runs)")
    search.add_argument("--ray-address", help="Ray cluster address (default: the config's, else in-process Ray)")
    search.add_argument("--workdir", help="folder for the local defaults (default: the config's, else pngrow-runs)")
    search.add_argument("--json", help="write the search's summary here")
    search.add_argument("--quiet", action="store_true", help="print only the final summary")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="URI",
                        help="a model folder, or models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/...")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default: MLFLOW_TRACKING_URI, "
                                               "else ./pngrow-runs/mlflow.db)")
    parser.add_argument("--tile", type=int, help="process in tiles of this many input pixels a side (default: "
                                                 "whole images up to 1024x1024 pixels)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def _load(args: argparse.Namespace):  # noqa: ANN202
    from .api import is_mlflow_uri, load_shared_model
    from .config import tracking_uri

    return load_shared_model(args.model, tracking_uri(args.tracking_uri) if is_mlflow_uri(args.model) else None,
                             device=args.device)


def _read_image(path: str):  # noqa: ANN202
    from ..workers.data import load_image

    if not Path(path).is_file():
        raise ValueError(f"input image {path!r} does not exist")
    return load_image(path).permute(1, 2, 0).numpy()


def _write_image(array, path: str) -> None:  # noqa: ANN001
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _report(args: argparse.Namespace) -> int:
    from .registry import resolve_run
    from .report import build_report, load_baseline

    tracking = _open_tracking(args)
    run = resolve_run(tracking, args.run)
    if run.data.tags.get("pngrow.kind") != "search":
        raise ValueError(f"run {args.run!r} is a {run.data.tags.get('pngrow.kind', 'non-pngrow')} run, not a search")
    out = Path(args.out or f"report-{run.info.run_id[:8]}")
    for path in build_report(tracking, run, out, load_baseline(args.baseline)):
        print(path)
    return 0


def _compress(args: argparse.Namespace) -> int:
    image = _read_image(args.input)
    model = _load(args)
    data = model.compress(image, args.task, args.tile)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_bytes(data)
    bpp = 8 * len(data) / (image.shape[0] * image.shape[1])
    print(f"{args.output}: {len(data):,} bytes, {bpp:.4f} bpp ({args.task}, {model.version})")
    return 0


def _decompress(args: argparse.Namespace) -> int:
    if not Path(args.input).is_file():
        raise ValueError(f"bitstream {args.input!r} does not exist")
    model = _load(args)
    image = model.decompress(Path(args.input).read_bytes())
    _write_image(image, args.output)
    print(f"{args.output}: {image.shape[1]}x{image.shape[0]}")
    return 0


def _upscale(args: argparse.Namespace) -> int:
    image = _read_image(args.input)
    model = _load(args)
    out = model.upscale(image, task=args.task, scale=args.scale, tile=args.tile)
    _write_image(out, args.output)
    print(f"{args.output}: {out.shape[1]}x{out.shape[0]} from {image.shape[1]}x{image.shape[0]}")
    return 0


def _tracking_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./pngrow-runs)")
    parser.add_argument("--experiment", default="pngrow", help="MLflow experiment (default pngrow)")
    parser.add_argument("--workdir", default="pngrow-runs", help="folder of the local default tracking store")


def _open_tracking(args: argparse.Namespace):  # noqa: ANN202 - imported lazily to keep `pngrow run` light
    from .config import tracking_uri
    from .tracking import Tracking

    uri = tracking_uri(args.tracking_uri, args.workdir)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ValueError(f"no pngrow tracking store at {uri!r}: run a search first or pass --tracking-uri")
    tracking = Tracking(uri)
    found = tracking.client.get_experiment_by_name(args.experiment)
    if found is None:
        raise ValueError(f"MLflow experiment {args.experiment!r} does not exist at {uri!r}")
    tracking.experiment_id = found.experiment_id
    return tracking


def _search_config(args: argparse.Namespace, path: str | None, **fields: Any):  # noqa: ANN202
    """The search config from ``path`` (or defaults), with ``fields`` and the command line's service flags."""
    from dataclasses import replace

    from .config import SearchConfig, load_config

    overrides = {"workdir": args.workdir, "optuna_storage": args.optuna_storage}
    if path:
        config = replace(load_config(path, {**overrides, **fields}), **fields)
    else:
        config = SearchConfig(**{**{k: v for k, v in overrides.items() if v is not None}, **fields})
    return replace(config, tracking_uri=args.tracking_uri or config.tracking_uri,
                   ray=replace(config.ray, address=args.ray_address or config.ray.address))


def _search(args: argparse.Namespace) -> int:
    result = _run_search(args, _search_config(args, args.config))
    print(f"promote it: pngrow promote {result.search_id} --name NAME")
    return 0


def _resume(args: argparse.Namespace) -> int:
    from .config import tracking_uri

    uri = tracking_uri(args.tracking_uri, args.workdir or "pngrow-runs")
    _run_search(args, None, resume=(args.search_id, uri))
    return 0


def _grow(args: argparse.Namespace) -> int:
    from .api import resolve_checkpoint
    from .registry import promote
    from .tracking import Tracking

    name = args.name
    if name is None:
        if not args.base.startswith("models:/"):
            raise ValueError(f"--name is needed to register a model grown from {args.base!r}")
        name = args.base.removeprefix("models:/").partition("@")[0].partition("/")[0]
    import tempfile

    from ..workers.png import read_description

    probe = _search_config(args, args.config, family="", tasks=list(args.tasks))
    with tempfile.TemporaryDirectory(prefix="pngrow-grow-") as tmp:
        folder, _ = resolve_checkpoint(args.base, tmp, probe.resolved_tracking_uri())
        architecture = read_description(folder)["architecture"]
    config = _search_config(args, args.config, family=architecture["family"], tasks=list(args.tasks), arch={},
                            base_model=args.base, name=f"grow {','.join(args.tasks)} into {args.base}")
    result = _run_search(args, config)
    version = promote(Tracking(config.resolved_tracking_uri(), config.experiment), result.search_id, name,
                      args.alias)
    moved = f"; alias {args.alias} points at it" if args.alias else ""
    print(f"registered {name} version {version.version} (tasks {version.tags['pngrow.tasks']}, grown from "
          f"{version.tags['pngrow.grown_from_model']}){moved}")
    return 0


def _logger(quiet: bool):  # noqa: ANN202
    """Print progress lines (above any progress bar), or nothing when ``quiet``."""
    from tqdm import tqdm

    return (lambda message: None) if quiet else (lambda message: tqdm.write(message))


def _run_search(args: argparse.Namespace, config: Any, resume: tuple[str, str] | None = None):  # noqa: ANN202
    from .search import resume_search, run_search

    if resume is None:
        result = run_search(config, log=_logger(args.quiet))
    else:
        result = resume_search(resume[0], resume[1], _logger(args.quiet), args.optuna_storage, args.ray_address)
    summary = {
        "search_id": result.search_id, "name": result.name, "model_uri": result.model_uri,
        "wall_seconds": result.wall_seconds, "train_seconds": result.train_seconds, "overhead": result.overhead,
        "utilisation": result.utilisation, "trials": result.trials,
        "stages": [{"task": s.task, "run_id": s.run_id, "chosen_trial_run": s.chosen.run_id, "finished": s.finished,
                    "failed": s.failed, "metrics": s.chosen.metrics, "density": s.chosen.density,
                    "stored_params": s.chosen.stored_params} for s in result.stages],
        "final_metrics": result.final_metrics,
    }
    print(f"search {result.search_id} finished: {result.trials} trials in {result.wall_seconds:.1f} s, "
          f"{100 * result.overhead:.1f}% of it outside training; model {result.model_uri}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return result


def _status(args: argparse.Namespace) -> int:
    from .status import format_status, search_status

    tracking = _open_tracking(args)
    print(format_status(search_status(tracking, args.limit)))
    return 0


def _promote(args: argparse.Namespace) -> int:
    from .registry import promote

    version = promote(_open_tracking(args), args.run, args.name, args.alias)
    print(f"registered {args.name} version {version.version} from run {version.run_id}; "
          f"load it as models:/{args.name}@{args.alias}")
    return 0


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..workers.data import default_images, load_folder
    from ..workers.models import get_family
    from ..workers.png import save_shared
    from ..workers.training import StageSettings, train_shared

    family = get_family(args.family, _split(args.tasks) or None, **_arch_options(args.arch))
    tasks = family.tasks
    budget = dict(family.train_defaults)
    for key in ("grow_steps", "prune_steps", "finetune_steps", "batch_size"):
        if getattr(args, key) is not None:
            budget[key] = getattr(args, key)
    shapes = _per_task(_split(args.block_shape), tasks, "--block-shape")
    ratios = [_float(r, "--prune") for r in _per_task(_split(args.prune), tasks, "--prune")]
    settings = [
        StageSettings(block_shape=shape, prune_ratio=ratio, reuse=args.reuse, lr=args.lr,  # type: ignore[arg-type]
                      selection_lr=args.selection_lr, reuse_penalty=args.reuse_penalty, seed=args.seed, **budget)
        for shape, ratio in zip(shapes, ratios)
    ]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {args.device!r} is not available on this machine")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise ValueError(f"--eval-limit {args.eval_limit!r} must be at least 1")
    torch.set_num_threads(max(1, args.threads))
    train = load_folder(args.data) if args.data else default_images("train")
    evaluation = (load_folder(args.eval_data) if args.eval_data else default_images("eval")).limit(args.eval_limit)
    log = _logger(args.quiet)
    log(f"pngrow run: {family.name} tasks {','.join(tasks)} on {len(train)} training images from {train.source}, "
        f"evaluating on {len(evaluation)} from {evaluation.source}")
    initial = _read_state_dict(args.init) if args.init else None
    from .._progress import progress_bar

    done = {task: 0 for task in tasks}
    with progress_bar(sum(s.total_steps for s in settings), "steps", "training") as bar:

        def on_step(task: str, step: int, figures: dict[str, float]) -> None:
            bar.update(step + 1 - done[task])
            done[task] = step + 1

        result = train_shared(family, settings, train, evaluation, log=log, device=args.device, initial=initial,
                              on_step=on_step)
    report = result.as_dict()
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.out:
        save_shared(result.shared, args.out, family.architecture())
        print(f"saved the shared model to {args.out}")
    return 0


def _read_state_dict(path: str) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ValueError(f"--init {path!r} does not exist")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"--init {path!r} is not a safetensors file: {exc}") from None


def format_table(report: dict[str, Any]) -> str:
    """The per-task table that ``pngrow run`` prints, from its JSON report."""
    metric_names = list(report["tasks"][0]["metrics"])
    header = ["task", *metric_names, "density", "active params", f"GMACs@{report['macs_input'][-1]}px", "dense GMACs"]
    rows = [header]
    for task in report["tasks"]:
        rows.append([task["name"], *(f"{task['metrics'][m]:.3f}" for m in metric_names), f"{task['density']:.3f}",
                     f"{task['active_params']:,}", f"{task['macs'] / 1e9:.3f}", f"{task['dense_macs'] / 1e9:.3f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    model = report["model"]
    lines.append(
        f"stored params {model['stored_params']:,} (+{model['mask_bits']:,} mask bits) vs "
        f"{model['independent_params']:,} for {len(report['tasks'])} separate dense models "
        f"({model['stored_params'] / model['independent_params']:.2f}x); wall time {report['seconds']:.1f} s"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pngrow`` command line; bad input ends with one line naming it and exit status 2."""
    from ..errors import SearchError
    from ..workers.png import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ValueError, KeyError, CheckpointError, FileNotFoundError, SearchError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"pngrow: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
