"""The ``pngrow`` command line. ``main(argv)`` returns the exit status, so tests call it directly.

``pngrow run`` trains one shared model for a family's tasks by prune-and-grow on this machine and prints a table.
``pngrow search CONFIG`` runs a search on Ray with Optuna and MLflow; ``pngrow status`` lists searches;
``pngrow promote`` registers a search's shared model in the MLflow Model Registry; ``pngrow export`` writes each
task's compacted model as ONNX graphs, checked in ONNX Runtime.

Each command is a :class:`_Command` (as in Optuna's ``optuna/cli.py``): its name, its help, its options beside the
handler that reads them, registered in :data:`_COMMANDS`. Heavy modules are imported inside the handlers, so
``pngrow --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from ..errors import SearchError, failure_line
from ..workers.settings import PRECISIONS
from . import names

__all__ = ["USER_ERRORS", "build_parser", "format_table", "main"]

# What a user's input or environment causes, shown as one line with exit status 2: bad values (ValueError, and so
# pngrow's ConfigError and CheckpointError and an unknown task), searches that cannot go on (SearchError, and so
# ServiceError), paths that are missing or not usable, and training that diverged under the settings given. Any other
# exception is a defect: one line with exit status 1, and its traceback with --debug.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, SearchError, FileNotFoundError, PermissionError,
                                                IsADirectoryError, NotADirectoryError, FloatingPointError)


# --- shared helpers ------------------------------------------------------------------------------------------------
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


def _write_json(path: str, data: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _logger(quiet: bool) -> Callable[[str], None]:
    """Print progress lines (above any progress bar), or nothing when ``quiet``."""
    from tqdm import tqdm

    return (lambda message: None) if quiet else (lambda message: tqdm.write(message))


class _Command(ABC):
    """One ``pngrow`` subcommand: its options (:meth:`add_arguments`) beside its handler (:meth:`run`)."""

    name: ClassVar[str]
    help: ClassVar[str]

    @abstractmethod
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this command's arguments to its subparser."""

    @abstractmethod
    def run(self, args: argparse.Namespace) -> int:
        """Carry the command out; returns the exit status."""


