from __future__ import annotations

import pytest
import torch

from pngrow.workers.data import default_images
from pngrow.workers.models import get_family
from pngrow.workers.png import SharedNetwork
from pngrow.workers.settings import TaskSettings
from pngrow.workers.training import Optimisers, train_shared


def test_the_learning_rate_restarts_when_pruning_begins() -> None:
    family = get_family("sisr", ["x2"], width=8, depth=1, lr_patch=8)
    images = default_images("eval")
    settings = TaskSettings(grow_steps=4, prune_steps=2, finetune_steps=2, batch_size=1, lr=1e-3)
    job = train_shared(family, [settings], images, images.limit(1), log=lambda m: None)
    lrs = [entry["lr"] for entry in job.task_results[0].history]
    assert [entry["step"] for entry in job.task_results[0].history] == list(range(8))
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


def test_a_codecs_weight_gradient_is_clipped_to_the_familys_norm() -> None:
    images = default_images("eval").limit(1)
    settings = TaskSettings(grow_steps=1, prune_steps=0, finetune_steps=0, batch_size=2, lr=1e-3)
    job = train_shared(get_family("nic", ["q4"], N=16, M=16, patch=64), [settings], images, images, log=lambda m: None)
    # the last step's gradient as the optimiser took it (the entropy bottleneck's also holds its auxiliary loss's)
    grads = [p.grad for n, p in job.shared.named_parameters() if p.grad is not None and "entropy_bottleneck" not in n]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    assert 0.1 < norm <= 1.0 + 1e-5  # unclipped, an untrained codec's is in the hundreds
    assert get_family("nic").grad_clip_norm == 1.0 and get_family("sisr").grad_clip_norm is None


def test_a_stage_without_prune_or_finetune_steps_still_prunes() -> None:
    family = get_family("sisr", ["x2"], width=8, depth=1, lr_patch=8)
    images = default_images("eval").limit(1)
    settings = TaskSettings(grow_steps=2, prune_steps=0, finetune_steps=0, batch_size=1, prune_ratio=0.5)
    job = train_shared(family, [settings], images, images, log=lambda m: None)
    assert job.task_results[0].cost.density == pytest.approx(0.5, abs=0.05)
    kept = TaskSettings(grow_steps=2, prune_steps=0, finetune_steps=0, batch_size=1, prune_ratio=0.0)
    assert train_shared(family, [kept], images, images, log=lambda m: None).task_results[0].cost.density == 1.0


def test_a_task_that_changed_is_named_without_assert(monkeypatch: pytest.MonkeyPatch) -> None:
    from pngrow.workers import training

    family = get_family("sisr", ["x2"], width=8, depth=1, lr_patch=8)
    images = default_images("eval").limit(1)
    settings = TaskSettings(grow_steps=1, prune_steps=0, finetune_steps=1, batch_size=1)
    calls = iter(range(100))
    evaluate = type(family).evaluate
    monkeypatch.setattr(type(family), "evaluate",
                        lambda self, *a: {**evaluate(self, *a), "psnr": float(next(calls))})
    with pytest.raises(training.DriftError, match=r"task 'x2' changed after later tasks were added: psnr was 0\.0 "
                                                  r"at commit, 1\.0 at the end"):
        train_shared(family, [settings], images, images, log=lambda m: None)


