"""The fully shared baselines: one model whose every weight serves every task, trained on all tasks at once.

SISR: MDSR-style, the family's own EDSR with its shared body and one upsampling tail per scale, trained on the
scales in turn. NIC: CompressAI's variable-rate scale hyperprior (``bmshj2018-hyperprior-vbr``, Kamisli et al.
2024: one transform, a quantisation gain per rate and learned reconstruction offsets), trained on the rates in turn.
Both are served through :class:`JointModel`, which offers the calls a family makes on a shared network, so the
family's own loss, evaluation and entropy coding measure them exactly as they measure PnG.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import nn

from pngrow.workers.data import PatchSampler
from pngrow.workers.models import Family
from pngrow.workers.models.nic import QUALITY_LAMBDAS, lambda_of
from pngrow.workers.settings import TaskSettings
from pngrow.workers.training import Optimisers, training_loss

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from compressai.models.vbr import ScaleHyperpriorVbr

__all__ = ["JointModel", "VariableRateCodec", "build_joint", "dense_model", "train_joint"]

# The VBR model's gain for CompressAI quality q is its level q - 1; other lambdas take the nearest level.
_LEVELS = sorted(QUALITY_LAMBDAS.items())


class VariableRateCodec(nn.Module):
    """CompressAI's ``ScaleHyperpriorVbr`` run at one rate level at a time, with the single-rate codec's calls."""

    def __init__(self, N: int, M: int) -> None:
        super().__init__()
        self.codec = ScaleHyperpriorVbr(N=N, M=M)
        self.level = 0

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return self.codec(x, stage=2, s=self.level)

    def compress(self, x: torch.Tensor) -> dict[str, Any]:
        return self.codec.compress(x, stage=2, s=self.level)

    def decompress(self, strings: list[Any], shape: torch.Size) -> dict[str, Any]:
        return self.codec.decompress(strings, shape, stage=2, s=self.level)

    def update(self, force: bool = False) -> bool:
        return self.codec.update(force=force)

    def aux_loss(self) -> torch.Tensor:
        return self.codec.aux_loss()


def _level(task: str) -> int:
    target = math.log(lambda_of(task))
    return min(range(len(_LEVELS)), key=lambda i: abs(math.log(_LEVELS[i][1]) - target))


class JointModel(nn.Module):
    """A plain multi-task model served like a :class:`SharedNetwork`: ``joint(task, x)``, ``activate(task)``,
    ``.model`` and ``.device``, so that a family's loss and evaluation run on it unchanged."""

    def __init__(self, model: nn.Module, route: Callable[[nn.Module, str], dict[str, Any]]) -> None:
        super().__init__()
        self.model = model
        self.route = route

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def activate(self, task: str) -> None:
        self.route(self.model, task)

    def forward(self, task: str, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs, **self.route(self.model, task))


def _by_task_argument(model: nn.Module, task: str) -> dict[str, Any]:
    return {"task": task}


def _by_rate_level(model: nn.Module, task: str) -> dict[str, Any]:
    model.level = _level(task)
    return {}


def build_joint(family: Family, initial: dict[str, torch.Tensor] | None = None) -> JointModel:
    """The fully shared baseline for ``family``'s tasks (SISR: EDSR with per-scale tails; NIC: the VBR codec), its
    layers that the family's own model has set from the dense state dict ``initial`` when given."""
    if family.name == "sisr":
        joint = JointModel(family.build_model(), _by_task_argument)
        target = joint.model
    elif family.name == "nic":
        joint = JointModel(VariableRateCodec(family.arch["N"], family.arch["M"]), _by_rate_level)
        target = joint.model.codec
    else:
        raise ValueError(f"no fully shared baseline for family {family.name!r}")
    if initial is not None:
        target.load_state_dict(initial, strict=False)  # the VBR's gains and the other tasks' tails start fresh
    return joint


def dense_model(family: Family) -> JointModel:
    """The family's own dense model for its tasks, served like a shared network (the task passed as the model's
    task argument where it takes one), for training a dense model with the family's loss."""
    model, task_arg = family.build_model(), family.build_shared().task_arg
    return JointModel(model, (lambda _, task: {task_arg: task}) if task_arg else (lambda _, task: {}))


def train_joint(joint: JointModel, family: Family, sampler: PatchSampler, steps_per_task: int, settings: TaskSettings,
                log: Callable[[str], None] = print) -> None:
    """Train every weight on all of ``family``'s tasks, one task per step in turn, ``steps_per_task`` steps each,
    with the optimiser and cosine schedule that PnG's training of a task uses, at the batch size, learning rate,
    seed, precision and memory order of ``settings``."""
    torch.manual_seed(settings.seed)
    joint.train()
    if settings.channels_last:
        joint.model.to(memory_format=torch.channels_last)
    aux = [p for n, p in joint.model.named_parameters() if n.endswith("quantiles")]
    aux_ids = {id(p) for p in aux}
    total = max(1, steps_per_task * len(family.tasks))
    weights = [p for p in joint.model.parameters() if id(p) not in aux_ids]
    optimisers = Optimisers.build([{"params": weights, "lr": settings.lr}], aux, (total,), family.grad_clip_norm)
    for step in range(steps_per_task * len(family.tasks)):
        task = family.tasks[step % len(family.tasks)]
        batch = sampler.sample(settings.batch_size, family.patch_size(task))
        loss, figures = training_loss(joint, family, task, settings, batch)  # type: ignore[arg-type]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"joint model, task {task!r}: training loss became {loss.item()} at step {step}")
        optimisers.step(loss, lambda: family.aux_loss(joint))  # type: ignore[arg-type]
        if step % max(1, total // 10) == 0 or step == total - 1:
            log(f"[joint {task}] step {step + 1}/{total} " + " ".join(f"{k}={v:.4g}" for k, v in figures.items()))
    for task in family.tasks:
        family.before_commit(joint, task)  # type: ignore[arg-type]
    joint.eval()
