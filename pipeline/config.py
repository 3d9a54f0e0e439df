"""The YAML that describes one search: family, model size, task order, data, budget, search space, services.

Every field but ``family`` and ``tasks`` has a default that runs on this machine alone (in-process Ray, MLflow in a
SQLite file and Optuna in another, both under ``workdir``).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .._validation import ConfigError, check_keys, typed

__all__ = ["COST_OBJECTIVES", "RAY_DEVICES", "EarlyStopping", "RayOptions", "SearchConfig", "as_smoke_test",
           "flat_params", "load_config", "public_config", "redact", "tracking_uri"]


def tracking_uri(uri: str | None = None, workdir: str = "pngrow-runs") -> str:
    """``uri`` if given, else ``MLFLOW_TRACKING_URI``, else the embedded default: SQLite in ``workdir``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def redact(uri: str | None) -> str | None:
    """``uri`` with any password (``scheme://user:password@host``) replaced, for logs, params and tags.

    >>> redact("postgresql://pngrow:s3cret@db:5432/optuna")
    'postgresql://pngrow:***@db:5432/optuna'
    """
    return None if uri is None else re.sub(r"(://[^/:@]*):[^/@]*@", r"\1:***@", uri)

# Costs a search can minimise beside quality: the share of weights a task computes with, the stored parameters of the
# whole model, and the task's measured latency compacted (``latency``: the median on the trial's device as a share of
# the dense model's, timed in turns beside it; the milliseconds of both are logged too).
COST_OBJECTIVES = ("density", "stored_params", "latency")
_TOP = {"name", "family", "tasks", "arch", "data", "search_space", "budget", "objectives", "select", "seed",
        "tracking", "optuna_storage", "ray", "workdir", "init", "base_model"}


RAY_DEVICES = ("auto", "cpu", "cuda")  # RayOptions.device
_BUDGET = {"trials_per_stage", "parallel_trials", "early_stopping"}


@dataclass(frozen=True)
class RayOptions:
    """Where trials run: ``address`` of a Ray cluster (None: the Ray job's cluster inside ``ray job submit``, else
    Ray started in this process on this machine's CPUs; ``auto``, ``host:port`` and ``ray://...`` are Ray's), and on
    what: ``device`` ``auto`` trains on a GPU where Ray assigned one and CUDA works (else on the CPU, with a warning
    on the trial's run), ``cpu`` never asks for GPUs, ``cuda`` fails a trial whose node lacks a working GPU."""

    address: str | None = None
    num_cpus: int | None = None  # Ray started here only
    cpus_per_trial: int = 1
    gpus_per_trial: float = 1.0  # asked for only when the cluster has GPUs and device is not cpu
    max_retries: int = 1  # reruns of a trial whose worker died
    device: str = "auto"


@dataclass(frozen=True)
class EarlyStopping:
    """Asynchronous successive halving with one rung, at the end of growing (:mod:`.early_stopping`): a trial goes
    on past it only while its quality there is among the best ``keep`` of the values the stage's rung has had (its
    own included); while the rung has fewer than ``min_trials`` values, every trial goes on."""

    keep: float = 0.5
    min_trials: int = 2


