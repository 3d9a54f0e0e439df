"""Where a later task's free blocks start: fresh (PyTorch's initialisation), from what an earlier task trained them
to before releasing them, or zero; either way the earlier task is untouched."""

from __future__ import annotations

import pytest
import torch

from torch import nn

from pngrow.workers.png import FREE, SharedNetwork
from pngrow.workers.settings import TaskSettings
from tests.conftest import make_toy, train_task


def _released(shared) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Each shared layer's free (released) positions, weight-shaped."""
    return {layer.name: layer.to_weight(layer.owner == FREE).expand_as(layer.weight) for layer in shared.shared_layers()}


def test_released_blocks_keep_what_the_task_trained_them_to_and_a_later_task_may_grow_from_them(toy_input) -> None:
    shared = make_toy()
    before = {layer.name: layer.weight.clone() for layer in shared.shared_layers()}
    train_task(shared, "a", ratio=0.5, steps=6)
    out_a = shared("a", toy_input)
    released = _released(shared)
    assert any(mask.any() for mask in released.values())
    for layer in shared.shared_layers():
        free = released[layer.name]
        # trained by a until released: no longer the initial values, and not zeroed
        assert not torch.equal(layer.weight[free], before[layer.name][free]) and layer.weight[free].abs().sum() > 0
    kept = {layer.name: layer.weight[released[layer.name]].clone() for layer in shared.shared_layers()}
    shared.begin_task("b", (4, 4), grow_from="released")
    for layer in shared.shared_layers():
        assert torch.equal(layer.growth.detach()[released[layer.name]], kept[layer.name])
    shared.prune(0.5)
    shared.commit()
    shared.eval()
    assert torch.equal(shared("a", toy_input), out_a)


def test_fresh_growth_reinitialises_the_released_blocks() -> None:
    shared = make_toy()
    train_task(shared, "a", ratio=0.5, steps=6)
    released = _released(shared)
    kept = {layer.name: layer.weight[released[layer.name]].clone() for layer in shared.shared_layers()}
    shared.begin_task("b", (4, 4))  # a later task: re-initialised by default
    assert all(not torch.equal(layer.growth.detach()[released[layer.name]], kept[layer.name])
               for layer in shared.shared_layers() if released[layer.name].any())


def test_zero_growth_starts_the_task_computing_what_the_last_task_committed(toy_input) -> None:
    torch.manual_seed(0)  # no task heads: a task differs from the last one only by its blocks
    shared = SharedNetwork(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)))
    train_task(shared, "a", ratio=0.5, steps=6)
    train_task(shared, "b", ratio=0.5, steps=6, scope="active")  # b deselects some of a's blocks
    assert any(not bool(layer.masks(1)[1][layer.grid((4, 4)).block_any(layer.owner == 0)].all())
               for layer in shared.shared_layers())
    shared.eval()
    out_b = shared("b", toy_input)
    shared.begin_task("c", (4, 4), grow_from="zero")
    assert any(bool(_released(shared)[layer.name].any()) for layer in shared.shared_layers())
    assert torch.equal(shared("c", toy_input), out_b)


def test_a_paired_task_cannot_grow_from_zero() -> None:
    with pytest.raises(ValueError, match="a paired task cannot grow from zero"):
        SharedNetwork(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), channel_pairs=[("0", "2")]
                      ).begin_task("a", (4, 4), grow_from="zero", paired=True)
    with pytest.raises(ValueError, match="grow_from 'zero' does not go with paired"):
        TaskSettings(grow_from="zero", paired=True)


def test_grow_from_names_one_of_its_choices() -> None:
    assert TaskSettings(grow_from="released").grow_from == "released"
    with pytest.raises(ValueError, match="grow_from 'base' is not one of fresh, released, zero"):
        TaskSettings(grow_from="base")
