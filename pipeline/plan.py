"""A search's plan: its config checked against the family, search space, objectives, rule and data before any
service starts (:func:`prepare`), and the context every part of a running search shares (:class:`SearchContext`).

Checking a config builds the family's model, so :func:`prepare` imports the worker code (PyTorch) when a search
starts; importing the driver's modules does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .._progress import Log
from ..errors import ConfigError
from ..search_spaces import SearchSpace, load_search_space
from ..workers.decoded import cache_folder
from .config import SearchConfig
from .study import RULES
from .uris import is_remote, is_s3, parse_model_uri, redact

if TYPE_CHECKING:
    from ..workers.models import Family
    from .cluster import Cluster
    from .data_cache import Manifest
    from .tracking import Tracking

__all__ = ["Base", "Plan", "SearchContext", "prepare"]


@dataclass(frozen=True)
class Base:
    """A released model the search grows into: its checkpoint, version label and tasks' fingerprints."""

    folder: Path
    label: str
    fingerprints: dict[str, str]
    source_run: str  # the run the registered version came from; empty for a folder


@dataclass(frozen=True)
class Plan:
    """A checked search: its config, the family with every task (the base model's first), the space, objectives."""

    config: SearchConfig
    family: Family
    space: SearchSpace
    quality: str
    maximize: bool
    base: Base | None = None
    manifest: Manifest | None = None  # the s3:// data as listed when the search started (see .data_cache)

    @property
    def quality_direction(self) -> str:
        return "maximize" if self.maximize else "minimize"


@dataclass(frozen=True)
class SearchContext:
    """What every part of a running search works with: its plan, MLflow, Ray, the search run and the log."""

    plan: Plan
    tracking: Tracking
    cluster: Cluster
    search_id: str
    log: Log

    @property
    def config(self) -> SearchConfig:
        return self.plan.config

    @property
    def storage(self) -> str:
        """The Optuna storage, password redacted, for messages."""
        return redact(self.config.resolved_optuna_storage()) or ""

    @property
    def parallel(self) -> int:
        """How many trials run at once: every slot the cluster has now (it follows nodes that join or leave),
        at most the config's ``parallel_trials``."""
        slots = self.cluster.slots
        return slots if self.config.parallel_trials is None else min(self.config.parallel_trials, slots)


def prepare(config: SearchConfig, scratch: Path | None = None) -> Plan:
    """Check that the config's family, tasks, space, objectives and rule fit together, before any service starts.

    With ``config.base_model``, the base is fetched into ``scratch`` and the family covers its tasks too.
    """
    from ..workers.models import get_family

    family = get_family(config.family, config.tasks, **config.arch)
    base = None
    if config.base_model:
        if scratch is None:
            raise ValueError("growing a base model needs a scratch folder to fetch it into")
        base, family = _resolve_base(config, scratch)
    space = load_search_space(config.search_space or config.family)
    if config.smoke_test:
        space = space.smoke()
    if space.family != family.name:
        raise ConfigError(f"search space {space.name!r} is for family {space.family!r}, not {family.name!r}")
    quality = config.quality or family.quality_metric
    if quality not in family.metric_directions:
        raise ConfigError(f"quality objective {quality!r} is not one of {family.name}'s metrics: "
                          f"{', '.join(family.metric_directions)}")
    if config.rule not in RULES:
        raise ConfigError(f"selection rule {config.rule!r} is not one of {', '.join(sorted(RULES))}")
    _check_block_shapes(family, space)
    _check_paired(family, space)
    _check_files(config)
    if config.measures_latency:
        try:
            family.latency_inputs(config.latency_size or None)
        except ValueError as exc:
            raise ConfigError(f"objectives latency: {exc}") from None
    return Plan(config, family, space, quality, family.metric_directions[quality] == "maximize", base)


def _check_files(config: SearchConfig) -> None:
    """The local data folders hold readable images, local init weights exist, and the cache folder that data folders
    are decoded into (and ``s3://`` objects downloaded to) is writable on this node."""
    from ..workers.data import check_folder

    for name, source in (("train", config.train_data), ("eval", config.eval_data)):
        if source and "://" not in source and not is_remote(source):  # runs:/: uploaded by the driver (resumed)
            try:
                check_folder(source)
            except ValueError as exc:
                raise ConfigError(f"data {name}: {exc}") from None
    if config.init and not is_remote(config.init) and not Path(config.init).is_file():
        raise ConfigError(f"init weights {config.init!r} do not exist")
    if config.data_cache or config.train_data or config.eval_data or is_s3(config.init):
        try:
            cache_folder(config.data_cache)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _resolve_base(config: SearchConfig, scratch: Path) -> tuple[Base, Family]:
    """The base model fetched into ``scratch``, and the family of its tasks followed by the config's."""
    from ..workers.models import get_family, load_model
    from .api import resolve_checkpoint
    from .tracking import Tracking

    folder, label = resolve_checkpoint(config.base_model or "", scratch, config.resolved_tracking_uri())
    base_family, shared = load_model(folder)
    if config.family != base_family.name:
        raise ConfigError(f"base model {config.base_model!r} is a {base_family.name} model, not {config.family}")
    clash = sorted(set(config.tasks) & set(shared.task_names))
    if clash:
        raise ConfigError(f"task {clash[0]!r} is already in base model {config.base_model!r}")
    source_run, model = "", parse_model_uri(label)
    if model is not None and model.version:
        source_run = Tracking(config.resolved_tracking_uri()).model_version(model.name, model.version).run_id or ""
    family = get_family(base_family.name, shared.task_names + config.tasks, **base_family.arch)
    return Base(folder, label, {t: shared.fingerprint(t) for t in shared.task_names}, source_run), family


def _check_paired(family: Family, space: SearchSpace) -> None:
    """A space that can pick ``paired`` is for a family whose model declares channel pairs."""
    choices = space.parameters["paired"].choices if "paired" in space.parameters else [space.fixed.get("paired")]
    if True in choices and not family.build_shared().channel_pairs:
        raise ConfigError(f"search space {space.name!r}: paired: true needs channel pairs, and the {family.name} model "
                          f"declares none")


def _check_block_shapes(family: Family, space: SearchSpace) -> None:
    """Every block shape the space can pick splits some shared layer into at least 2 blocks, so pruning can free one.
    A layer that one block covers (an RGB output layer under rows of 8 channels, say) is kept whole."""
    from ..workers.png import parse_block_shape

    if "block_shape" in space.parameters:
        shapes = list(space.parameters["block_shape"].choices)
    else:
        shapes = [space.settings({}, seed=0).block_shape]
    layers = family.wrap(family.build_model()).shared_layers()
    for shape in shapes:
        parsed = parse_block_shape(shape)
        if all(layer.grid(parsed).num_blocks < 2 for layer in layers):
            first = layers[0]
            raise ConfigError(f"block shape {'x'.join(map(str, parsed))} does not fit the {family.name} model: every "
                              f"shared layer would be one block (e.g. {first.name!r}, {first.plane[0]}x"
                              f"{first.plane[1]} channels), which pruning cannot split")
