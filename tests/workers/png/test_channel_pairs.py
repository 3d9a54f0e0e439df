"""Channel pairs: a paired task releases a producer's output channel and its consumer's input channel together, so
its compacted model neither computes nor reads that channel; it keeps the layers outside its pairs whole, and earlier
tasks stay bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pngrow.workers.png import SharedNetwork, compact_task, load_shared, save_shared


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 3, padding=1))


def _net() -> SharedNetwork:
    torch.manual_seed(0)
    return SharedNetwork(_model(), channel_pairs=[("2", "4")])


def _grow(shared: SharedNetwork, name: str, block_shape: tuple[int, int], paired: bool = True,
          reuse: str = "learned") -> None:
    shared.begin_task(name, block_shape, reuse, paired=paired)  # type: ignore[arg-type]
    weights = shared.trainable_parameters()["weights"]
    optimizer = torch.optim.Adam(weights, lr=1e-2)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        loss = shared(name, x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    shared.fix_selection()
    shared.prune(0.5, "active")
    shared.commit()


def _pair_channels(shared: SharedNetwork, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The channels between the pair: those the producer computes, those the consumer reads."""
    index = shared.task_index(name)
    task = shared.tasks[index]
    producer, consumer = shared.layers["2"], shared.layers["4"]
    return producer.active_plane(index, task).any(1), consumer.active_plane(index, task).any(0)


@pytest.mark.parametrize("block_shape", [(4, 1024), (4, 4)])
def test_every_paired_task_computes_and_reads_the_same_half_of_the_pairs_channels(block_shape: tuple[int, int]) -> None:
    shared = _net()
    _grow(shared, "a", block_shape)
    before = shared.fingerprint("a")
    _grow(shared, "b", block_shape)
    assert shared.fingerprint("a") == before
    for name in ("a", "b"):
        computed, read = _pair_channels(shared, name)
        assert torch.equal(computed, read) and int(computed.sum()) == 8, name
    # Outside the pair a paired task prunes nothing: both compute with every channel of the first and last layers.
    for name in ("a", "b"):
        index = shared.task_index(name)
        assert all(bool(shared.layers[layer].active_plane(index, shared.tasks[index]).all()) for layer in ("0", "6"))


def test_a_paired_task_compacts_into_layers_that_skip_the_released_channels() -> None:
    shared = _net()
    _grow(shared, "a", (4, 1024))
    _grow(shared, "b", (4, 1024))
    x = torch.rand(1, 3, 12, 12)
    for name in ("a", "b"):
        compact = compact_task(shared, name, strategies=("channels",))
        plans = {plan.layer: plan for plan in compact.plans}
        assert plans["2"].outputs == (8, 16) and plans["4"].inputs == (8, 16) and plans["4"].outputs == (16, 16)
        # The producer hands on its 8 channels alone, and the consumer reads them as they come.
        producer, consumer = compact.model.get_submodule("2"), compact.model.get_submodule("4")
        assert (producer.out_channels, producer.rows, consumer.in_channels, consumer.cols0) == (8, None, 8, None)
        with torch.no_grad():
            assert producer(torch.rand(1, 16, 5, 5)).shape == (1, 8, 5, 5)
            assert torch.allclose(compact(x), shared(name, x), atol=1e-5)


def test_an_unpaired_task_prunes_every_layer_by_its_own_blocks() -> None:
    shared = _net()
    _grow(shared, "a", (4, 1024), paired=False)
    computed, read = _pair_channels(shared, "a")
    assert int(computed.sum()) == 8 and bool(read.all())  # rows of 4 in both layers: the consumer reads every channel
    assert int(shared.layers["0"].active_plane(0, shared.tasks[0]).any(1).sum()) == 8


@pytest.mark.parametrize("first_paired", [True, False])
def test_fixing_the_selection_drops_the_producers_blocks_of_channels_its_consumer_reads_nothing_of(
        first_paired: bool) -> None:
    shared = _net()
    _grow(shared, "a", (4, 1024), paired=first_paired)
    shared.begin_task("b", (4, 1024), "all", paired=True)
    producer, consumer = shared.layers["2"], shared.layers["4"]
    group = int(producer.kept[0].flatten().nonzero()[0])  # 4 channels that a computes
    consumer.deselect(1, torch.arange(4)[None, :] == group)  # b no longer reads a's weights of them
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        before = shared("b", x)
    shared.fix_selection()
    # Paired, a owns those whole columns of the consumer: b reads nothing of them any more. Unpaired, a released
    # rows of the consumer, and b's own weights in those rows still read the channels.
    assert bool(producer.selected[1][group, 0]) is not first_paired
    with torch.no_grad():
        assert torch.equal(shared("b", x), before)


def _narrowing() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.ReLU(), nn.Conv2d(8, 3, 3))


@pytest.mark.parametrize(
    ("model", "pairs", "message"),
    [
        (_model, [("2", "9")], "channel pair layer '9' is not a shared Conv or Linear layer of Sequential"),
        (_narrowing, [("0", "4")], r"channel pair \('0', '4'\): 16 outputs feed 8 inputs"),
        (_model, [("0", "2"), ("2", "4")], "layer '2' is in more than one channel pair"),
    ],
)
def test_channel_pairs_that_do_not_fit_the_model_are_refused_in_one_line(model, pairs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SharedNetwork(model(), channel_pairs=pairs)


def test_a_paired_task_on_a_network_without_pairs_is_refused() -> None:
    shared = SharedNetwork(_model())
    with pytest.raises(ValueError, match="task 'a' is paired, but this Sequential declares no channel pairs"):
        shared.begin_task("a", (4, 1024), paired=True)
    assert shared.tasks == []


def test_pairs_and_paired_tasks_survive_save_and_load(tmp_path: Path) -> None:
    shared = _net()
    _grow(shared, "a", (4, 1024))
    _grow(shared, "b", (4, 4), paired=False)
    save_shared(shared, tmp_path, {})
    loaded = load_shared(tmp_path, lambda arch: _model())
    assert loaded.channel_pairs == (("2", "4"),) and [t.paired for t in loaded.tasks] == [True, False]
    assert [loaded.fingerprint(t) for t in ("a", "b")] == [shared.fingerprint(t) for t in ("a", "b")]


def test_a_model_saved_before_channel_pairs_loads_with_none(tmp_path: Path) -> None:
    shared = _net()
    _grow(shared, "a", (4, 4), paired=False)
    save_shared(shared, tmp_path, {})
    path = tmp_path / "model.json"
    description = json.loads(path.read_text())
    del description["channel_pairs"]
    for task in description["tasks"]:
        del task["paired"]
    path.write_text(json.dumps(description))
    loaded = load_shared(tmp_path, lambda arch: _model())
    assert loaded.channel_pairs == () and loaded.fingerprint("a") == shared.fingerprint("a")