@dataclass(frozen=True)
class SearchConfig:
    """One search. ``load_config`` reads it from YAML; tests build it directly.

    >>> SearchConfig(family="sisr", tasks=["x2", "x3"], workdir="/tmp/runs").resolved_optuna_storage()
    'sqlite:////tmp/runs/optuna.db'
    """

    family: str
    tasks: list[str]
    name: str = "search"
    arch: dict[str, Any] = field(default_factory=dict)
    # folder (uploaded when Ray is a cluster: a runs:/ URI) or s3:// prefix of images or Parquet shards; None: skimage's
    train_data: str | None = None
    eval_data: str | None = None
    eval_limit: int | None = None
    data_cache: str | None = None  # node-local cache of s3:// and uploaded data; None: $PNGROW_CACHE, ~/.cache/pngrow
    search_space: str = ""  # a shipped space's name or a YAML path; empty: the family's full space
    trials_per_stage: int = 8
    parallel_trials: int | None = None  # trials in flight at most; None (``auto``): every slot the cluster has
    early_stopping: EarlyStopping | None = None  # None: every trial trains to the end
    quality: str = ""  # evaluation metric to optimise; empty: the family's
    costs: tuple[str, ...] = ("density",)  # one or more of COST_OBJECTIVES; the first is the rules' cost
    latency_size: int = 0  # side of the square input the latency cost is measured on; 0: the family's
    latency_rounds: int = 10
    time_trials: bool = False  # objectives.latency given: every trial times its task, even with no latency objective
    rule: str = "sparsest_within"
    tolerance: float = 0.1
    seed: int = 0
    tracking_uri: str | None = None
    experiment: str = "pngrow"
    optuna_storage: str | None = None
    ray: RayOptions = field(default_factory=RayOptions)
    workdir: str = "pngrow-runs"
    init: str | None = None  # dense safetensors weights task 1 starts from: a file (uploaded), s3:// or runs:/ URI
    base_model: str | None = None  # a released shared model (folder or models:/ URI) that ``tasks`` grow into
    smoke_test: bool = False  # a check of the search's whole path, not a model to promote (see as_smoke_test)

    @property
    def cost(self) -> str:
        """The cost the selection rules and the Pareto pictures use: the first of :attr:`costs`."""
        return self.costs[0]

    @property
    def measures_latency(self) -> bool:
        """Whether trials time their compacted task: a ``latency`` cost, a rule that reads it, or ``objectives.latency``
        given (to see the speed of a search that optimises another cost)."""
        return self.time_trials or "latency" in self.costs or self.rule == "fastest_within"

    def resolved_tracking_uri(self) -> str:
        """The MLflow tracking URI: the config's, else ``MLFLOW_TRACKING_URI``, else SQLite in ``workdir``."""
        return tracking_uri(self.tracking_uri, self.workdir)

    def resolved_optuna_storage(self) -> str:
        """Optuna's storage URL: the config's, else SQLite in ``workdir``."""
        return self.optuna_storage or f"sqlite:///{Path(self.workdir).resolve() / 'optuna.db'}"

    def local_artifact_root(self) -> str | None:
        """A file URI for artifacts when tracking is a local file (None when a server decides)."""
        uri = self.resolved_tracking_uri()
        if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
            return (Path(self.workdir).resolve() / "artifacts").as_uri()
        return None


def _optional(raw: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    value = raw.get(key)
    if value is None:
        return None
    value = typed(value, f"{where} field {key!r}", kind)
    return _expand(value, f"{where} field {key!r}") if isinstance(value, str) else value


def _expand(value: str, field: str) -> str:
    """``value`` with ``${VAR}`` replaced by the environment variable VAR (secrets stay out of the file)."""
    def lookup(match: re.Match[str]) -> str:
        if match.group(1) not in os.environ:
            raise ConfigError(f"{field} uses ${{{match.group(1)}}}, which is not set in the environment")
        return os.environ[match.group(1)]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lookup, value)


def _positive(value: int, field: str) -> int:
    if value < 1:
        raise ConfigError(f"{field} is {value!r}, must be at least 1")
    return value


def _parallel(value: Any, field: str) -> int | None:
    """``auto`` (None: as many trials at once as the cluster has slots), or a positive cap.

    >>> _parallel("auto", "parallel_trials"), _parallel(3, "parallel_trials")
    (None, 3)
    """
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{field} is {value!r}, not a whole number or 'auto'")
    return _positive(value, field)


def _not_negative(value: float, field: str) -> float:
    if not value >= 0:  # NaN too
        raise ConfigError(f"{field} is {value!r}, must not be negative")
    return value


def _early_stopping(raw: Any, where: str) -> EarlyStopping | None:
    """The budget's ``early_stopping`` field: absent (off), or ``{keep, min_trials}`` with ``keep`` in (0, 1)."""
    if raw is None:
        return None
    raw = check_keys(raw, where, set(EarlyStopping.__dataclass_fields__))
    keep = typed(raw.get("keep", EarlyStopping.keep), f"{where} field 'keep'", float)
    if not 0 < keep < 1:  # NaN too
        raise ConfigError(f"{where} field 'keep' is {keep!r}, must be between 0 and 1 (the share of trials kept)")
    min_trials = typed(raw.get("min_trials", EarlyStopping.min_trials), f"{where} field 'min_trials'", int)
    return EarlyStopping(keep, _positive(min_trials, f"{where} field 'min_trials'"))