# --- pngrow run ----------------------------------------------------------------------------------------------------
class _Run(_Command):
    name = "run"
    help = "train one shared model for a family's tasks on this machine"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--family", default="sisr", help="model family: sisr (default) or nic")
        add("--tasks", help="comma-separated task order, e.g. x2,x3,x4 or q2,q4,q6 (family default)")
        add("--arch", action="append", default=[], metavar="KEY=VALUE",
            help="architecture option, e.g. width=64 depth=16 (sisr) or N=128 M=192 codec=... (nic)")
        add("--block-shape", default="4x4", help="OUTxIN channels per block, one or one per task")
        add("--prune", default="0.5", help="ratio of each task's blocks to release, one or one per task")
        add("--reuse", default="learned", choices=["learned", "all", "none"],
            help="how a task reuses earlier blocks: a learned selection, all of them, or none")
        add("--reuse-penalty", type=float, default=0.0, help="loss weight on the share of reused blocks")
        add("--prune-scope", default="own", choices=["own", "active"],
            help="what pruning releases: the task's own new blocks (own), or its reused earlier blocks too (active: "
                 "every task computes with at most 1 - prune of the blocks it could use, so later tasks compact)")
        add("--paired", action="store_true",
            help="prune the model's channel pairs by channels (sisr: the two convolutions of each residual block), so "
                 "a released inner channel is neither computed nor read and the compacted model is faster")
        add("--grow-from",
            help="where a later task's free blocks start: PyTorch's initialisation (fresh), as an earlier task left "
                 "them when it released them (released), or zero, so that the task starts computing what the last "
                 "one committed (default fresh)")
        for name in ("grow-steps", "prune-steps", "prune-events", "finetune-steps", "batch-size"):
            add(f"--{name}", type=int, help="family default when omitted")
        add("--precision", choices=("native", *PRECISIONS),
            help="float32, bfloat16 (autocast), or native: bfloat16 where the device computes it in hardware "
                 "(AVX-512 BF16 or AMX, a recent GPU), else float32 (default: the family's, native for nic, float32 "
                 "for sisr)")
        add("--lr", type=float, default=5e-4)
        add("--selection-lr", type=float, default=1e-3)
        add("--data", help="folder of training images (default: scikit-image's bundled photos)")
        add("--eval-data", help="folder of evaluation images (default: scikit-image's bundled photos)")
        add("--eval-limit", type=int, help="evaluate on the first N images only")
        add("--init", help="dense weights (safetensors state dict of the family's model) for task 1 to start from")
        add("--json", help="write the per-task results here")
        add("--out", help="save the shared model here (safetensors + JSON)")
        add("--seed", type=int, default=0)
        add("--device", default="cpu", help="cpu or cuda")
        add("--threads", type=int, default=os.cpu_count(), help="CPU threads for PyTorch")
        add("--quiet", action="store_true", help="print only the final table")

    @staticmethod
    def _settings(args: argparse.Namespace, family: Any) -> list[Any]:
        """One :class:`~pngrow.workers.settings.TaskSettings` per task from the options (the family's training budget
        by default)."""
        from ..workers.settings import TaskSettings, native_precision

        tasks = family.tasks
        budget = dict(family.train_defaults)
        for key in ("grow_from", "grow_steps", "prune_steps", "prune_events", "finetune_steps", "batch_size",
                    "precision"):
            if getattr(args, key) is not None:
                budget[key] = getattr(args, key)
        if budget.get("precision") == "native":
            budget["precision"] = native_precision(args.device)
        shapes = _per_task(_split(args.block_shape), tasks, "--block-shape")
        ratios = [_float(r, "--prune") for r in _per_task(_split(args.prune), tasks, "--prune")]
        common = {"reuse": args.reuse, "lr": args.lr, "selection_lr": args.selection_lr,
                  "reuse_penalty": args.reuse_penalty, "prune_scope": args.prune_scope,
                  "paired": args.paired, "seed": args.seed, **budget}
        return [TaskSettings(block_shape=shape, prune_ratio=ratio, **common) for shape, ratio in zip(shapes, ratios)]

    def run(self, args: argparse.Namespace) -> int:
        import torch

        from .._progress import progress_bar
        from ..workers.classic_codecs import psnr_at_rates
        from ..workers.data import default_images, load_folder
        from ..workers.models import Codec, get_family
        from ..workers.png import save_shared
        from ..workers.training import train_shared
        from .api import check_device

        family = get_family(args.family, _split(args.tasks) or None, **_arch_options(args.arch))
        settings = self._settings(args, family)
        check_device(args.device)
        if args.eval_limit is not None and args.eval_limit < 1:
            raise ValueError(f"--eval-limit {args.eval_limit!r} must be at least 1")
        torch.set_num_threads(max(1, args.threads))
        train = load_folder(args.data) if args.data else default_images("train")
        evaluation = (load_folder(args.eval_data) if args.eval_data else default_images("eval")).limit(args.eval_limit)
        log = _logger(args.quiet)
        log(f"pngrow run: {family.name} tasks {','.join(family.tasks)} on {len(train)} training images from "
            f"{train.source}, evaluating on {len(evaluation)} from {evaluation.source}")
        initial = _read_state_dict(args.init) if args.init else None
        done = {task: 0 for task in family.tasks}
        with progress_bar(sum(s.total_steps for s in settings), "steps", "training") as bar:

            def on_step(task: str, step: int, figures: dict[str, float]) -> None:
                bar.update(step + 1 - done[task])
                done[task] = step + 1

            result = train_shared(family, settings, train, evaluation, log=log, device=args.device, initial=initial,
                                  on_step=on_step)
        report = result.as_dict()
        if isinstance(family, Codec):  # what the same bits buy with JPEG, on the same images
            jpeg = psnr_at_rates("jpeg", evaluation.images, {t["name"]: t["metrics"]["bpp"] for t in report["tasks"]})
            for task in report["tasks"]:
                task["jpeg_psnr"] = jpeg[task["name"]]
        print(format_table(report))
        if args.json:
            _write_json(args.json, report)
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
    jpeg = ["jpeg_psnr"] if "jpeg_psnr" in report["tasks"][0] else []  # a codec's: JPEG's PSNR at the task's bpp
    header = ["task", *metric_names, *jpeg, "density", "active params", f"GMACs@{report['macs_input'][-1]}px",
              "dense GMACs"]
    rows = [header]
    for task in report["tasks"]:
        rows.append([task["name"], *(f"{task['metrics'][m]:.3f}" for m in metric_names),
                     *(f"{task[key]:.3f}" for key in jpeg), f"{task['density']:.3f}", f"{task['active_params']:,}",
                     f"{task['macs'] / 1e9:.3f}", f"{task['dense_macs'] / 1e9:.3f}"])
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


