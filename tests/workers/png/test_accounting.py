from __future__ import annotations

import torch
from torch import nn

from pngrow.workers.png import SharedNetwork, model_cost, task_cost
from tests.conftest import train_task


def test_macs_count_only_active_blocks_for_each_layer_kind() -> None:
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),  # 8*4*9 weights, each used 5*5 times per image
        nn.ConvTranspose2d(8, 4, 2, stride=2),  # 8*4*4 weights, each used at the 5*5 input positions
        nn.Flatten(),
        nn.Linear(4 * 10 * 10, 8),  # each weight used once per row
    )
    shared = SharedNetwork(net)
    x = torch.randn(2, 4, 5, 5)
    shared.begin_task("a", (4, 4))
    dense = task_cost(shared, "a", x)
    assert dense.macs == dense.dense_macs == 2 * (8 * 4 * 9 * 25 + 8 * 4 * 4 * 25 + 400 * 8)
    shared.prune(0.5)
    shared.commit()
    cost = task_cost(shared, "a", x)
    active = {layer.name: int(layer.active_plane(0, (4, 4)).sum()) * layer.kernel_numel for layer in shared.shared_layers()}
    assert active == {"0": 8 * 4 * 9 // 2, "1": 8 * 4 * 4 // 2, "3": 400 * 8 // 2}
    assert cost.macs == 2 * (active["0"] * 25 + active["1"] * 25 + active["3"])
    assert cost.density == 0.5
    assert cost.active_params == sum(active.values()) + 8 + 4 + 8  # biases are task-local


def test_model_cost_counts_owned_blocks_once_and_every_tasks_own_parts(toy: SharedNetwork) -> None:
    train_task(toy, "a", (4, 4), 0.5)
    train_task(toy, "b", (2, 2), 0.5)
    cost = model_cost(toy)
    layers = toy.shared_layers()
    owned = sum(int((layer.owner >= 0).sum()) * layer.kernel_numel for layer in layers)
    prunable = sum(layer.weight.numel() for layer in layers)
    local = sum(p.numel() for n, p in toy.model.named_parameters() if n in toy.local_names)
    head = 7 * 2 + 2
    assert cost.stored_params == owned + 2 * (local + head)
    assert cost.independent_params == 2 * (prunable + local + head)
    assert cost.dense_params == prunable + local + head
    # Task a: one kept bit per 4x4 block; task b: kept and selection bits per 2x2 block.
    bits_a = sum(layer.grid((4, 4)).num_blocks for layer in layers)
    bits_b = 2 * sum(layer.grid((2, 2)).num_blocks for layer in layers)
    assert cost.mask_bits == bits_a + bits_b
    assert cost.stored_bytes == 4 * cost.stored_params + -(-cost.mask_bits // 8)
    assert cost.stored_params < cost.independent_params


def test_density_of_a_reusing_task_includes_its_selection(toy: SharedNetwork, toy_input: torch.Tensor) -> None:
    train_task(toy, "a", (4, 4), 0.5)
    train_task(toy, "b", (4, 4), 0.0, reuse="all")
    cost_b = task_cost(toy, "b", toy_input, )
    assert cost_b.density == 1.0 - sum(
        int((layer.owner == -1).sum()) * layer.kernel_numel for layer in toy.shared_layers()
    ) / sum(layer.weight.numel() for layer in toy.shared_layers())