def _ray_options(raw: Any, where: str) -> RayOptions:
    raw = check_keys(raw, f"{where} field 'ray'", set(RayOptions.__dataclass_fields__))
    where = f"{where} ray"
    return RayOptions(
        address=_optional(raw, "address", where, str),
        num_cpus=_optional(raw, "num_cpus", where, int),
        cpus_per_trial=_positive(typed(raw.get("cpus_per_trial", 1), f"{where} field 'cpus_per_trial'", int),
                                 f"{where} field 'cpus_per_trial'"),
        gpus_per_trial=_not_negative(typed(raw.get("gpus_per_trial", 1.0), f"{where} field 'gpus_per_trial'", float),
                                     f"{where} field 'gpus_per_trial'"),
        max_retries=typed(raw.get("max_retries", 1), f"{where} field 'max_retries'", int),
        device=_device(raw, where),
    )


def _device(raw: Any, where: str) -> str:
    """The ``device`` field: one of :data:`RAY_DEVICES`; ``cuda`` needs GPUs per trial."""
    device = typed(raw.get("device", "auto"), f"{where} field 'device'", str)
    if device not in RAY_DEVICES:
        raise ConfigError(f"{where} field 'device' is {device!r}, not one of {', '.join(RAY_DEVICES)}")
    if device == "cuda" and raw.get("gpus_per_trial", 1.0) == 0:
        raise ConfigError(f"{where} field 'device' is 'cuda' but 'gpus_per_trial' is 0: a trial would get no GPU")
    return device


def _read(path: str | Path, where: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The config file's top level, known fields only, with ``overrides`` that are not None put in."""
    if not Path(path).is_file():
        raise ConfigError(f"{where} does not exist")
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    raw = dict(check_keys(raw, where, _TOP, {"family", "tasks"}))
    raw.update({key: value for key, value in overrides.items() if value is not None})
    return raw


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SearchConfig:
    """Read and check a search config; ``overrides`` (e.g. from the command line) replace top-level fields.

    >>> load_config("missing.yaml")
    Traceback (most recent call last):
    ...
    pngrow.errors.ConfigError: search config 'missing.yaml' does not exist
    """
    where = f"search config {str(path)!r}"
    raw = _read(path, where, overrides or {})
    tasks = typed(raw["tasks"], f"{where} field 'tasks'", list)
    if not tasks or not all(isinstance(t, str) for t in tasks):
        raise ConfigError(f"{where} field 'tasks' is {tasks!r}, not a non-empty list of task names")
    data = check_keys(raw.get("data") or {}, f"{where} field 'data'", {"train", "eval", "eval_limit", "cache"})
    budget = check_keys(raw.get("budget") or {}, f"{where} field 'budget'", _BUDGET)
    objectives = check_keys(raw.get("objectives") or {}, f"{where} field 'objectives'", {"quality", "cost", "latency"})
    select = check_keys(raw.get("select") or {}, f"{where} field 'select'", {"rule", "tolerance"})
    tracking = check_keys(raw.get("tracking") or {}, f"{where} field 'tracking'", {"uri", "experiment"})
    costs = _costs(objectives.get("cost", "density"), f"{where} objectives field 'cost'")
    latency = check_keys(objectives.get("latency") or {}, f"{where} objectives field 'latency'", {"size", "rounds"})
    eval_limit = _optional(data, "eval_limit", f"{where} data", int)
    if eval_limit is not None:
        _positive(eval_limit, f"{where} data field 'eval_limit'")
    tolerance = _not_negative(typed(select.get("tolerance", 0.1), f"{where} select field 'tolerance'", float),
                              f"{where} select field 'tolerance'")
    return SearchConfig(
        family=typed(raw["family"], f"{where} field 'family'", str),
        tasks=list(tasks),
        name=typed(raw.get("name", Path(path).stem), f"{where} field 'name'", str),
        arch=dict(check_keys(raw.get("arch") or {}, f"{where} field 'arch'", set(map(str, raw.get("arch") or {})))),
        train_data=_optional(data, "train", f"{where} data", str),
        eval_data=_optional(data, "eval", f"{where} data", str),
        eval_limit=eval_limit,
        data_cache=_optional(data, "cache", f"{where} data", str),
        search_space=typed(raw.get("search_space", ""), f"{where} field 'search_space'", str),
        trials_per_stage=_positive(typed(budget.get("trials_per_stage", 8), f"{where} budget field 'trials_per_stage'",
                                         int), f"{where} budget field 'trials_per_stage'"),
        parallel_trials=_parallel(budget.get("parallel_trials", "auto"), f"{where} budget field 'parallel_trials'"),
        early_stopping=_early_stopping(budget.get("early_stopping"), f"{where} budget field 'early_stopping'"),
        quality=typed(objectives.get("quality", ""), f"{where} objectives field 'quality'", str),
        costs=costs,
        latency_size=_not_negative(typed(latency.get("size", 0), f"{where} objectives latency field 'size'", int),
                                   f"{where} objectives latency field 'size'"),
        latency_rounds=_positive(typed(latency.get("rounds", 10), f"{where} objectives latency field 'rounds'", int),
                                 f"{where} objectives latency field 'rounds'"),
        time_trials=bool(latency),
        rule=typed(select.get("rule", "sparsest_within"), f"{where} select field 'rule'", str),
        tolerance=tolerance,
        seed=typed(raw.get("seed", 0), f"{where} field 'seed'", int),
        tracking_uri=_optional(tracking, "uri", f"{where} tracking", str),
        experiment=typed(tracking.get("experiment", "pngrow"), f"{where} tracking field 'experiment'", str),
        optuna_storage=_optional(raw, "optuna_storage", where, str),
        ray=_ray_options(raw.get("ray") or {}, where),
        workdir=typed(raw.get("workdir", "pngrow-runs"), f"{where} field 'workdir'", str),
        init=_optional(raw, "init", where, str),
        base_model=_optional(raw, "base_model", where, str),
    )


def as_smoke_test(config: SearchConfig) -> SearchConfig:
    """``config`` cut to a check that it runs end to end on its own services, cluster and data (every stage, the
    final check, the pictures) in minutes: one trial per stage at the space's defaults, trained a few steps
    (:meth:`~pngrow.search_spaces.SearchSpace.smoke`), one evaluation image, latency over 2 rounds, no early
    stopping. Its search is named ``<name>-smoke-test`` and cannot be promoted.

    >>> smoke = as_smoke_test(SearchConfig(family="sisr", tasks=["x2"], name="edsr"))
    >>> smoke.name, smoke.trials_per_stage, smoke.eval_limit
    ('edsr-smoke-test', 1, 1)
    """
    if config.smoke_test:
        return config
    return replace(config, smoke_test=True, name=f"{config.name}-smoke-test", trials_per_stage=1, eval_limit=1,
                   early_stopping=None, latency_rounds=min(config.latency_rounds, 2))


def _costs(value: Any, field: str) -> tuple[str, ...]:
    """One cost name or a list of distinct ones, each in :data:`COST_OBJECTIVES`."""
    names = [value] if isinstance(value, str) else typed(value, field, list)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"{field} is {value!r}: name one cost, or a list of distinct costs")
    for name in names:
        if name not in COST_OBJECTIVES:
            raise ConfigError(f"{field} names {name!r}, not one of {', '.join(COST_OBJECTIVES)}")
    return tuple(names)