# --- searches: search, resume, grow --------------------------------------------------------------------------------
def _search_options(parser: argparse.ArgumentParser) -> None:
    """Where a search's services are (each overrides the config) and what it prints; for search, resume, grow."""
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, else MLFLOW_TRACKING_URI, "
                                               "else ./pngrow-runs/mlflow.db)")
    parser.add_argument("--optuna-storage", help="Optuna storage URL (default: the config's, else ./pngrow-runs)")
    parser.add_argument("--ray-address", help="Ray cluster address (default: the config's, else in-process Ray)")
    parser.add_argument("--workdir", help="folder for the local defaults (default: the config's, else pngrow-runs)")
    parser.add_argument("--json", help="write the search's summary here")
    parser.add_argument("--quiet", action="store_true", help="print only the final summary")


def _search_config(args: argparse.Namespace, path: str | None, **fields: Any) -> Any:
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


def _search_summary(result: Any) -> dict[str, Any]:
    """What ``--json`` writes for a finished search."""
    return {
        "search_id": result.search_id, "name": result.name, "model_uri": result.model_uri,
        "wall_seconds": result.wall_seconds, "train_seconds": result.train_seconds, "overhead": result.overhead,
        "utilisation": result.utilisation, "trials": result.trials, "phase_seconds": result.phase_seconds,
        "stages": [{"task": s.task, "run_id": s.run_id, "chosen_trial_run": s.chosen.run_id, "finished": s.finished,
                    "failed": s.failed, "stopped_early": s.stopped, "metrics": s.chosen.metrics,
                    "density": s.chosen.density, "stored_params": s.chosen.stored_params,
                    **({"latency_ms": s.chosen.latency_ms, "dense_latency_ms": s.chosen.dense_latency_ms,
                        "speedup": s.chosen.speedup} if math.isfinite(s.chosen.latency_ms) else {})}
                   for s in result.stages],
        "final_metrics": result.final_metrics,
    }


def _drive_search(args: argparse.Namespace, config: Any, resume: tuple[str, str] | None = None) -> Any:
    """Run (or resume) a search, print its closing line and write its ``--json`` summary; returns its result."""
    from .search import resume_search, run_search

    if resume is None:
        result = run_search(config, log=_logger(args.quiet))
    else:
        result = resume_search(resume[0], resume[1], _logger(args.quiet), args.optuna_storage, args.ray_address)
    print(f"search {result.search_id} finished: {result.trials} trials in {result.wall_seconds:.1f} s, "
          f"{100 * result.overhead:.1f}% of it outside training; model {result.model_uri}")
    if args.json:
        _write_json(args.json, _search_summary(result))
    return result


class _Search(_Command):
    name = "search"
    help = "search a shared model on Ray (Optuna per task, MLflow lineage)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("config", help="search config YAML, e.g. search_spaces/examples/tiny-sisr.yaml")
        parser.add_argument("--smoke-test", action="store_true",
                            help="check the whole search on its services, cluster and data in minutes: one trial per "
                                 "stage, a few steps each (named <name>-smoke-test; not for promotion)")
        _search_options(parser)

    def run(self, args: argparse.Namespace) -> int:
        from .config import as_smoke_test

        config = _search_config(args, args.config)
        result = _drive_search(args, as_smoke_test(config) if args.smoke_test else config)
        if not args.smoke_test:
            print(f"promote it: pngrow promote {result.search_id} --name NAME")
        return 0


class _Resume(_Command):
    name = "resume"
    help = "continue a search whose driver died, keeping its finished work"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("search_id", help="the search's id (pngrow status lists them)")
        _search_options(parser)

    def run(self, args: argparse.Namespace) -> int:
        from .config import tracking_uri

        uri = tracking_uri(args.tracking_uri, args.workdir or "pngrow-runs")
        _drive_search(args, None, resume=(args.search_id, uri))
        return 0


