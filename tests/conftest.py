from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from pngrow.workers.png import SharedNetwork

# Every image folder a test reads is decoded into a node cache: one of the session's own (inherited by the Ray
# nodes and subprocesses the tests start), not the user's ~/.cache/pngrow.
if "PNGROW_CACHE" not in os.environ:
    os.environ["PNGROW_CACHE"] = tempfile.mkdtemp(prefix="pngrow-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PNGROW_CACHE"], ignore_errors=True)


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
               target: float = 0.0, weight_decay: float = 0.1, scope: str = "own") -> None:
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
            shared.prune(ratio, scope)  # type: ignore[arg-type]
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


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny NIC (rates q6, q2, q4) and SISR (x2, x3) model folders of :func:`tests.tiny_models.tiny_models`,
    trained once per session for the tests that restore images with them; none of them writes into the folders."""
    from tests.tiny_models import tiny_models

    return tiny_models(tmp_path_factory.mktemp("tiny-models"), nic_tasks="q6,q2,q4")
