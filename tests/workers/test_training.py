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


def test_a_stage_without_prune_or_finetune_steps_still_prunes() -> None:
    family = get_family("sisr", ["x2"], width=8, depth=1, lr_patch=8)
    images = default_images("eval").limit(1)
    settings = StageSettings(grow_steps=2, prune_steps=0, finetune_steps=0, batch_size=1, prune_ratio=0.5)
    job = train_shared(family, [settings], images, images, log=lambda m: None)
    assert job.stages[0].cost.density == pytest.approx(0.5, abs=0.05)
    kept = StageSettings(grow_steps=2, prune_steps=0, finetune_steps=0, batch_size=1, prune_ratio=0.0)
    assert train_shared(family, [kept], images, images, log=lambda m: None).stages[0].cost.density == 1.0


def test_a_task_that_changed_is_named_without_assert(monkeypatch: pytest.MonkeyPatch) -> None:
    from pngrow.workers import training

    family = get_family("sisr", ["x2"], width=8, depth=1, lr_patch=8)
    images = default_images("eval").limit(1)
    settings = StageSettings(grow_steps=1, prune_steps=0, finetune_steps=1, batch_size=1)
    calls = iter(range(100))
    evaluate = type(family).evaluate
    monkeypatch.setattr(type(family), "evaluate",
                        lambda self, *a: {**evaluate(self, *a), "psnr": float(next(calls))})
    with pytest.raises(training.DriftError, match=r"task 'x2' changed after later tasks were added: psnr was 0\.0 "
                                                  r"at commit, 1\.0 at the end"):
        train_shared(family, [settings], images, images, log=lambda m: None)
