from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as prune_utils

from pngrow.workers.models import get_family
from pngrow.workers.png import FREE, SharedNetwork
from tests.conftest import ToyNet, make_toy, train_task


def _outputs(shared: SharedNetwork, x: torch.Tensor) -> dict[str, torch.Tensor]:
    shared.eval()
    with torch.no_grad():
        return {name: shared(name, x).clone() for name in shared.task_names}


def test_finds_every_prunable_layer_outside_the_heads(toy: SharedNetwork) -> None:
    assert toy.layer_names == ["conv", "grouped", "up", "fc"]
    assert "norm.running_mean" in toy.local_names and "conv.bias" in toy.local_names
    assert not any(n.startswith("heads.") for n in toy.local_names)
    assert toy.layers["up"].plane == (6, 10)  # ConvTranspose2d: 6 outputs x 10 inputs
    assert toy.layers["grouped"].plane == (10, 5)  # groups=2: 5 input channels per group


def test_every_block_is_free_or_owned_by_one_task(toy: SharedNetwork) -> None:
    train_task(toy, "a", (4, 4), 0.5)
    train_task(toy, "b", (2, 2), 0.5)
    for layer in toy.shared_layers():
        owner = layer.owner
        assert set(owner.unique().tolist()) <= {FREE, 0, 1}
        a_blocks = layer.grid((4, 4)).expand(layer.kept[0])
        assert torch.equal(owner == 0, a_blocks)  # task a owns exactly its kept blocks
        assert not ((owner == 1) & a_blocks).any()


def test_prune_releases_the_ratio_of_candidate_blocks_by_block_rms(toy: SharedNetwork) -> None:
    toy.begin_task("a", (2, 2))
    layer = toy.layers["conv"]  # 10 x 3 plane -> 5 x 2 grid
    with torch.no_grad():
        layer.growth.copy_(torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand_as(layer.growth))
    toy.prune(0.6)
    kept = layer.kept[0]
    assert int(kept.sum()) == 10 - round(0.6 * 10)
    assert kept.tolist() == [[False, False], [False, False], [False, False], [True, True], [True, True]]


def test_earlier_tasks_are_bit_identical_after_later_tasks(toy: SharedNetwork, toy_input: torch.Tensor) -> None:
    train_task(toy, "a", (4, 4), 0.5, target=1.0)
    before = _outputs(toy, toy_input)
    train_task(toy, "b", (2, 2), 0.5, target=-1.0)
    middle = _outputs(toy, toy_input)
    train_task(toy, "c", (1, 1), 0.0, reuse="all", target=3.0)
    after = _outputs(toy, toy_input)
    assert torch.equal(before["a"], middle["a"]) and torch.equal(before["a"], after["a"])
    assert torch.equal(middle["b"], after["b"])
    assert not torch.equal(after["a"], after["b"])


def test_output_depends_only_on_active_blocks(toy: SharedNetwork, toy_input: torch.Tensor) -> None:
    train_task(toy, "a", (4, 4), 0.5)
    train_task(toy, "b", (2, 2), 0.5, reuse="learned")
    reference = _outputs(toy, toy_input)
    for index, task in enumerate(toy.tasks):
        noisy = make_toy()
        noisy.load_state_dict(toy.state_dict(), strict=False)
        for layer, noisy_layer in zip(toy.shared_layers(), noisy.shared_layers()):
            noisy_layer.restore_masks(toy.tasks, [layer.masks(i) for i in range(len(toy.tasks))])
            assert torch.equal(noisy_layer.owner, layer.owner)
        noisy.tasks = toy.tasks
        for layer in noisy.shared_layers():
            inactive = ~layer.to_weight(layer.active_plane(index, task)).expand_as(layer.weight)
            with torch.no_grad():
                layer.weight[inactive] = float("nan")  # anything outside the active blocks
        noisy.eval()
        with torch.no_grad():
            assert torch.equal(noisy(task.name, toy_input), reference[task.name])
        layer = noisy.layers["conv"]
        active = layer.to_weight(layer.active_plane(index, task)).expand_as(layer.weight)
        with torch.no_grad():
            layer.weight[active] += 1.0
            assert not torch.equal(noisy(task.name, toy_input), reference[task.name])


