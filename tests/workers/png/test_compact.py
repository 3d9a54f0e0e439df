from __future__ import annotations

import pytest
import torch
from torch import nn

from pngrow.workers.models import get_family
from pngrow.workers.png import STRATEGIES, SharedNetwork, compact_task, count_macs, task_cost
from pngrow.workers.png._compact import _MARGIN
from tests.conftest import make_toy, train_task


def _grown(shared: SharedNetwork, tasks: list[str], block_shape) -> SharedNetwork:
    for task in tasks:
        train_task(shared, task, block_shape=block_shape, ratio=0.5, steps=3)
    shared.eval()
    return shared


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("block_shape", [(4, 4), (2, 1024), (1024, 2)])
def test_every_way_matches_the_masked_model_on_any_network(strategy: str, block_shape) -> None:
    shared = _grown(make_toy(), ["a", "b", "c"], block_shape)
    x = torch.randn(2, 3, 12, 12)
    for task in ("a", "b", "c"):
        compact = compact_task(shared, task, strategies=(strategy,))
        assert torch.allclose(compact(x), shared(task, x), atol=1e-5)
        # The grouped convolution cannot be sliced by channel pairs: it always stays dense.
        assert next(p for p in compact.plans if p.layer == "grouped").strategy == "dense"


def test_autotuned_compaction_matches_and_times_each_way() -> None:
    shared = _grown(make_toy(), ["a", "b"], (2, 1024))
    x = torch.randn(2, 3, 12, 12)
    compact = compact_task(shared, "a", x, repeats=2)
    assert torch.allclose(compact(x), shared("a", x), atol=1e-5)
    for plan in compact.plans:
        # Every way a layer can be cut is timed; the grouped convolution can only stay dense.
        assert set(plan.seconds) == ({"dense"} if plan.layer == "grouped" else set(STRATEGIES)), plan
        assert all(0 < seconds < 1 for seconds in plan.seconds.values()), plan
        # The fastest is chosen, unless dense is within the margin of it (dense then, as it needs no gathering).
        fastest = min(plan.seconds, key=plan.seconds.__getitem__)
        expected = "dense" if plan.seconds[fastest] * _MARGIN > plan.seconds["dense"] else fastest
        assert plan.strategy == expected, plan
    assert {plan.layer for plan in compact.plans} >= {"conv", "grouped", "up", "fc"}
    # A wide layer that computes a tenth of its output channels: dense is ten times the work and must lose (timed
    # on one thread: on a busy machine, threads waiting for each other swamp the difference).
    wide = SharedNetwork(nn.Sequential(nn.Conv2d(32, 320, 3, padding=1)))
    wide.begin_task("a", (2, 1024))
    wide.prune(0.9)
    wide.commit()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (plan,) = compact_task(wide, "a", torch.randn(1, 32, 48, 48), repeats=3).plans
    finally:
        torch.set_num_threads(threads)
    assert set(plan.seconds) == set(STRATEGIES)
    assert plan.strategy == min(plan.seconds, key=plan.seconds.__getitem__) != "dense", plan
    assert plan.outputs == (32, 320)


def test_output_channel_blocks_shrink_weights_and_computed_macs() -> None:
    shared = _grown(make_toy(), ["a"], (2, 1024))  # blocks of 2 output channels: pruning frees whole channels
    x = torch.randn(1, 3, 12, 12)
    compact = compact_task(shared, "a", strategies=("channels",))
    dense = compact_task(shared, "a", strategies=("dense",))
    conv = next(p for p in compact.plans if p.layer == "conv")
    assert conv.outputs == (6, 10) and conv.inputs == (3, 3)  # 5 blocks of 2 rows, round(0.5 * 5) = 2 released
    assert compact.parameter_count() < dense.parameter_count()
    assert count_macs(compact, x, task="a") < count_macs(dense, x, task="a")
    # The masked model's MAC count is what the compacted model computes in the layers it slices.
    assert count_macs(compact, x, task="a") >= task_cost(shared, "a", x).macs


def test_other_tasks_heads_are_dropped_and_the_export_is_standalone() -> None:
    shared = _grown(make_toy(), ["a", "b"], (4, 4))
    compact = compact_task(shared, "b")
    assert set(compact.model.heads.keys()) == {"b"}
    x = torch.randn(1, 3, 12, 12)
    expected = shared("b", x)
    shared.layers["conv"].weight.zero_()  # the export holds its own copy
    assert torch.allclose(compact(x), expected, atol=1e-5)


def test_a_compacted_codec_still_codes_with_its_task_tables() -> None:
    family = get_family("nic", ["q6", "q2"], N=16, M=24, patch=64)
    shared = family.build_shared()
    for task in family.tasks:
        shared.begin_task(task, (4, 1024))
        shared.prune(0.5)
        family.before_commit(shared, task)
        shared.commit()
    shared.eval()
    x = torch.rand(1, 3, 64, 64)
    for task in family.tasks:
        compact = compact_task(shared, task, strategies=("channels",))
        shared.activate(task)
        assert torch.allclose(compact.model.g_a(x), shared.model.g_a(x), atol=1e-5)
        coded = compact.model.compress(x)
        assert compact.model.decompress(coded["strings"], coded["shape"])["x_hat"].shape == x.shape


def test_bad_requests_are_refused_by_name() -> None:
    shared = make_toy()
    shared.begin_task("a", (4, 4))
    with pytest.raises(RuntimeError, match="'a' is in progress"):
        compact_task(shared, "a")
    shared.commit()
    with pytest.raises(ValueError, match="strategy 'sparse'"):
        compact_task(shared, "a", strategies=("sparse",))
    with pytest.raises(KeyError, match="unknown task 'z'"):
        compact_task(shared, "z")


def test_a_layer_shared_under_two_names_is_refused_by_name() -> None:
    twice = nn.Conv2d(4, 4, 3, padding=1)
    shared = SharedNetwork(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), twice, nn.ReLU(), twice))
    shared.begin_task("a", (2, 1024))
    shared.prune(0.5)
    shared.commit()
    with pytest.raises(ValueError, match="layer '3' is shared layer '1' under a second name"):
        compact_task(shared, "a")


def test_linear_layers_compact_on_their_last_dimension() -> None:
    shared = SharedNetwork(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)))
    shared.begin_task("a", (2, 2))
    shared.prune(0.6)
    shared.commit()
    x = torch.randn(5, 3, 6)
    for strategy in STRATEGIES:
        assert torch.allclose(compact_task(shared, "a", strategies=(strategy,))(x), shared("a", x), atol=1e-5)
