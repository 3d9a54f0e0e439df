from __future__ import annotations

import pytest
import torch

from pngrow.workers.data import default_images
from pngrow.workers.models import get_family
from pngrow.workers.training import Optimisers, StageSettings, train_shared


def test_the_learning_rate_restarts_when_pruning_begins() -> None:
    family = get_family("sisr", ["x2"], width=8, depth=1, lr_patch=8)
    images = default_images("eval")
    settings = StageSettings(grow_steps=4, prune_steps=2, finetune_steps=2, batch_size=1, lr=1e-3)
    job = train_shared(family, [settings], images, images.limit(1), log=lambda m: None)
    lrs = [entry["lr"] for entry in job.stages[0].history]
    assert [entry["step"] for entry in job.stages[0].history] == list(range(8))
    assert lrs == pytest.approx([1e-3 * f for f in Optimisers.factors((4, 4))])
    assert lrs[0] == lrs[4] == pytest.approx(1e-3) and lrs[3] < lrs[2] < lrs[1] < lrs[0]


def test_a_dense_stage_has_one_cosine_and_empty_phases_are_skipped() -> None:
    assert Optimisers.factors((3, 0)) == Optimisers.factors((3,)) == pytest.approx([1.0, 0.75, 0.25])
    assert Optimisers.factors((0, 2)) == pytest.approx([1.0, 0.5])
    weight = torch.nn.Parameter(torch.zeros(1))
    optimisers = Optimisers.build([{"params": [weight], "lr": 0.1}], [], (2,))
    for _ in range(3):  # a step past the phases trains at rate 0 instead of failing
        optimisers.step((weight - 1).pow(2).sum(), lambda: None)
    assert optimisers.main.param_groups[0]["lr"] == 0.0
