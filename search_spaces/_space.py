"""A search space: which :class:`~pngrow.workers.settings.TaskSettings` a search varies, over which ranges."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .._validation import ConfigError, check_keys, typed
from ..workers.settings import TaskSettings

__all__ = ["Parameter", "SearchSpace", "available_spaces", "load_search_space"]

_HERE = Path(__file__).parent
# Every TaskSettings field but the seed, which the search sets per stage.
SETTING_NAMES = tuple(f.name for f in fields(TaskSettings) if f.name != "seed")
# Numeric settings: their values may be written as text (PyYAML reads 1.0e30, with no exponent sign, as a string).
_NUMERIC = {f.name: str(f.type) for f in fields(TaskSettings) if str(f.type) in ("int", "float")}
_KINDS = ("float", "int", "categorical")
# A smoke test's training: a few steps of each phase, on small batches (see SearchSpace.smoke).
SMOKE_SETTINGS = {"grow_steps": 4, "prune_steps": 2, "finetune_steps": 2, "batch_size": 2}


@dataclass(frozen=True)
class Parameter:
    """One searched setting: a float or int range (``log`` for a log scale) or a list of ``choices``."""

    name: str
    kind: str
    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        return self.low <= value <= self.high  # type: ignore[operator]


def _number(value: Any, field: str, kind: str) -> float | int:
    # PyYAML reads 1e-4 (no dot) as a string; accept any number written as text too.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{field} is {value!r}, not a number") from None
    number = typed(value, field, (int, float))
    if kind == "int":
        if float(number) != int(number):
            raise ConfigError(f"{field} is {value!r}, not an integer")
        return int(number)
    if not math.isfinite(number):
        raise ConfigError(f"{field} is {value!r}, not a finite number")
    return float(number)


def _parameter(name: str, spec: Any, where: str) -> Parameter:
    field = f"{where}: parameter {name!r}"
    spec = check_keys(spec, field, {"type", "low", "high", "log", "choices", "default"}, {"type"})
    kind = spec["type"]
    if kind not in _KINDS:
        raise ConfigError(f"{field}: type {kind!r} is not one of {', '.join(_KINDS)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{field}: choices {choices!r} is not a non-empty list")
        extra = sorted({"low", "high", "log"} & set(spec))
        if extra:
            raise ConfigError(f"{field}: {extra[0]!r} does not apply to a categorical parameter")
        if name in _NUMERIC:
            choices = [_number(c, f"{field} choice", _NUMERIC[name]) for c in choices]
        default = spec.get("default", choices[0])
        if name in _NUMERIC:
            default = _number(default, f"{field} default", _NUMERIC[name])
        param = Parameter(name, kind, default, choices=tuple(choices))
    else:
        if "choices" in spec:
            raise ConfigError(f"{field}: 'choices' does not apply to a {kind} parameter")
        for key in ("low", "high"):
            if key not in spec:
                raise ConfigError(f"{field}: missing field {key!r}")
        low, high = (_number(spec[k], f"{field} {k}", kind) for k in ("low", "high"))
        if low > high:
            raise ConfigError(f"{field}: low {low!r} is above high {high!r}")
        log = typed(spec.get("log", False), f"{field} log", bool)
        if log and low <= 0:
            raise ConfigError(f"{field}: low {low!r} must be positive on a log scale")
        default = _number(spec.get("default", low), f"{field} default", kind)
        param = Parameter(name, kind, default, low=low, high=high, log=log)
    if not param.contains(param.default):
        raise ConfigError(f"{field}: default {param.default!r} is outside the parameter's range")
    return param


@dataclass(frozen=True)
class SearchSpace:
    """The settings a search varies (``parameters``) and the ones it holds (``fixed``), for one family.

    >>> space = load_search_space("sisr-tiny")
    >>> space.family, sorted(space.parameters)
    ('sisr', ['block_shape', 'lr', 'paired', 'prune_ratio', 'prune_scope'])
    >>> space.settings({"prune_ratio": 0.6}, seed=3).prune_ratio
    0.6
    """

    name: str
    family: str
    parameters: dict[str, Parameter]
    fixed: dict[str, Any]

    def smoke(self) -> SearchSpace:
        """This space cut to a check that a search runs end to end (``pngrow search --smoke-test``): every step count
        and the batch size fixed at :data:`SMOKE_SETTINGS`; the other parameters keep their ranges and defaults.

        >>> load_search_space("sisr").smoke().settings({}, seed=0).grow_steps
        4
        """
        parameters = {k: p for k, p in self.parameters.items() if k not in SMOKE_SETTINGS}
        return SearchSpace(f"{self.name} (smoke test)", self.family, parameters, {**self.fixed, **SMOKE_SETTINGS})

    def defaults(self) -> dict[str, Any]:
        """Every parameter at its default: the first trial a search runs."""
        return {name: p.default for name, p in self.parameters.items()}

    def settings(self, params: Mapping[str, Any], seed: int) -> TaskSettings:
        """The task settings of one trial: ``params`` (defaults for the missing ones) over the fixed settings."""
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            raise ConfigError(f"search space {self.name!r}: trial parameter {unknown[0]!r} is not in the space")
        return TaskSettings(**{**self.fixed, **self.defaults(), **params, "seed": seed})


def available_spaces() -> list[str]:
    """Names of the search spaces shipped in this package."""
    return sorted(p.stem for p in _HERE.glob("*.yaml"))


def load_search_space(name_or_path: str | Path) -> SearchSpace:
    """The search space shipped as ``name`` (see :func:`available_spaces`) or read from a YAML file.

    >>> load_search_space("sisr-huge")
    Traceback (most recent call last):
    ...
    pngrow.errors.ConfigError: search space 'sisr-huge' is neither a file nor one of nic, nic-tiny, sisr, sisr-tiny
    """
    path = Path(name_or_path)
    if not path.is_file():
        path = _HERE / f"{name_or_path}.yaml"
        if "/" in str(name_or_path) or not path.is_file():
            raise ConfigError(
                f"search space {str(name_or_path)!r} is neither a file nor one of {', '.join(available_spaces())}"
            )
    where = f"search space {str(name_or_path)!r}"
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    raw = check_keys(raw, where, {"family", "description", "parameters", "fixed"}, {"family", "parameters"})
    family = typed(raw["family"], f"{where} field 'family'", str)
    specs = check_keys(raw["parameters"], f"{where} field 'parameters'", set(SETTING_NAMES))
    fixed = dict(check_keys(raw.get("fixed") or {}, f"{where} field 'fixed'", set(SETTING_NAMES)))
    fixed = {k: _number(v, f"{where} fixed {k!r}", _NUMERIC[k]) if k in _NUMERIC else v for k, v in fixed.items()}
    both = sorted(set(specs) & set(fixed))
    if both:
        raise ConfigError(f"{where}: {both[0]!r} is both searched and fixed")
    parameters = {name: _parameter(name, spec, where) for name, spec in specs.items()}
    space = SearchSpace(Path(name_or_path).stem if path.parent == _HERE else str(name_or_path), family, parameters, fixed)
    try:
        space.settings({}, seed=0)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: the defaults are invalid: {exc}") from None
    # Build the extremes of every parameter so that an impossible setting fails now, not in a trial.
    for param in parameters.values():
        for value in param.choices or (param.low, param.high):
            try:
                space.settings({param.name: value}, seed=0)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: parameter {param.name!r} value {value!r} is invalid: {exc}") from None
    return space