@pytest.mark.parametrize(("family_name", "arch", "quality"), [
    ("sisr", {"width": 8, "depth": 1, "lr_patch": 8}, "psnr"),
    ("nic", {"N": 16, "M": 16, "patch": 64}, "rd_loss"),
])
def test_the_rung_sees_the_grown_task_and_changes_nothing_it_lets_go_on(family_name: str, arch: dict,
                                                                        quality: str) -> None:
    from pngrow.workers.data import PatchSampler
    from pngrow.workers.training import StoppedEarly, train_task

    from pngrow.workers.data import ImageSet

    whole = default_images("eval")
    images = ImageSet("crop", whole.names[:1], (whole.images[0][:, :128, :128],))  # small: NIC codes it 3 times
    settings = TaskSettings(grow_steps=3, prune_steps=2, finetune_steps=1, batch_size=1)

    def stage(at_rung=None):  # noqa: ANN001, ANN202
        family = get_family(family_name, [family_name == "sisr" and "x2" or "q2"], **arch)
        torch.manual_seed(0)
        shared = family.build_shared()
        sampler = PatchSampler(images, family.patch_size(family.tasks[0]), seed=0)
        result = train_task(shared, family, family.tasks[0], settings, sampler, images, log=lambda m: None,
                           at_rung=at_rung)
        return result, shared.fingerprint(family.tasks[0])

    calls: list[tuple[int, dict]] = []
    plain, went_on = stage(), stage(lambda step, metrics: calls.append((step, metrics)) or True)
    assert [step for step, _ in calls] == [3] and quality in calls[0][1]
    assert went_on[1] == plain[1] and went_on[0].metrics == plain[0].metrics  # bit-identical: no RNG drawn, no drift
    with pytest.raises(StoppedEarly) as info:
        stage(lambda step, metrics: False)
    assert (info.value.step, info.value.metrics) == (3, calls[0][1])
    assert str(info.value) == f"task '{went_on[0].task}' was stopped early at step 3"


def test_no_rung_without_steps_on_both_sides_of_it() -> None:
    from pngrow.workers.data import PatchSampler
    from pngrow.workers.training import train_task

    family = get_family("sisr", ["x2"], width=8, depth=1, lr_patch=8)
    images = default_images("eval").limit(1)

    for grow, prune in ((0, 2), (2, 0)):
        shared = family.build_shared()
        settings = TaskSettings(grow_steps=grow, prune_steps=prune, finetune_steps=0, batch_size=1)
        train_task(shared, family, "x2", settings, PatchSampler(images, 16, seed=0), images, log=lambda m: None,
                  at_rung=lambda step, metrics: pytest.fail("no rung in this stage"))


def test_step_seconds_count_gradient_steps_not_the_callbacks_or_the_rung() -> None:
    import time

    from pngrow.workers.data import PatchSampler
    from pngrow.workers.training import train_task

    family = get_family("sisr", ["x2"], width=8, depth=1, lr_patch=8)
    images = default_images("eval").limit(1)
    settings = TaskSettings(grow_steps=10, prune_steps=5, finetune_steps=5, batch_size=1)
    slow = lambda *args: time.sleep(0.1) or True  # noqa: E731 - a tracking server that takes 0.1 s per call
    result = train_task(family.build_shared(), family, "x2", settings, PatchSampler(images, 16, seed=0), images,
                       log=lambda m: None, on_step=slow, at_rung=slow)
    calls = len(result.history) + 1  # every reported step, and the rung
    assert 0 < result.step_seconds < result.seconds - 0.1 * calls


@pytest.mark.parametrize("events", [1, 4])
def test_pruning_releases_blocks_in_the_settings_number_of_events(events: int, monkeypatch: pytest.MonkeyPatch) -> None:
    family = get_family("sisr", ["x2"], width=8, depth=1, lr_patch=8)
    images = default_images("eval")
    ratios: list[float] = []
    prune = SharedNetwork.prune
    monkeypatch.setattr(SharedNetwork, "prune", lambda self, ratio, scope="own": (ratios.append(ratio),
                                                                                 prune(self, ratio, scope))[1])
    settings = TaskSettings(grow_steps=2, prune_steps=8, prune_events=events, finetune_steps=2, batch_size=1)
    train_shared(family, [settings], images, images.limit(1), log=lambda m: None)
    assert ratios == pytest.approx([0.5 * (1 - (1 - k / events) ** 3) for k in range(1, events + 1)])
    assert ratios[-1] == pytest.approx(0.5) and ratios == sorted(ratios)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"prune_events {bad!r} must be a whole number, at least 1"):
            TaskSettings(prune_events=bad)  # type: ignore[arg-type]
