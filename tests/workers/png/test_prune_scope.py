"""Pruning scope "active": a later task's reused earlier blocks compete with its own, so it frees whole channels
and its compacted model computes fewer of them, while earlier tasks stay bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pngrow.workers.png import SharedNetwork, compact_task


def _net() -> SharedNetwork:
    torch.manual_seed(0)
    return SharedNetwork(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                       nn.ReLU(), nn.Conv2d(16, 4, 3, padding=1)))


def _grow(shared: SharedNetwork, name: str, scope: str) -> None:
    shared.begin_task(name, block_shape=(2, 64), reuse="all")  # rows of 2 output channels spanning every input
    shared.fix_selection()
    shared.prune(0.5, scope)  # type: ignore[arg-type]
    shared.commit()


def _computed_rows(shared: SharedNetwork, name: str) -> list[int]:
    index = shared.task_index(name)
    record = shared.tasks[index]
    return [int(layer.active_plane(index, record).any(1).sum()) for layer in shared.shared_layers()]


@pytest.mark.parametrize("scope, rows_b", [("own", [12, 12, 4]), ("active", [8, 8, 2])])
def test_a_later_task_computes_half_its_channels_only_with_the_active_scope(scope: str, rows_b: list[int]) -> None:
    shared = _net()
    _grow(shared, "a", "own")
    assert _computed_rows(shared, "a") == [8, 8, 2]
    before = shared.fingerprint("a")
    _grow(shared, "b", scope)
    # "own": b keeps half of its 8 free rows (4) and reuses all 8 of a's; "active": half of all 16.
    assert _computed_rows(shared, "b") == rows_b
    assert shared.fingerprint("a") == before
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    compact = compact_task(shared, "b")
    with torch.no_grad():
        assert torch.allclose(compact(x), shared("b", x), atol=1e-5)
    assert [plan.outputs[0] for plan in compact.plans] == rows_b


def test_active_scope_deselects_the_weakest_reused_blocks_and_keeps_the_strongest() -> None:
    shared = _net()
    _grow(shared, "a", "own")
    shared.begin_task("b", block_shape=(2, 64), reuse="all")
    layer = shared.shared_layers()[1]
    with torch.no_grad():  # make a's rows the strongest candidates of the middle layer by far
        layer.weight.mul_(100.0)
    shared.fix_selection()
    shared.prune(0.5, "active")
    shared.commit()
    index = shared.task_index("b")
    active = layer.active_plane(index, shared.tasks[index])
    owned_by_a = (layer.owner == 0).any(1)
    assert torch.equal(active.any(1), owned_by_a)  # b computes exactly a's (strongest) rows, none of its own


def test_an_unknown_scope_is_refused_by_name() -> None:
    shared = _net()
    shared.begin_task("a", block_shape=(2, 64))
    with pytest.raises(ValueError, match="prune scope 'some' is not one of own, active"):
        shared.prune(0.5, "some")  # type: ignore[arg-type]


class _WithHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 16, 3, padding=1)
        self.heads = nn.ModuleDict({t: nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                                     nn.Conv2d(16, 3, 3, padding=1)) for t in ("a", "b")})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](torch.relu(self.body(x)))


def test_the_active_scope_prunes_the_tasks_own_head_too_and_compacts_it() -> None:
    torch.manual_seed(0)
    shared = SharedNetwork(_WithHeads(), task_heads=["heads"], task_arg="task")
    shared.begin_task("a", block_shape=(4, 64))
    shared.fix_selection()
    shared.prune(0.5, "own")
    shared.commit()
    head_a = shared.model.heads["a"][0].weight.detach().clone()
    before = shared.fingerprint("a")
    shared.begin_task("b", block_shape=(4, 64))
    shared.fix_selection()
    shared.prune(0.25)  # a gradual schedule: first a quarter, then half
    shared.prune(0.5, "active")
    shared.commit()
    assert sorted(n for n, _ in shared.model.heads["b"].named_parameters()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    zero_rows = (shared.model.heads["b"][0].weight.detach().flatten(1).abs().sum(1) == 0).sum()
    assert int(zero_rows) == 8  # half of the 16 output rows, in blocks of 4, were pruned and stay zero
    assert torch.equal(shared.model.heads["a"][0].weight, head_a) and shared.fingerprint("a") == before
    compact = compact_task(shared, "b")
    plans = {p.layer: p for p in compact.plans}
    assert plans["heads.b.0"].outputs == (8, 16) and plans["body"].outputs == (8, 16)
    x = torch.randn(1, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(compact(x), shared("b", x), atol=1e-5)
