from __future__ import annotations

import pytest
import torch
from torch import nn

from pngrow.workers.png import SharedNetwork


class ToyNet(nn.Module):
    """A model no family knows: grouped conv, transposed conv, batch norm, linear layers and per-task heads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3, padding=1)
        self.grouped = nn.Conv2d(10, 10, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(10, 6, 4, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 7)
        self.heads = nn.ModuleDict({name: nn.Linear(7, 2) for name in ("a", "b", "c")})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        y = self.norm(self.up(torch.relu(self.grouped(torch.relu(self.conv(x))))))
        return self.heads[task](self.fc(torch.relu(y).mean((2, 3))))


def make_toy() -> SharedNetwork:
    torch.manual_seed(0)
    return SharedNetwork(ToyNet(), task_heads=["heads"], task_arg="task")


def train_task(shared: SharedNetwork, name: str, block_shape=(4, 4), ratio=0.5, reuse="learned", steps=5,
               target: float = 0.0, weight_decay: float = 0.1) -> None:
    """Grow, prune and commit a task with an optimiser that would move frozen weights if it could."""
    shared.train()
    shared.begin_task(name, block_shape, reuse)
    groups = shared.trainable_parameters()
    optimizer = torch.optim.AdamW(
        [{"params": groups["weights"]}, {"params": groups["selection"], "lr": 1e-2}], lr=1e-2, weight_decay=weight_decay
    )
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for step in range(steps):
        if step == steps // 2:
            shared.prune(ratio)
        loss = (shared(name, x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    shared.commit()
    shared.eval()


@pytest.fixture
def toy() -> SharedNetwork:
    return make_toy()


@pytest.fixture
def toy_input() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