class _Grow(_Command):
    name = "grow"
    help = "grow new tasks into a released shared model, register the result"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--from", dest="base", required=True, metavar="URI",
                            help="the released model: models:/NAME@ALIAS, models:/NAME/VERSION or a model folder")
        parser.add_argument("--task", dest="tasks", action="append", required=True,
                            help="a task to add (repeatable)")
        parser.add_argument("--config", help="search config whose budget, space, data and services to use (its "
                                             "family, tasks and arch are the base model's)")
        parser.add_argument("--name", help="registered model for the new version (default: the base's, for models:/)")
        parser.add_argument("--alias", help="alias to point at the new version (default: none moves)")
        _search_options(parser)

    @staticmethod
    def _base_family(args: argparse.Namespace) -> str:
        """The family of the released model, read from its checkpoint's description."""
        import tempfile

        from ..workers.png import read_description
        from .api import resolve_checkpoint

        probe = _search_config(args, args.config, family="", tasks=list(args.tasks))
        with tempfile.TemporaryDirectory(prefix="pngrow-grow-") as tmp:
            folder, _ = resolve_checkpoint(args.base, tmp, probe.resolved_tracking_uri())
            return read_description(folder)["architecture"]["family"]

    def run(self, args: argparse.Namespace) -> int:
        from .registry import promote
        from .tracking import Tracking
        from .uris import parse_model_uri

        name, base = args.name, parse_model_uri(args.base)
        if name is None:
            if base is None:
                raise ValueError(f"--name is needed to register a model grown from {args.base!r}")
            name = base.name
        config = _search_config(args, args.config, family=self._base_family(args), tasks=list(args.tasks), arch={},
                                base_model=args.base, name=f"grow {','.join(args.tasks)} into {args.base}")
        result = _drive_search(args, config)
        version = promote(Tracking(config.resolved_tracking_uri(), config.experiment), result.search_id, name,
                          args.alias)
        moved = f"; alias {args.alias} points at it" if args.alias else ""
        print(f"registered {name} version {version.version} (tasks {version.tags[names.TASKS]}, grown from "
              f"{version.tags[names.GROWN_FROM_MODEL]}){moved}")
        return 0


# --- tracking store: status, promote, report -----------------------------------------------------------------------
def _tracking_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./pngrow-runs)")
    parser.add_argument("--experiment", default="pngrow", help="MLflow experiment (default pngrow)")
    parser.add_argument("--workdir", default="pngrow-runs", help="folder of the local default tracking store")


def _open_tracking(args: argparse.Namespace) -> Any:
    """The MLflow experiment that ``--tracking-uri``/``--experiment`` name; a ``ValueError`` if it is not there."""
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


class _Status(_Command):
    name = "status"
    help = "running and finished searches, their stages and progress"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _tracking_options(parser)
        parser.add_argument("--limit", type=int, default=20, help="newest searches to show (default 20)")

    def run(self, args: argparse.Namespace) -> int:
        from .status import format_status, search_status

        print(format_status(search_status(_open_tracking(args), args.limit)))
        return 0


class _Promote(_Command):
    name = "promote"
    help = "register a search's (or stage's) shared model, set an alias"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("run", metavar="SEARCH_OR_RUN", help="a search's id or name, or a stage run's id")
        parser.add_argument("--name", required=True, help="registered model name")
        parser.add_argument("--alias", default="champion",
                            help="alias to point at the new version (default champion)")
        parser.add_argument("--onnx", action="store_true",
                            help="also export every task as ONNX (pngrow export) and attach it to the version")
        _tracking_options(parser)

    def run(self, args: argparse.Namespace) -> int:
        from .registry import promote

        version = promote(_open_tracking(args), args.run, args.name, args.alias, onnx=args.onnx)
        print(f"registered {args.name} version {version.version} from run {version.run_id}; "
              f"load it as models:/{args.name}@{args.alias}")
        if args.onnx:
            print(f"its tasks as ONNX: {version.tags[names.ONNX]}")
        return 0


