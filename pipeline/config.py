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
from .uris import redact

__all__ = ["COST_OBJECTIVES", "RAY_DEVICES", "EarlyStopping", "RayOptions", "SearchConfig", "as_smoke_test",
           "config_from_fields", "flat_params", "load_config", "public_config", "tracking_uri"]


def tracking_uri(uri: str | None = None, workdir: str = "pngrow-runs") -> str:
    """``uri`` if given, else ``MLFLOW_TRACKING_URI``, else the embedded default: SQLite in ``workdir``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


# Costs a search can minimise beside quality: the share of weights a task computes with, the stored parameters of the
# whole model, and the task's measured latency compacted (``latency``: the median on the trial's device as a share of
# the dense model's, timed in turns beside it; the milliseconds of both are logged too).
COST_OBJECTIVES = ("density", "stored_params", "latency")
_TOP = {"name", "family", "tasks", "arch", "data", "search_space", "budget", "objectives", "select", "seed",
        "tracking", "optuna_storage", "ray", "workdir", "init", "base_model"}


RAY_DEVICES = ("auto", "cpu", "cuda")  # RayOptions.device
# Where the SearchConfig fields a config file groups stand in it: section -> key -> field (the other fields are top
# level, by their own names). ``objectives: {latency: {size, rounds}}`` is one level deeper (_LATENCY).
_SECTIONS = {
    "data": {"train": "train_data", "eval": "eval_data", "eval_limit": "eval_limit", "cache": "data_cache"},
    "budget": {"trials_per_stage": "trials_per_stage", "parallel_trials": "parallel_trials",
               "early_stopping": "early_stopping"},
    "objectives": {"quality": "quality", "cost": "costs"},
    "select": {"rule": "rule", "tolerance": "tolerance"},
    "tracking": {"uri": "tracking_uri", "experiment": "experiment"},
}
_LATENCY = {"size": "latency_size", "rounds": "latency_rounds"}


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


def _optional(value: Any, field: str, kind: type | tuple[type, ...]) -> Any:
    """``value`` (None: not given) if it is a ``kind``, a string with its ``${VAR}`` expanded."""
    if value is None:
        return None
    value = typed(value, field, kind)
    return _expand(value, field) if isinstance(value, str) else value


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
    """``auto`` or None (as many trials at once as the cluster has slots), or a positive cap.

    >>> _parallel("auto", "parallel_trials"), _parallel(None, "parallel_trials"), _parallel(3, "parallel_trials")
    (None, None, 3)
    """
    if value == "auto" or value is None:
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
        address=_optional(raw.get("address"), f"{where} field 'address'", str),
        num_cpus=_optional(raw.get("num_cpus"), f"{where} field 'num_cpus'", int),
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
    fields, places = _file_fields(_read(path, where, overrides or {}), where)
    return config_from_fields({"name": Path(path).stem, **fields}, where, places)


def _file_fields(raw: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The :class:`SearchConfig` fields of a config file's top level ``raw``, taken out of their sections (see
    :data:`_SECTIONS`), and where each sectioned field stands in the file, for messages."""
    fields = {key: value for key, value in raw.items() if key not in _SECTIONS}
    places: dict[str, str] = {}
    sections = {}
    for section, keys in _SECTIONS.items():
        known = set(keys) | ({"latency"} if section == "objectives" else set())
        sections[section] = check_keys(raw.get(section) or {}, f"{where} field {section!r}", known)
        for key, name in keys.items():
            places[name] = f"{section} field {key!r}"
            if key in sections[section]:
                fields[name] = sections[section][key]
    latency = check_keys(sections["objectives"].get("latency") or {}, f"{where} objectives field 'latency'",
                         set(_LATENCY))
    for key, name in _LATENCY.items():
        places[name] = f"objectives latency field {key!r}"
        if key in latency:
            fields[name] = latency[key]
    fields["time_trials"] = bool(latency)  # objectives.latency given: every trial times its task
    return fields, places


def config_from_fields(fields: Any, where: str, places: dict[str, str] | None = None) -> SearchConfig:
    """A checked :class:`SearchConfig` from a mapping of its fields: a config file's (:func:`load_config`) or the
    one a search recorded (:func:`public_config`, read again by ``pngrow resume``). A field left out takes its
    default; a bad one is a one-line :class:`ConfigError` naming ``where``, the field (as ``places`` names it, else
    by its own name) and the value.

    >>> config_from_fields({"family": "sisr", "tasks": ["x2"], "trials_per_stage": 0}, "search_config.json of run a1")
    Traceback (most recent call last):
    ...
    pngrow.errors.ConfigError: search_config.json of run a1 field 'trials_per_stage' is 0, must be at least 1
    """
    fields = check_keys(fields, where, set(SearchConfig.__dataclass_fields__), {"family", "tasks"})

    def field(name: str) -> str:
        return f"{where} {(places or {}).get(name, f'field {name!r}')}"

    def value(name: str, kind: type | tuple[type, ...]) -> Any:
        default = SearchConfig.__dataclass_fields__[name].default
        return typed(fields.get(name, default), field(name), kind)

    tasks = typed(fields["tasks"], field("tasks"), list)
    if not tasks or not all(isinstance(t, str) for t in tasks):
        raise ConfigError(f"{field('tasks')} is {tasks!r}, not a non-empty list of task names")
    eval_limit = _optional(fields.get("eval_limit"), field("eval_limit"), int)
    arch = fields.get("arch") or {}
    return SearchConfig(
        family=value("family", str), tasks=list(tasks), name=value("name", str),
        arch=dict(check_keys(arch, field("arch"), set(map(str, arch)) if isinstance(arch, dict) else set())),
        train_data=_optional(fields.get("train_data"), field("train_data"), str),
        eval_data=_optional(fields.get("eval_data"), field("eval_data"), str),
        eval_limit=None if eval_limit is None else _positive(eval_limit, field("eval_limit")),
        data_cache=_optional(fields.get("data_cache"), field("data_cache"), str),
        search_space=value("search_space", str),
        trials_per_stage=_positive(value("trials_per_stage", int), field("trials_per_stage")),
        parallel_trials=_parallel(fields.get("parallel_trials"), field("parallel_trials")),
        early_stopping=_early_stopping(fields.get("early_stopping"), field("early_stopping")),
        quality=value("quality", str), costs=_costs(fields.get("costs", "density"), field("costs")),
        latency_size=_not_negative(value("latency_size", int), field("latency_size")),
        latency_rounds=_positive(value("latency_rounds", int), field("latency_rounds")),
        time_trials=value("time_trials", bool), rule=value("rule", str),
        tolerance=_not_negative(value("tolerance", float), field("tolerance")), seed=value("seed", int),
        tracking_uri=_optional(fields.get("tracking_uri"), field("tracking_uri"), str),
        experiment=value("experiment", str),
        optuna_storage=_optional(fields.get("optuna_storage"), field("optuna_storage"), str),
        ray=_ray_options(fields.get("ray") or {}, where), workdir=value("workdir", str),
        init=_optional(fields.get("init"), field("init"), str),
        base_model=_optional(fields.get("base_model"), field("base_model"), str), smoke_test=value("smoke_test", bool),
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
