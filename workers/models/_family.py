"""A model family: how to build, train, evaluate and cost one kind of restoration network under PnG."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from ..bitstream import LatentIndexes
from ..data import ImageSet
from ..png import CheckpointError, SharedNetwork, load_shared, read_description, save_shared

__all__ = ["FAMILIES", "Codec", "Family", "Upscaler", "get_family", "load_model", "register_family"]

FAMILIES: dict[str, type[Family]] = {}


def register_family(name: str) -> Callable[[type[Family]], type[Family]]:
    """Class decorator adding a family to :data:`FAMILIES` under ``name``."""

    def decorate(cls: type[Family]) -> type[Family]:
        cls.name = name
        FAMILIES[name] = cls
        return cls

    return decorate


def get_family(name: str, tasks: list[str] | None = None, **arch: Any) -> Family:
    """The family ``name`` for ``tasks`` (its defaults when None) and architecture options.

    >>> get_family("jpeg")
    Traceback (most recent call last):
    ...
    ValueError: unknown family 'jpeg' (known: nic, sisr)
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r} (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[name](list(tasks) if tasks else list(FAMILIES[name].default_tasks), **arch)


def _convert(family: str, key: str, value: Any, kind: type) -> Any:
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{family} architecture option {key}={value!r} is not a {kind.__name__}") from None
    if kind is int and converted < 1:
        raise ValueError(f"{family} architecture option {key}={value!r} must be at least 1")
    return converted


class Family(ABC):
    """Builds the shared network for a list of tasks and knows the task's loss, metrics and cost input."""

    name: ClassVar[str]
    default_tasks: ClassVar[tuple[str, ...]]
    arch_defaults: ClassVar[dict[str, Any]]
    cost_size: ClassVar[int]  # side of the square input that task MACs are counted for
    latency_size: ClassVar[int]  # default side of the square input a task's latency is measured on
    size_multiple: ClassVar[int] = 1  # input sides the model takes must be multiples of this
    # Training budget of the default job (2 CPU cores, under 10 minutes for the default tasks).
    train_defaults: ClassVar[dict[str, Any]]
    # What :meth:`evaluate` returns, each with whether higher ("maximize") or lower is better, and the one a
    # search optimises by default.
    metric_directions: ClassVar[dict[str, str]]
    quality_metric: ClassVar[str]
    # The largest norm a training step's weight gradient is scaled to (None: not clipped).
    grad_clip_norm: ClassVar[float | None] = None
    # Modules the family imports only when it builds a model, which a search's workers import ahead (seconds each).
    lazy_imports: ClassVar[tuple[str, ...]] = ()
    # Task-local tensors the model gained after models were first saved: a saved model or initial state without one
    # starts it at its built value (which computes what that model did).
    added_tensors: ClassVar[tuple[str, ...]] = ()

    def __init__(self, tasks: list[str], **arch: Any) -> None:
        unknown = sorted(set(arch) - set(self.arch_defaults))
        if unknown:
            raise ValueError(
                f"unknown {self.name} architecture option {unknown[0]!r} (known: {', '.join(self.arch_defaults)})"
            )
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task list {','.join(tasks)!r} names a task twice")
        if not tasks:
            raise ValueError("the task list is empty")
        for task in tasks:
            self.check_task(task)
        self.tasks = list(tasks)
        self.arch = {k: _convert(self.name, k, arch.get(k, v), type(v)) for k, v in self.arch_defaults.items()}

    def architecture(self) -> dict[str, Any]:
        """What :meth:`build_shared` needs, JSON-serialisable (stored with every checkpoint)."""
        return {"family": self.name, "tasks": self.tasks, **self.arch}

    @abstractmethod
    def check_task(self, task: str) -> None:
        """Raise ``ValueError`` naming ``task`` if this family cannot serve it."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The untrained dense model for all of this family's tasks."""

    @abstractmethod
    def wrap(self, model: nn.Module) -> SharedNetwork:
        """``model`` (from :meth:`build_model`) wrapped for prune-and-grow, with this family's task heads."""

    def build_shared(self, initial: dict[str, torch.Tensor] | None = None) -> SharedNetwork:
        """A fresh shared network; ``initial`` is a dense state dict of :meth:`build_model` that task 1 starts from."""
        model = self.build_model()
        if initial is not None:
            result = model.load_state_dict(initial, strict=False)
            missing = [key for key in result.missing_keys if key not in self.added_tensors]
            problems = [*missing, *result.unexpected_keys]
            if problems:
                kind = "missing" if missing else "unexpected"
                raise ValueError(f"initial weights do not fit the {self.name} model: {kind} tensor {problems[0]!r}")
        return self.wrap(model)

    @abstractmethod
    def patch_size(self, task: str) -> int:
        """Side of the square clean training patch for ``task``."""

    @abstractmethod
    def loss(self, shared: SharedNetwork, task: str, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss of ``task`` on a batch of clean patches in [0, 1], and figures to log."""

    @abstractmethod
    def evaluate(self, shared: SharedNetwork, task: str, images: ImageSet) -> dict[str, float]:
        """Mean quality metrics of ``task`` over whole images."""

    @abstractmethod
    def cost_inputs(self, task: str) -> tuple[torch.Tensor, ...]:
        """Inputs of one forward of ``task`` for counting MACs."""

    def latency_inputs(self, size: int | None = None) -> tuple[torch.Tensor, ...]:
        """Inputs of one forward whose time is a task's latency: a random (1, 3, size, size) image in [0, 1]
        (:attr:`latency_size` when None). A size the model cannot take is refused in one line naming it."""
        size = self.latency_size if size is None else size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % self.size_multiple:
            rule = f"a positive multiple of {self.size_multiple}" if self.size_multiple > 1 else "a positive integer"
            raise ValueError(f"latency input size {size!r} does not fit the {self.name} model: it must be {rule}")
        return (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)

    def aux_parameters(self, shared: SharedNetwork) -> list[nn.Parameter]:
        """Parameters trained by their own optimiser on :meth:`aux_loss` (none by default)."""
        return []

    def aux_loss(self, shared: SharedNetwork) -> torch.Tensor | None:
        """Loss of the :meth:`aux_parameters` (None when there are none)."""
        return None

    def after_begin(self, shared: SharedNetwork, task: str, previous: str | None) -> None:
        """Adjust the task-local state ``task`` starts from once it has begun: a copy of ``previous``'s (the last
        task's, or the task a first task's initial weights were trained for; None when not known)."""

    def before_commit(self, shared: SharedNetwork, task: str) -> None:
        """Compute derived task-local state (e.g. entropy-coder tables) before the task is frozen."""

    @abstractmethod
    def restore(self, shared: SharedNetwork, task: str, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """What ``task`` makes of one uint8 (3, H, W) image, as uint8, with figures about it.

        SISR upscales the image; NIC entropy-codes it at the task's rate and decodes it (figures: bytes and bpp).
        """

    def save(self, shared: SharedNetwork, folder: str | Path) -> Path:
        """Save ``shared`` (safetensors + JSON) so that :func:`load_model` rebuilds it with this family."""
        return save_shared(shared, folder, self.architecture())


class Codec(ABC):
    """What a family whose tasks entropy-code images adds (its tasks are rates): CompressAI's ``compress`` and
    ``decompress`` of one image at a task's rate. Callers check ``isinstance(family, Codec)``."""

    @abstractmethod
    def compress(self, shared: SharedNetwork, task: str, image: torch.Tensor) -> dict[str, Any]:
        """Entropy-code a (1, 3, H, W) image in [0, 1] at ``task``'s rate: CompressAI's ``strings`` and ``shape``."""

    @abstractmethod
    def decompress(self, shared: SharedNetwork, task: str, coded: dict[str, Any], size: tuple[int, int],
                   indexes: np.ndarray | None = None) -> torch.Tensor:
        """The (1, 3, H, W) image of ``coded`` (what :meth:`compress` returned), cropped to ``size`` (H, W); its
        latent decoded with ``indexes`` where given (the bitstream's decoder passes the encoder's pinned ones, see
        :func:`~pngrow.workers.bitstream.decoding_indexes`), else with those it derives itself."""

    @abstractmethod
    def coding_indexes(self, shared: SharedNetwork, task: str, coded: dict[str, Any]) -> LatentIndexes:
        """The scales :meth:`decompress` computes from ``coded``'s hyper-latent, the scale table's boundaries and the
        latent's entropy-coding (CDF) indexes derived from them; an encoder's are the ones it coded with. Another
        runtime's rounding may move a scale across a boundary (CompressAI issue 309): the bitstream pins those."""

    @abstractmethod
    def rd_lambda(self, task: str) -> float:
        """The rate-distortion trade-off ``task`` was trained for; higher is a higher rate (orders the rates)."""


class Upscaler(ABC):
    """What a family whose tasks zoom images adds (its tasks are scales). Callers check
    ``isinstance(family, Upscaler)``."""

    tasks: list[str]

    @abstractmethod
    def scale(self, task: str) -> int:
        """The zoom factor of ``task``."""

    def task_for_scale(self, scale: int) -> str:
        """This model's task that zooms by ``scale``."""
        for task in self.tasks:
            if self.scale(task) == scale:
                return task
        known = ", ".join(str(self.scale(t)) for t in self.tasks)
        raise ValueError(f"scale {scale!r} is not one of this model's: {known}")


def load_model(folder: str | Path, tasks: list[str] | None = None) -> tuple[Family, SharedNetwork]:
    """The family and shared network saved in ``folder`` by :meth:`Family.save`.

    ``tasks`` extends the saved task list with tasks still to grow (their heads are built fresh); it must start
    with the saved tasks, in order.

    >>> try:
    ...     load_model("/nonexistent")
    ... except CheckpointError as error:
    ...     print(error)
    /nonexistent/model.json does not exist: not a pngrow model folder
    """
    architecture = dict(read_description(folder)["architecture"])
    name = architecture.pop("family", None)
    saved = architecture.pop("tasks", None)
    if name not in FAMILIES or not isinstance(saved, list):
        raise CheckpointError(f"{folder}: the description names no known family and task list")
    if tasks is not None and list(tasks[: len(saved)]) != saved:
        raise ValueError(f"task list {','.join(tasks)!r} does not extend the saved model's {','.join(saved)!r}")
    family = get_family(name, tasks or saved, **architecture)
    return family, load_shared(folder, lambda _: family.build_model(), family.added_tensors)
