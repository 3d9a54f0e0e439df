from __future__ import annotations

import json
import struct

import torch
from torch import nn

from pngrow.workers.png import SharedNetwork, model_cost, save_shared, task_cost


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
    active = {layer.name: int(layer.active_plane(0, shared.tasks[0]).sum()) * layer.kernel_numel for layer in shared.shared_layers()}
    assert active == {"0": 8 * 4 * 9 // 2, "1": 8 * 4 * 4 // 2, "3": 400 * 8 // 2}
    assert cost.macs == 2 * (active["0"] * 25 + active["1"] * 25 + active["3"])
    assert cost.density == 0.5
    assert cost.active_params == sum(active.values()) + 8 + 4 + 8  # biases are task-local


class _Tiny(nn.Module):
    """Small enough to count by hand: a 4x4 1x1 conv (16 shared weights in four 2x2 blocks), batch norm, a head per
    task."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)  # bias: 4 task-local parameters
        self.norm = nn.BatchNorm2d(4)  # task-local: 8 parameters, 4 + 4 running statistics and 1 int64 counter
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in ("a", "b")})  # 5 parameters a task

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.norm(self.conv(x)).mean((2, 3)))


def _tiny(reuse_b: str = "learned") -> SharedNetwork:
    """Task a keeps 2 of the 4 blocks (8 weights); task b grows into the other 2 and keeps 1 (4 weights)."""
    shared = SharedNetwork(_Tiny(), task_heads=["heads"], task_arg="task")
    for task, reuse in (("a", "learned"), ("b", reuse_b)):
        shared.begin_task(task, (2, 2), reuse)  # type: ignore[arg-type]
        with torch.no_grad():  # as training would: each task's local state its own (identical ones are stored once)
            for name, tensor in [*shared.model.named_parameters(), *shared.model.named_buffers()]:
                if name in shared.local_names:
                    tensor.add_(1)
        shared.prune(0.5)
        shared.commit()
    return shared


def test_model_cost_counts_every_stored_tensor_by_hand() -> None:
    cost = model_cost(_tiny())
    # Owned weights 8 + 4; per task 4 + 8 local parameters, 9 local buffers, 5 head parameters.
    assert cost.stored_params == 12 + 2 * (12 + 9 + 5) == 64
    assert cost.dense_params == 16 + 12 + 9 + 5 == 42
    assert cost.independent_params == 2 * 42
    assert cost.mask_bits == 4 + 4 * 2  # a: a kept bit per block; b: kept and selected bits per block
    # float32 everywhere but BatchNorm's int64 counter; 12 mask bits take 2 bytes.
    assert cost.stored_bytes == 12 * 4 + 2 * (20 * 4 + 8 + 5 * 4) + 2 == 266
    # The checkpoint: the dense 4x4 weight, one byte per block for kept and selected masks of both tasks, both
    # tasks' local state, and both heads.
    assert cost.checkpoint_bytes == 16 * 4 + 2 * 2 * 4 + 2 * (20 * 4 + 8) + 2 * 5 * 4 == 296


def test_checkpoint_bytes_are_the_saved_tensor_data(tmp_path) -> None:  # noqa: ANN001
    shared = _tiny()
    save_shared(shared, tmp_path, {})
    # The safetensors format: an 8-byte little-endian header length, that many bytes of JSON header naming each
    # tensor's byte range in the data that follows, then the data.
    data = (tmp_path / "weights.safetensors").read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    ranges = sorted(entry["data_offsets"] for name, entry in header.items() if name != "__metadata__")
    tensor_bytes = len(data) - 8 - header_size
    assert ranges[0][0] == 0 and ranges[-1][1] == tensor_bytes
    assert all(end == begin for (_, end), (begin, _) in zip(ranges, ranges[1:]))  # no gap, no overlap
    assert model_cost(shared).checkpoint_bytes == tensor_bytes


def test_task_cost_of_a_reusing_task_by_hand() -> None:
    shared = _tiny(reuse_b="all")
    x = torch.randn(1, 4, 3, 3)
    a, b = task_cost(shared, "a", x), task_cost(shared, "b", x)
    assert (a.density, b.density) == (8 / 16, (4 + 8) / 16)
    assert (a.active_params, b.active_params) == (8 + 12 + 5, 12 + 12 + 5)  # parameters only, no buffers
    assert (a.macs, b.macs) == (8 * 9 + 4, 12 * 9 + 4)  # shared layer at 3x3 positions, then the head
    assert a.dense_macs == b.dense_macs == 16 * 9 + 4


def test_a_task_local_tensor_identical_to_an_earlier_tasks_is_stored_once() -> None:
    from torch import nn

    from pngrow.workers.png import SharedNetwork, model_cost

    class WithTable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1, bias=False)  # 4 shared weights
            self.register_buffer("table", torch.arange(10.0))  # task-local, the same for every task

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + self.table[0]

    net = SharedNetwork(WithTable())
    for name in ("a", "b"):
        net.begin_task(name, (1, 2))
        net.prune(0.5)
        net.commit()
    # a keeps 1 of its 2 row blocks (2 weights), b the other (2 weights); the table is stored once, not twice.
    assert model_cost(net).stored_params == 2 + 2 + 10
    net.tasks[1].local_state["table"] = torch.arange(10.0) + 1  # b's own table now differs: stored too
    assert model_cost(net).stored_params == 2 + 2 + 10 + 10
