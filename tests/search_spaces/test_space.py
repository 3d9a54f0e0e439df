from __future__ import annotations

from pathlib import Path

import pytest

from pngrow.errors import ConfigError
from pngrow.search_spaces import available_spaces, load_search_space
from pngrow.workers.models import FAMILIES


@pytest.mark.parametrize("name", available_spaces())
def test_every_shipped_space_loads_and_builds_its_defaults(name: str) -> None:
    space = load_search_space(name)
    assert space.family in FAMILIES
    settings = space.settings({}, seed=5)
    assert settings.seed == 5
    for parameter in space.parameters.values():
        assert parameter.contains(parameter.default)


@pytest.mark.parametrize("name", available_spaces())
def test_a_smoke_test_space_trains_a_few_steps_and_keeps_every_other_setting(name: str) -> None:
    space = load_search_space(name)
    smoke = space.smoke()
    settings, full = smoke.settings({}, seed=1), space.settings({}, seed=1)
    assert (settings.grow_steps, settings.prune_steps, settings.finetune_steps, settings.batch_size) == (4, 2, 2, 2)
    kept = ("block_shape", "prune_ratio", "prune_scope", "lr", "reuse_penalty", "reuse")
    assert [getattr(settings, k) for k in kept] == [getattr(full, k) for k in kept]
    assert "grow_steps" not in smoke.parameters  # searched in the full space, fixed in the smoke test's
    assert set(smoke.parameters) == set(space.parameters) - {"grow_steps", "prune_steps", "finetune_steps",
                                                            "batch_size"}


def test_trial_parameters_override_fixed_and_defaults() -> None:
    space = load_search_space("sisr-tiny")
    settings = space.settings({"prune_ratio": 0.65, "block_shape": "8x8"}, seed=0)
    assert settings.prune_ratio == 0.65 and settings.block_shape == (8, 8)
    assert settings.grow_steps == space.fixed["grow_steps"]
    with pytest.raises(ConfigError, match="trial parameter 'depth' is not in the space"):
        space.settings({"depth": 3}, seed=0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("family: sisr\nparameters: {prune_ratio: {type: float, low: 0.2, high: 1.5}}",
         r"parameter 'prune_ratio' value 1.5 is invalid: prune ratio 1.5 is outside \[0, 1\)"),
        ("family: sisr\nparameters: {prune_ratio: {type: float, low: 0.6, high: 0.2}}", "low 0.6 is above high 0.2"),
        ("family: sisr\nparameters: {pruning: {type: float, low: 0.2, high: 0.5}}", "unknown field 'pruning'"),
        ("family: sisr\nparameters: {lr: {type: float, low: 0, high: 0.1, log: true}}", "must be positive on a log"),
        ("family: sisr\nparameters: {lr: {type: double, low: 0, high: 0.1}}", "type 'double' is not one of"),
        ("family: sisr\nparameters: {lr: {type: float, low: abc, high: 0.1}}", "low is 'abc', not a number"),
        ("family: sisr\nparameters: {grow_steps: {type: int, low: 1.5, high: 9}}", "low is 1.5, not an integer"),
        ("family: sisr\nparameters: {block_shape: {type: categorical, choices: []}}", "choices \\[\\] is not a"),
        ("family: sisr\nparameters: {block_shape: {type: categorical, choices: [4x4, 3y3]}}", "'3y3' is invalid"),
        ("family: sisr\nparameters: {prune_ratio: {type: float, low: 0.2, high: 0.5, default: 0.9}}",
         "default 0.9 is outside"),
        ("family: sisr\nparameters: {}\nfixed: {batch_size: 0}", "the defaults are invalid: batch size 0"),
        ("family: sisr\nparameters: {lr: {type: float, low: 0.1, high: 0.2}}\nfixed: {lr: 0.1}", "both searched"),
        ("parameters: {}", "missing field 'family'"),
        ("family: sisr\nparameters: [1, 2]", "field 'parameters': expected a mapping"),
        ("family: sisr\nparameters: {lr: {type: float, low: 0.1, high: 0.2}", "not valid YAML"),
    ],
)
def test_invalid_spaces_fail_with_one_line_naming_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_search_space(path)
    assert "\n" not in str(info.value) and "space.yaml" in str(info.value)


def test_unknown_space_names_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="'sisr-large' is neither a file nor one of nic, nic-tiny, sisr, sisr-tiny"):
        load_search_space("sisr-large")