def test_forward_equals_convolution_with_the_masked_weight(toy: SharedNetwork) -> None:
    train_task(toy, "a", (4, 4), 0.5)
    train_task(toy, "b", (3, 2), 0.3)
    layer = toy.layers["grouped"]
    mask = layer.to_weight(layer.active_plane(1, toy.tasks[1]))
    x = torch.randn(1, 10, 6, 6)
    toy.activate("b")
    module = toy.model.grouped
    expected = F.conv2d(x, layer.weight * mask, module.bias, padding=1, groups=2)
    assert torch.allclose(module(x), expected)


def test_reuse_modes(toy: SharedNetwork) -> None:
    train_task(toy, "a", (4, 4), 0.5)
    train_task(toy, "b", (4, 4), 0.5, reuse="none")
    train_task(toy, "c", (2, 2), 0.0, reuse="all")
    for layer in toy.shared_layers():
        earlier_of_b = layer.owner == 0
        assert not (layer.active_plane(1, toy.tasks[1]) & earlier_of_b).any()
        owned_before_c = (layer.owner == 0) | (layer.owner == 1)
        assert torch.equal(layer.active_plane(2, toy.tasks[2]) & owned_before_c, owned_before_c)


def test_learned_selection_drops_blocks_under_a_reuse_penalty(toy: SharedNetwork) -> None:
    train_task(toy, "a", (2, 2), 0.5)
    toy.train()
    toy.begin_task("b", (2, 2), "learned")
    scores = toy.trainable_parameters()["selection"]
    optimizer = torch.optim.Adam(scores, lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        toy.selection_density().backward()
        optimizer.step()
    toy.commit()
    selected = sum(int(layer.selected[1].sum()) for layer in toy.shared_layers())
    assert selected == 0


def test_task_local_state_is_per_task(toy: SharedNetwork, toy_input: torch.Tensor) -> None:
    train_task(toy, "a", (4, 4), 0.5)
    bias_a = toy.model.conv.bias.detach().clone()
    stats_a = toy.model.norm.running_mean.clone()
    train_task(toy, "b", (4, 4), 0.5, target=5.0)
    toy.activate("b")
    assert not torch.equal(toy.model.conv.bias, bias_a)
    toy.activate("a")
    assert torch.equal(toy.model.conv.bias, bias_a) and torch.equal(toy.model.norm.running_mean, stats_a)


def test_evaluating_an_earlier_task_mid_training_keeps_the_new_tasks_state(toy: SharedNetwork) -> None:
    train_task(toy, "a", (4, 4), 0.5)
    toy.train()
    toy.begin_task("b", (4, 4))
    with torch.no_grad():
        toy.model.conv.bias.fill_(3.0)
        toy("a", torch.zeros(1, 3, 8, 8))
    toy.activate("b")
    assert torch.all(toy.model.conv.bias == 3.0)


def test_a_copy_computes_with_its_own_weights_and_tasks(toy: SharedNetwork, toy_input: torch.Tensor) -> None:
    train_task(toy, "a", (4, 4), 0.5)
    toy.train()
    toy.begin_task("b", (4, 4))
    optimizer = torch.optim.SGD(toy.trainable_parameters()["weights"], lr=0.1)
    toy.prune(0.25, "active")  # its head too, by torch's pruning: a computed weight
    toy("b", toy_input).pow(2).mean().backward()  # the copy is taken mid-training, after a backward
    optimizer.step()
    snapshot = copy.deepcopy(toy)  # e.g. a teacher for distillation
    toy.eval(), snapshot.eval()
    with torch.no_grad():
        before = {name: toy(name, toy_input).clone() for name in ("a", "b")}
    toy.train()
    toy.prune(0.5)
    for _ in range(2):
        optimizer.zero_grad()
        toy("b", toy_input).pow(2).mean().backward()
        optimizer.step()
    toy.eval()
    with torch.no_grad():
        assert not torch.equal(toy("b", toy_input), before["b"])
        assert torch.equal(snapshot("b", toy_input), before["b"]) and torch.equal(snapshot("a", toy_input), before["a"])
    snapshot.prune(0.5)
    snapshot.commit()
    assert toy.task_in_progress is not None and toy.task_in_progress.name == "b"


def test_a_copy_can_be_taken_while_the_active_scope_prunes_a_head() -> None:
    shared = get_family("sisr", ["x2", "x3"], width=8, depth=1, lr_patch=8).build_shared()
    shared.begin_task("x2", (4, 1024))
    shared.prune(0.5)
    shared.commit()
    shared.begin_task("x3", (4, 1024))
    shared.prune(0.5, "active")  # its tail too, by torch's pruning: weight = weight_orig * weight_mask, a graph tensor
    tail = [m for n, m in shared.model.named_modules() if n.startswith("tails.x3.") and prune_utils.is_pruned(m)]
    assert tail
    x = torch.rand(1, 3, 8, 8)
    shared("x3", x).mean().backward()
    snapshot = copy.deepcopy(shared)
    with torch.no_grad():
        before = shared("x3", x).clone()
        tail[0].weight_orig.add_(1.0)
        assert not torch.equal(shared("x3", x), before) and torch.equal(snapshot("x3", x), before)


def test_depthwise_and_1d_layers_are_shared() -> None:
    net = nn.Sequential(nn.Conv1d(4, 4, 3, groups=4, padding=1), nn.Conv1d(4, 6, 1))
    shared = SharedNetwork(net)
    shared.begin_task("a", (2, 2))
    shared.prune(0.5)
    shared.commit()
    assert shared.layers["0"].plane == (4, 1)
    assert shared("a", torch.randn(1, 4, 5)).shape == (1, 6, 5)


@pytest.mark.parametrize(
    "action, message",
    [
        (lambda s: s.prune(0.5), "no task in progress"),
        (lambda s: s("zzz", torch.zeros(1)), "unknown task 'zzz'"),
        (lambda s: s.begin_task("a", "4x"), "block shape"),
        (lambda s: s.begin_task("a", (4, 4), "some"), "reuse 'some'"),
    ],
)
def test_misuse_gets_a_clear_error(toy: SharedNetwork, action, message: str) -> None:
    with pytest.raises((ValueError, RuntimeError), match=message):
        action(toy)


def test_prune_ratio_and_task_order_errors(toy: SharedNetwork) -> None:
    toy.begin_task("a")
    with pytest.raises(ValueError, match="prune ratio 1.0"):
        toy.prune(1.0)
    with pytest.raises(RuntimeError, match="still in progress"):
        toy.begin_task("b")
    toy.prune(0.0)
    toy.commit()
    with pytest.raises(ValueError, match="task 'a' already exists"):
        toy.begin_task("a")
    with pytest.raises(RuntimeError, match="no free blocks left"):
        toy.begin_task("b")


def test_model_without_prunable_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="no Conv or Linear"):
        SharedNetwork(nn.Sequential(nn.ReLU()))


def test_a_model_without_task_argument_is_served_by_masks_alone() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    shared = SharedNetwork(net)
    x = torch.randn(3, 16)
    shared.begin_task("one", (8, 8))
    shared.prune(0.5)
    shared.commit()
    y1 = shared("one", x).clone()
    shared.begin_task("two", (4, 4))
    with torch.no_grad():
        for layer in shared.shared_layers():
            layer.growth.add_(1.0)
    shared.commit()
    assert torch.equal(shared("one", x), y1)
    assert not math.isclose(float(shared("two", x).detach().sum()), float(y1.detach().sum()))


def test_toy_has_no_parameter_left_as_weight() -> None:
    shared = SharedNetwork(ToyNet(), task_heads=["heads"], task_arg="task")
    names = [n for n, _ in shared.model.named_parameters()]
    assert "conv.weight" not in names and "heads.a.weight" in names