class _Report(_Command):
    name = "report"
    help = "draw a search's pictures: block sharing, quality vs cost, Pareto"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("run", metavar="SEARCH", help="a search's id or name")
        parser.add_argument("--out", help="folder for the pictures (default report-<search id>)")
        parser.add_argument("--baseline", help="JSON of separate-model figures per task to draw beside (bench output)")
        _tracking_options(parser)

    def run(self, args: argparse.Namespace) -> int:
        from .registry import resolve_run
        from .report import build_report, load_baseline

        tracking = _open_tracking(args)
        run = resolve_run(tracking, args.run)
        kind = run.data.tags.get(names.KIND)
        if kind != names.Kind.SEARCH:
            raise ValueError(f"run {args.run!r} is a {kind or 'non-pngrow'} run, not a search")
        out = Path(args.out or f"report-{run.info.run_id[:8]}")
        for path in build_report(tracking, run, out, load_baseline(args.baseline)):
            print(path)
        return 0


# --- restoring images: compress, decompress, upscale ---------------------------------------------------------------
class _Restore(_Command):
    """A command that loads a shared model (``--model``) and restores images with it on ``--device``."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, metavar="URI",
                            help="a model folder, or models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/...")
        parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default: MLFLOW_TRACKING_URI, "
                                                   "else ./pngrow-runs/mlflow.db)")
        parser.add_argument("--tile", type=int, help="process in tiles of this many input pixels a side (default: "
                                                     "whole images up to 1024x1024 pixels)")
        parser.add_argument("--device", default="cpu", help="cpu or cuda")
        self.add_io_arguments(parser)

    @abstractmethod
    def add_io_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The command's own options, its input and its output."""

    @abstractmethod
    def restore(self, args: argparse.Namespace) -> int:
        """Carry the command out (the device is known to exist)."""

    def run(self, args: argparse.Namespace) -> int:
        from .api import check_device

        check_device(args.device)
        return self.restore(args)

    @staticmethod
    def load(args: argparse.Namespace) -> Any:
        """The :class:`~pngrow.pipeline.api.RestorationModel` that ``--model`` names, on ``--device``."""
        from .api import load_shared_model
        from .uris import is_mlflow_uri
        from .config import tracking_uri

        return load_shared_model(args.model, tracking_uri(args.tracking_uri) if is_mlflow_uri(args.model) else None,
                                 device=args.device)


def _read_image(path: str) -> Any:
    from ..workers.data import load_image

    if not Path(path).is_file():
        raise ValueError(f"input image {path!r} does not exist")
    return load_image(path).permute(1, 2, 0).numpy()


def _write_image(array: Any, path: str) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


class _Compress(_Restore):
    name = "compress"
    help = "write the bitstream of an image at a NIC task's rate"

    def add_io_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--task", required=True, help="the rate, e.g. q4")
        parser.add_argument("input", help="image file (PNG, JPEG, ...)")
        parser.add_argument("output", help="bitstream file to write")

    def restore(self, args: argparse.Namespace) -> int:
        image = _read_image(args.input)
        model = self.load(args)
        data = model.compress(image, args.task, args.tile)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_bytes(data)
        bpp = 8 * len(data) / (image.shape[0] * image.shape[1])
        print(f"{args.output}: {len(data):,} bytes, {bpp:.4f} bpp ({args.task}, {model.version})")
        return 0


class _Decompress(_Restore):
    name = "decompress"
    help = "decode a pngrow bitstream (its task is in its header)"

    def add_io_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("input", help="bitstream file")
        parser.add_argument("output", help="PNG file to write")

    def restore(self, args: argparse.Namespace) -> int:
        if not Path(args.input).is_file():
            raise ValueError(f"bitstream {args.input!r} does not exist")
        model = self.load(args)
        image = model.decompress(Path(args.input).read_bytes())
        _write_image(image, args.output)
        print(f"{args.output}: {image.shape[1]}x{image.shape[0]}")
        return 0


class _Upscale(_Restore):
    name = "upscale"
    help = "super-resolve an image with a SISR task"

    def add_io_arguments(self, parser: argparse.ArgumentParser) -> None:
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--scale", type=int, help="zoom factor, e.g. 3")
        which.add_argument("--task", help="the task, e.g. x3")
        parser.add_argument("input", help="image file")
        parser.add_argument("output", help="PNG file to write")

    def restore(self, args: argparse.Namespace) -> int:
        image = _read_image(args.input)
        model = self.load(args)
        out = model.upscale(image, task=args.task, scale=args.scale, tile=args.tile)
        _write_image(out, args.output)
        print(f"{args.output}: {out.shape[1]}x{out.shape[0]} from {image.shape[1]}x{image.shape[0]}")
        return 0