def public_config(config: SearchConfig) -> dict[str, Any]:
    """The config as a dict with every URI's password redacted (what MLflow may record). The Optuna storage and the
    workdir are recorded resolved, so that ``pngrow resume`` finds them from any folder."""
    data = asdict(config)
    data["optuna_storage"] = config.resolved_optuna_storage()
    data["workdir"] = str(Path(config.workdir).resolve())
    for key in ("tracking_uri", "optuna_storage", "train_data", "eval_data", "base_model"):
        data[key] = redact(data[key])
    data["ray"]["address"] = redact(data["ray"]["address"])
    return data


def flat_params(config: SearchConfig) -> dict[str, Any]:
    """:func:`public_config` flattened into MLflow params: ``arch.<k>``, ``ray.<k>``, ``early_stopping.<k>`` (when
    on), and the tasks comma-separated.

    >>> flat_params(SearchConfig(family="sisr", tasks=["x2", "x3"], arch={"width": 8}))["tasks"]
    'x2,x3'
    """
    public = public_config(config)
    params = {k: v for k, v in public.items() if k not in ("ray", "arch", "tasks", "early_stopping")}
    params.update({f"arch.{k}": v for k, v in config.arch.items()})
    params.update({f"early_stopping.{k}": v for k, v in (public["early_stopping"] or {}).items()})
    params.update({f"ray.{k}": v for k, v in public["ray"].items()})
    params["tasks"] = ",".join(config.tasks)
    return params