class _Eval(_Command):
    name = "eval"
    help = "measure a shared model on an image folder, in CompressAI's (NIC) or BasicSR's (SISR) terms"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", metavar="MODEL", help="a model folder, or models:/NAME@ALIAS, runs:/RUN/...")
        parser.add_argument("--data", required=True, help="image folder; for SISR also HR/ + LR_bicubic/X<s>/ pairs")
        parser.add_argument("--json", required=True, help="results file to write")
        parser.add_argument("--name", default="pngrow", help="the curve's name in plots (default: pngrow)")
        parser.add_argument("--limit", type=int, help="the first N images only")
        parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default as for compress)")
        parser.add_argument("--device", default="cpu", help="cpu or cuda")

    def run(self, args: argparse.Namespace) -> int:
        from ..workers.data import load_folder
        from .api import check_device, load_shared_model
        from .uris import is_mlflow_uri
        from .config import tracking_uri
        from .evaluate import evaluate

        check_device(args.device)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit {args.limit!r} must be at least 1")
        images = load_folder(args.data).limit(args.limit)
        model = load_shared_model(args.model, tracking_uri(args.tracking_uri) if is_mlflow_uri(args.model) else None,
                                  device=args.device, progress=False)
        document = evaluate(model, images, args.name)
        _write_json(args.json, document)
        print(f"{args.json}: {model.family.name} results of {', '.join(model.tasks)} on {len(images)} images")
        return 0


# --- deployment: export ------------------------------------------------------------------------------------------
class _Export(_Command):
    name = "export"
    help = "export each task's compacted model as ONNX, checked in ONNX Runtime"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", metavar="MODEL", help="a model folder, or models:/NAME@ALIAS, runs:/RUN/...")
        parser.add_argument("--task", action="append", default=[],
                            help="a task to export (repeatable; default: every task)")
        parser.add_argument("--out", required=True, help="folder to write each task's folder into")
        parser.add_argument("--opset", type=int, help="ONNX opset (default 18, which ONNX Runtime, OpenVINO and "
                                                      "TensorRT all run)")
        parser.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default as for compress)")

    def run(self, args: argparse.Namespace) -> int:
        from .config import tracking_uri
        from .export import export_model
        from .uris import is_mlflow_uri

        uri = tracking_uri(args.tracking_uri) if is_mlflow_uri(args.model) else None
        for exported in export_model(args.model, args.out, args.task or None, args.opset, uri):
            worst = max(exported.max_difference.values())
            print(f"{exported.folder}: {', '.join(exported.graphs.values())} (largest difference from PyTorch in "
                  f"ONNX Runtime {worst:.1e})")
        return 0


# --- the parser and main -------------------------------------------------------------------------------------------
_COMMANDS: tuple[_Command, ...] = (_Run(), _Search(), _Resume(), _Status(), _Promote(), _Grow(), _Report(),
                                   _Compress(), _Decompress(), _Upscale(), _Eval(), _Export())


def build_parser() -> argparse.ArgumentParser:
    """The ``pngrow`` parser: one subcommand per entry of :data:`_COMMANDS`; ``--debug`` before or after it."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, print its traceback too")
    parser = argparse.ArgumentParser(prog="pngrow", description="One network for several restoration tasks (PnG).",
                                     parents=[debug])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, parents=[debug])
        command.add_arguments(sub)
        sub.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pngrow`` command line and return its exit status.

    A user's error (:data:`USER_ERRORS`: bad input, a search that cannot go on, a missing path) ends with one line
    naming it and status 2; any other exception (a defect) with one line and status 1. ``--debug`` prints the
    traceback before that line.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except Exception as exc:  # noqa: BLE001 - every failure ends in one line; --debug shows the rest
        if getattr(args, "debug", False):
            traceback.print_exc()
        if isinstance(exc, USER_ERRORS):
            text = str(exc).strip()
            print(f"pngrow: error: {text.splitlines()[0] if text else failure_line(exc)}", file=sys.stderr)
            return 2
        print(f"pngrow: error: {failure_line(exc)} (a defect of pngrow; --debug shows its traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
