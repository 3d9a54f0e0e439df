"""One network whose prunable weights are shared among tasks by micro-structured blocks.

Choices where the paper is silent (stated here, in README, and configurable where a user may want the other):

* Ownership is kept per channel pair of each layer's (output x input) plane; a task prunes and selects at its own
  block shape, so a later task may use finer or coarser blocks than an earlier one.
* Prune criterion: block RMS of the task's own weights (L2 norm divided by the square root of the block's size, so
  edge blocks compete fairly), per layer, releasing ``round(ratio * candidates)`` blocks, always keeping one.
* Selection of earlier blocks (CPG's "picking", Piggyback's masks): real-valued scores per block, binarised at 0 in
  the forward pass with a straight-through gradient; ``reuse="all"`` is PackNet's nested sharing, ``"none"`` none.
* Parameters that are not block-structured (biases, normalisation, GDN, entropy models) are task-local: each task keeps
  its own copy, swapped in when the task is activated. Modules listed in ``task_heads`` are routed per task by the
  model itself (``ModuleDict`` keyed by task name) and belong to that task alone.
* Earlier weights are frozen structurally: a task trains a separate ``growth`` tensor and only ever writes positions
  that were free, so no optimiser setting (momentum, weight decay) can touch another task's weights.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import nn
from torch.nn.utils import prune as prune_utils

from ._blocks import BlockGrid, parse_block_shape

__all__ = ["FREE", "GROWTHS", "Growth", "PRUNABLE_TYPES", "PRUNE_SCOPES", "PruneCandidates", "PruneScope", "Reuse",
           "SharedLayer", "SharedNetwork", "TaskRecord", "UnknownTaskError", "head_prefixes"]

PRUNABLE_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
Reuse = Literal["learned", "all", "none"]
REUSE_CHOICES = ("learned", "all", "none")
# Which blocks a task's pruning releases: only its own new ones, or its own and its reused earlier ones.
PruneScope = Literal["own", "active"]
PRUNE_SCOPES = ("own", "active")
# Where a later task's free blocks start: PyTorch's default initialisation (CPG's and the paper's growth), the values
# an earlier task had trained them to before it released them, or zero (with the last task's selection, the task then
# starts computing what the last task committed, and grows from there; see SharedNetwork.begin_task).
Growth = Literal["fresh", "released", "zero"]
GROWTHS = ("fresh", "released", "zero")
# The owner of a channel pair that no task owns yet (``SharedLayer.owner`` holds task indices otherwise).
FREE = -1


def head_prefixes(task_heads: Sequence[str], task: str) -> tuple[str, ...]:
    """Name prefixes of ``task``'s own part of every per-task module in ``task_heads`` (a ``ModuleDict`` by task).

    >>> head_prefixes(["tails"], "x2")
    ('tails.x2.',)
    """
    return tuple(f"{head}.{task}." for head in task_heads)


class UnknownTaskError(KeyError, ValueError):
    """A task name the shared network does not have. A ``KeyError`` (a lookup that failed) and a ``ValueError``
    (usually a user's input), printed without ``KeyError``'s quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class TaskRecord:
    """A task of the shared network: its name, block shape, how it reuses earlier blocks, whether it prunes the
    network's channel pairs together (``paired``), and its stored state."""

    name: str
    block_shape: tuple[int, int]
    reuse: Reuse
    committed: bool = False
    paired: bool = False
    local_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


class _BinaryStep(torch.autograd.Function):
    """Piggyback's threshold at 0 with a straight-through gradient."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return (scores > 0).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad


@dataclass(frozen=True)
class PruneCandidates:
    """The blocks of one layer (or of a channel pair, joined) that a task's pruning decides on, all grid shaped: the
    task's own blocks, the earlier blocks on offer and those of them it reuses, the blocks it computes with now, and
    each block's sum of squared weights and count of weights."""

    own: torch.Tensor
    offered: torch.Tensor
    reused: torch.Tensor
    current: torch.Tensor
    squares: torch.Tensor
    size: torch.Tensor

    def joined(self, other: PruneCandidates) -> PruneCandidates:
        """Blocks decided together: a block is a candidate or current in either, its weights are both's."""
        return PruneCandidates(self.own | other.own, self.offered | other.offered, self.reused | other.reused,
                               self.current | other.current, self.squares + other.squares, self.size + other.size)

    def transposed(self) -> PruneCandidates:
        """The same blocks with the grid's axes swapped."""
        return PruneCandidates(*(t.T for t in (self.own, self.offered, self.reused, self.current, self.squares,
                                               self.size)))


def _strongest(candidates: PruneCandidates, ratio: float) -> torch.Tensor | None:
    """The blocks to keep when ``ratio`` of the candidates are released, weakest RMS first (at least one kept);
    ``None`` when there is nothing to release."""
    n_candidates = int((candidates.own | candidates.offered).sum())
    if n_candidates == 0:
        return None
    n_keep = max(1, n_candidates - round(ratio * n_candidates))
    if int(candidates.current.sum()) <= n_keep:
        return None
    rms = torch.sqrt(candidates.squares / candidates.size.clamp_min(1))
    rms = torch.where(candidates.current, rms, torch.tensor(-1.0, device=rms.device))
    order = torch.argsort(rms.flatten(), descending=True, stable=True)
    top = torch.zeros(rms.numel(), dtype=torch.bool, device=rms.device)
    top[order[:n_keep]] = True
    return top.reshape(rms.shape)


class SharedLayer(nn.Module):
    """The shared state of one prunable module: its weights, block ownership and each task's selection."""

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__()
        weight = module.weight
        self.name = name
        # ConvTranspose weights are stored (in, out/groups, *k): their output channels are dimension 1.
        self.transposed = bool(getattr(module, "transposed", False))
        rows, cols = (weight.shape[1], weight.shape[0]) if self.transposed else (weight.shape[0], weight.shape[1])
        self.plane = (int(rows), int(cols))
        self.kernel_numel = int(weight[0, 0].numel())
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("owner", torch.full(self.plane, FREE, dtype=torch.int16))
        self.kept: dict[int, torch.Tensor] = {}
        self.selected: dict[int, torch.Tensor] = {}
        self.growth: nn.Parameter | None = None
        self.scores: nn.Parameter | None = None
        # Set by SharedNetwork: this layer is the producer or the consumer of a channel pair.
        self.pair_role: Literal["producer", "consumer"] | None = None
        self._active_cache: dict[int, torch.Tensor] = {}

    # --- geometry ------------------------------------------------------------------------------------------------
    def grid(self, block_shape: tuple[int, int]) -> BlockGrid:
        """The blocks of ``block_shape`` over this layer's channel plane."""
        return BlockGrid(self.plane, block_shape)

    def task_grid(self, task: TaskRecord) -> BlockGrid:
        """The blocks ``task`` prunes and selects here: its block shape, except in a channel pair when the task is
        paired: there, as many channels as its blocks have outputs, whole rows of the producer and whole columns of
        the consumer, so that each block of the consumer reads exactly one block of the producer's outputs."""
        if task.paired and self.pair_role == "producer":
            return BlockGrid(self.plane, (task.block_shape[0], self.plane[1]))
        if task.paired and self.pair_role == "consumer":
            return BlockGrid(self.plane, (self.plane[0], task.block_shape[0]))
        return BlockGrid(self.plane, task.block_shape)

    def to_weight(self, plane: torch.Tensor) -> torch.Tensor:
        """A plane-shaped tensor broadcast to the weight's shape."""
        if self.transposed:
            plane = plane.transpose(0, 1)
        return plane.reshape(plane.shape + (1,) * (self.weight.dim() - 2))

    def from_weight(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of a weight-shaped tensor over the kernel, as a plane."""
        plane = values.reshape(values.shape[0], values.shape[1], -1).sum(-1)
        return plane.transpose(0, 1) if self.transposed else plane

    # --- masks ---------------------------------------------------------------------------------------------------
    def active_plane(self, index: int, task: TaskRecord) -> torch.Tensor:
        """Channel pairs that committed task ``index`` computes with: its own and its selected earlier ones."""
        cached = self._active_cache.get(index)
        if cached is None:
            earlier = self.owned() & (self.owner < index)
            selected = self.task_grid(task).expand(self.selected[index]) & earlier
            cached = (self.owner == index) | selected
            self._active_cache[index] = cached
        return cached

    def own_plane(self, index: int, task: TaskRecord) -> torch.Tensor:
        """Channel pairs the task in progress grows: free ones inside its kept blocks."""
        return self.task_grid(task).expand(self.kept[index]) & (self.owner == FREE)

    def owned(self) -> torch.Tensor:
        """Channel pairs some committed task owns."""
        return self.owner != FREE

    def current_plane(self, index: int, task: TaskRecord) -> torch.Tensor:
        """Channel pairs task ``index`` computes with now: :meth:`active_plane` once committed; while in progress,
        its own plane and the earlier pairs its current selection (learned scores above 0, or fixed) picks."""
        if task.committed:
            return self.active_plane(index, task)
        chosen = (self.scores.detach() > 0) if self.scores is not None else self.selected[index]
        earlier = self.owned() & self.task_grid(task).expand(chosen)
        return self.own_plane(index, task) | earlier

    def masks(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``index``'s block masks as stored: (kept blocks, selected earlier blocks), grid shaped, bool."""
        return self.kept[index], self.selected[index]

    def restore_masks(self, tasks: Sequence[TaskRecord], masks: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set every committed task's (kept, selected) masks, as :meth:`masks` gives them, and rebuild ownership:
        each task owns its kept blocks' channel pairs that were still free when it grew."""
        if len(tasks) != len(masks):
            raise ValueError(f"layer {self.name!r}: {len(masks)} mask pairs for {len(tasks)} tasks")
        device = self.owner.device
        self.owner.fill_(FREE)
        for index, (task, (kept, selected)) in enumerate(zip(tasks, masks)):
            grid = self.task_grid(task)
            if tuple(kept.shape) != grid.shape or tuple(selected.shape) != grid.shape:
                raise ValueError(f"layer {self.name!r}: task {task.name!r}'s masks are not of its {grid.shape} blocks")
            self.kept[index], self.selected[index] = kept.bool().to(device), selected.bool().to(device)
            self.owner[grid.expand(self.kept[index]) & (self.owner == FREE)] = index
        self._active_cache.clear()

    def map_masks(self, fn: Any) -> None:
        """Apply ``fn`` (e.g. a device move) to every task's masks; what was cached from them is dropped."""
        self.kept = {k: fn(v) for k, v in self.kept.items()}
        self.selected = {k: fn(v) for k, v in self.selected.items()}
        self._active_cache.clear()

    def effective_weight(self, index: int, task: TaskRecord) -> torch.Tensor:
        """The weight task ``index`` computes with; only its active blocks are non-zero."""
        if task.committed:
            return torch.where(self.to_weight(self.active_plane(index, task)), self.weight, 0.0)
        assert self.growth is not None
        own = self.to_weight(self.own_plane(index, task))
        earlier = self.to_weight(self.owned())
        grid = self.task_grid(task)
        if self.scores is not None:
            selection = self.to_weight(grid.expand(_BinaryStep.apply(self.scores))) * earlier
            reused = self.weight * selection
        else:
            reused = torch.where(earlier & self.to_weight(grid.expand(self.selected[index])), self.weight, 0.0)
        return torch.where(own, self.growth, reused)

    # --- task life cycle -----------------------------------------------------------------------------------------
    def begin(self, index: int, task: TaskRecord, grow_from: Growth, previous: TaskRecord | None) -> None:
        """Start task ``index``: every block kept, a growth tensor (its free positions as ``grow_from`` says)
        and a selection of the earlier blocks (``previous``: the last committed task, if any)."""
        grid = self.task_grid(task)
        device = self.weight.device
        self.kept[index] = torch.ones(grid.shape, dtype=torch.bool, device=device)
        has_earlier = grid.block_any(self.owned())
        self.selected[index] = has_earlier & (task.reuse != "none")
        growth = self.weight.detach().clone()
        if grow_from != "released":
            start = torch.zeros_like(growth)
            if grow_from == "fresh":
                nn.init.kaiming_uniform_(start, a=math.sqrt(5))  # PyTorch's default for conv and linear weights
            growth = torch.where(self.to_weight(self.owner == FREE), start, growth)
        self.growth = nn.Parameter(growth)
        if task.reuse == "learned" and bool(has_earlier.any()):
            # Start with every earlier block selected (CPG's picking starts from the full model); growing from zero,
            # only those the last task computes with, so that the task starts computing what that task committed.
            start = torch.full(grid.shape, 1e-2, device=device)
            if grow_from == "zero" and previous is not None:
                start = torch.where(grid.block_any(self.active_plane(index - 1, previous)), start, -start)
            self.scores = nn.Parameter(start)
        else:
            self.scores = None

    def prune(self, index: int, task: TaskRecord, ratio: float, scope: PruneScope = "own") -> None:
        """Release the weakest blocks so that ``ratio`` of the task's candidate blocks are released.

        ``scope="own"`` (PackNet, CPG): the candidates are the task's own (free) blocks. ``"active"``: every block the
        task could compute with, its own and all earlier ones; its selected earlier blocks compete with its own by the
        same RMS, and those that lose are deselected, so the task computes with at most ``1 - ratio`` of them, as the
        first task does. Then later tasks free whole channels too, and compact (see :func:`compact_task`).
        """
        candidates = self.candidates(index, task, scope)
        self.keep(index, candidates, _strongest(candidates, ratio))

    def candidates(self, index: int, task: TaskRecord, scope: PruneScope) -> PruneCandidates:
        """What pruning task ``index`` in ``scope`` decides on in this layer (see :meth:`prune`)."""
        assert self.growth is not None
        grid = self.task_grid(task)
        free = self.owner == FREE
        earlier = (self.owner >= 0) & (self.owner < index)
        own = grid.block_any(free)
        offered = grid.block_any(earlier) if scope == "active" else torch.zeros_like(own)
        reused = self.selected[index] & offered
        with torch.no_grad():
            positions = free | (earlier & grid.expand(reused))
            values = torch.where(self.to_weight(free), self.growth.detach().float(), self.weight.float())
            squares = grid.block_sum(self.from_weight(values**2) * positions)
            size = grid.block_sum(positions.float()) * self.kernel_numel
        return PruneCandidates(own, offered, reused, (self.kept[index] & own) | reused, squares, size)

    def keep(self, index: int, candidates: PruneCandidates, top: torch.Tensor | None) -> None:
        """Keep task ``index``'s blocks ``top`` of ``candidates`` (grid shaped; ``None``: keep all): its own blocks
        outside ``top`` are released, its reused earlier blocks outside ``top`` deselected."""
        if top is None:
            return
        self.kept[index] = top & candidates.own
        self.selected[index] = self.selected[index] & (top | ~candidates.reused)
        self._active_cache.pop(index, None)

    def deselect(self, index: int, blocks: torch.Tensor) -> None:
        """Task ``index`` no longer selects the earlier ``blocks`` (grid shaped)."""
        self.selected[index] = self.selected[index] & ~blocks
        self._active_cache.pop(index, None)

    def fix_selection(self, index: int) -> None:
        """Binarise the learned selection of task ``index`` and stop learning it."""
        if self.scores is not None:
            self.selected[index] = (self.scores.detach() > 0) & self.selected[index]
            self.scores = None

    def commit(self, index: int, task: TaskRecord) -> None:
        """Task ``index`` owns its kept free channel pairs, their weights are written, its growth dropped. The free
        pairs it released keep the values it had trained them to (no task computes with them), which a later task
        may grow from (``begin_task(..., grow_from="released")``)."""
        assert self.growth is not None
        self.fix_selection(index)
        own = self.own_plane(index, task)
        with torch.no_grad():
            grown = self.to_weight(self.owner == FREE)  # kept or released, every free pair was this task's to train
            self.owner[own] = index
            self.weight.copy_(torch.where(grown, self.growth.detach(), self.weight))
        self.growth = None
        self._active_cache.pop(index, None)


class SharedNetwork(nn.Module):
    """Wraps any ``nn.Module`` so that its Conv/ConvTranspose/Linear weights are shared among tasks by blocks.

    Tasks are added one at a time: :meth:`begin_task` (grow), training, :meth:`prune`, fine-tuning, :meth:`commit`.
    ``shared(task, *inputs)`` runs the wrapped model with exactly that task's blocks and task-local state.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    >>> shared = SharedNetwork(net)
    >>> shared.begin_task("denoise", block_shape=(4, 4))
    >>> shared.prune(0.5)
    >>> shared.commit()
    >>> shared("denoise", torch.zeros(1, 3, 8, 8)).shape
    torch.Size([1, 3, 8, 8])
    """

    def __init__(self, model: nn.Module, task_heads: Sequence[str] = (), task_arg: str | None = None,
                 channel_pairs: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__()
        self.model = model
        self.task_heads = tuple(task_heads)
        self.task_arg = task_arg
        self.tasks: list[TaskRecord] = []
        self._active: int | None = None
        layers = {}
        for name, module in model.named_modules():
            if isinstance(module, PRUNABLE_TYPES) and not self._in_head(name) and name:
                layers[name] = module
        if not layers:
            raise ValueError(f"{type(model).__name__} has no Conv or Linear layer outside task_heads to share")
        self.layer_names = list(layers)
        self.layers = nn.ModuleDict({_key(n): SharedLayer(n, m) for n, m in layers.items()})
        for name, module in layers.items():
            del module._parameters["weight"]
            module.register_forward_pre_hook(_WeightHook(self, self.layers[_key(name)]))
        self.local_names = [n for n, _ in _named_tensors(model) if not self._in_head(n)]
        self.channel_pairs = self._check_pairs(channel_pairs)
        for producer, consumer in self.channel_pairs:
            self.layers[_key(producer)].pair_role = "producer"
            self.layers[_key(consumer)].pair_role = "consumer"

    def _check_pairs(self, pairs: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        """``pairs`` as a tuple, each (producer, consumer) two shared layers, the producer's outputs as many as the
        consumer's inputs; a consumer has one producer and produces no pair itself."""
        checked = tuple((str(producer), str(consumer)) for producer, consumer in pairs)
        for producer, consumer in checked:
            for name in (producer, consumer):
                if name not in self.layer_names:
                    raise ValueError(f"channel pair layer {name!r} is not a shared Conv or Linear layer of "
                                     f"{type(self.model).__name__}")
            outputs, inputs = self.layers[_key(producer)].plane[0], self.layers[_key(consumer)].plane[1]
            if outputs != inputs:
                raise ValueError(f"channel pair ({producer!r}, {consumer!r}): {outputs} outputs feed {inputs} inputs")
        consumers = [c for _, c in checked]
        for name in consumers:
            if consumers.count(name) > 1 or name in {p for p, _ in checked}:
                raise ValueError(f"layer {name!r} is in more than one channel pair")
        return checked

    # --- tasks -----------------------------------------------------------------------------------------------------
    def _in_head(self, name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in self.task_heads)

    def task_index(self, name: str) -> int:
        """The position of task ``name`` (an :class:`UnknownTaskError` naming the known tasks otherwise)."""
        for i, task in enumerate(self.tasks):
            if task.name == name:
                return i
        known = ", ".join(t.name for t in self.tasks) or "none yet"
        raise UnknownTaskError(f"unknown task {name!r} (tasks: {known})")

    @property
    def device(self) -> torch.device:
        """Where the shared weights are."""
        return self.shared_layers()[0].weight.device

    @property
    def task_names(self) -> list[str]:
        """Every task's name, in the order they were grown."""
        return [t.name for t in self.tasks]

    @property
    def task_in_progress(self) -> TaskRecord | None:
        """The task begun and not yet committed, if any."""
        return self.tasks[-1] if self.tasks and not self.tasks[-1].committed else None

    def shared_layers(self) -> list[SharedLayer]:
        """The shared layers in the model's module order."""
        return [self.layers[_key(n)] for n in self.layer_names]  # type: ignore[misc]

    def begin_task(
        self, name: str, block_shape: tuple[int, int] | str = (4, 4), reuse: Reuse = "learned",
        grow_from: Growth = "fresh", paired: bool = False,
    ) -> None:
        """Start growing task ``name`` into the free blocks, which start as ``grow_from`` (one of :data:`GROWTHS`)
        says; the first task starts from the weights the model holds. With ``"zero"`` and a learned selection, the
        task starts selecting exactly the earlier blocks the last task computes with, so (with the same block shape
        and no task heads) it starts computing what the last task committed. ``"zero"`` does not go with ``paired``:
        a released pair's producer rows and consumer columns would both start at zero, and neither could learn.

        ``paired``: the task prunes only the network's ``channel_pairs`` (and, in the active scope, its own head),
        each by channels, as many as its blocks have outputs, released from the producer's outputs and the consumer's
        inputs together, so that both layers of a pair compute with the same channels (see
        :meth:`SharedLayer.task_grid`). Every other shared layer it keeps whole (e.g. those that write a residual
        stream, whose pruning costs the most quality).
        """
        if paired and not self.channel_pairs:
            raise ValueError(f"task {name!r} is paired, but this {type(self.model).__name__} declares no channel pairs")
        if self.task_in_progress is not None:
            raise RuntimeError(f"task {self.task_in_progress.name!r} is still in progress; commit it first")
        if name in self.task_names:
            raise ValueError(f"task {name!r} already exists")
        if reuse not in REUSE_CHOICES:
            raise ValueError(f"reuse {reuse!r} is not one of {', '.join(REUSE_CHOICES)}")
        if grow_from not in GROWTHS:
            raise ValueError(f"grow_from {grow_from!r} is not one of {', '.join(GROWTHS)}")
        if paired and grow_from == "zero":
            raise ValueError(f"task {name!r}: a paired task cannot grow from zero (its released channels would never "
                             "learn); grow it fresh or from the released values")
        task = TaskRecord(name, parse_block_shape(block_shape), reuse, paired=paired)
        if not any(bool((layer.owner == FREE).any()) for layer in self.shared_layers()):
            raise RuntimeError(f"no free blocks left to grow task {name!r}: prune an earlier task first")
        previous = self.tasks[-1] if self.tasks else None
        index = len(self.tasks)
        self.activate_none()
        self.tasks.append(task)
        task.local_state = _clone(previous.local_state) if previous else self._live_local_state()
        for layer in self.shared_layers():
            layer.begin(index, task, grow_from if index else "released", previous)
        self.activate(name)

    def prune(self, ratio: float, scope: PruneScope = "own") -> None:
        """Release ``ratio`` of the in-progress task's candidate blocks in every layer (weakest block RMS first);
        with ``scope="active"`` its selected earlier blocks are candidates too (see :meth:`SharedLayer.prune`). A
        paired task prunes its channel pairs only, each pair's two layers by their joint block RMS."""
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"prune ratio {ratio!r} is outside [0, 1)")
        if scope not in PRUNE_SCOPES:
            raise ValueError(f"prune scope {scope!r} is not one of {', '.join(PRUNE_SCOPES)}")
        task = self._require_in_progress()
        index = len(self.tasks) - 1
        if task.paired:
            for producer, consumer in (tuple(self.layers[_key(n)] for n in pair) for pair in self.channel_pairs):
                mine, theirs = producer.candidates(index, task, scope), consumer.candidates(index, task, scope)
                top = _strongest(mine.joined(theirs.transposed()), ratio)
                producer.keep(index, mine, top)
                consumer.keep(index, theirs, None if top is None else top.T)
        else:
            for layer in self.shared_layers():
                layer.prune(index, task, ratio, scope)
        if scope == "active":
            for module in self._head_layers(task.name):
                prune_utils.custom_from_mask(module, "weight", _strongest_blocks(module, task.block_shape, ratio))

    def _head_layers(self, name: str) -> list[nn.Module]:
        """The Conv/ConvTranspose/Linear layers of task ``name``'s own head (e.g. its SISR tail)."""
        prefixes = head_prefixes(self.task_heads, name)
        return [m for n, m in self.model.named_modules() if isinstance(m, PRUNABLE_TYPES) and n.startswith(prefixes)]

    def fix_selection(self) -> None:
        """Freeze the in-progress task's learned selection of earlier blocks (binarised at 0)."""
        task = self._require_in_progress()
        index = len(self.tasks) - 1
        for layer in self.shared_layers():
            layer.fix_selection(index)
        for producer, consumer in self.channel_pairs if task.paired else ():
            # Channels the consumer reads nothing of are computed for nothing: deselecting the producer's earlier
            # blocks of them changes no output (a pair's producer feeds only its consumer).
            reader = self.layers[_key(consumer)]
            read = reader.task_grid(task).block_any(reader.current_plane(index, task))
            self.layers[_key(producer)].deselect(index, ~read.T)

    def commit(self) -> None:
        """Make the in-progress task permanent: it owns its kept blocks and its state is frozen."""
        task = self._require_in_progress()
        index = len(self.tasks) - 1
        if self._active == index:
            task.local_state = self._live_local_state()
        self.fix_selection()
        for layer in self.shared_layers():
            layer.commit(index, task)
        for module in self._head_layers(task.name):
            if prune_utils.is_pruned(module):  # the active scope pruned its head: keep the zeros, drop the mask
                prune_utils.remove(module, "weight")
        task.committed = True
        self._active = None
        self.activate(task.name)

    def _require_in_progress(self) -> TaskRecord:
        task = self.task_in_progress
        if task is None:
            raise RuntimeError("no task in progress: call begin_task first")
        return task

    # --- training --------------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The in-progress task's parameters by group: ``weights`` (growth, task-local, its head), ``selection``."""
        task = self._require_in_progress()
        self.activate(task.name)
        layers = self.shared_layers()
        weights = [layer.growth for layer in layers if layer.growth is not None]
        local = set(self.local_names)
        prefixes = head_prefixes(self.task_heads, task.name)
        for name, param in self.model.named_parameters():
            if name in local or name.startswith(prefixes):
                weights.append(param)
        selection = [layer.scores for layer in layers if layer.scores is not None]
        return {"weights": weights, "selection": selection}

    def selection_density(self) -> torch.Tensor:
        """Differentiable fraction of earlier blocks the in-progress task selects (0 when nothing is learned)."""
        values = [_BinaryStep.apply(layer.scores).mean() for layer in self.shared_layers() if layer.scores is not None]
        return torch.stack(values).mean() if values else torch.zeros(())

    def fingerprint(self, name: str) -> str:
        """SHA-256 of everything committed task ``name`` computes with: its effective weights, its task-local state
        and its head. Growing later tasks leaves it unchanged; any other change to the task changes it.

        >>> net = SharedNetwork(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 3, 3)))
        >>> net.begin_task("a", (4, 4)); net.prune(0.5); net.commit()
        >>> before = net.fingerprint("a")
        >>> net.begin_task("b", (4, 4)); net.prune(0.5); net.commit()
        >>> net.fingerprint("a") == before != net.fingerprint("b")
        True
        """
        index = self.task_index(name)
        task = self.tasks[index]
        if not task.committed:
            raise RuntimeError(f"task {name!r} is in progress; only committed tasks have a fingerprint")
        digest = hashlib.sha256()

        def add(label: str, value: torch.Tensor) -> None:
            data = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{label}:{data.dtype}:{tuple(value.shape)};".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")

        with torch.no_grad():
            for layer in self.shared_layers():
                add(layer.name, layer.effective_weight(index, task))
        for key in sorted(task.local_state):
            add(key, task.local_state[key])
        for key, value in sorted(self.head_tensors(name).items()):
            add(key, value)
        return digest.hexdigest()

    def head_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Parameters and buffers of task ``name``'s own part of the ``task_heads`` modules, by name."""
        prefixes = head_prefixes(self.task_heads, name)
        return {key: value for key, value in _named_tensors(self.model) if key.startswith(prefixes)}

    def local_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Task ``name``'s task-local parameters and buffers (biases, normalisation, entropy models), by name: the
        live ones while it is the active task in progress, else the ones it stored."""
        index = self.task_index(name)
        if self._active == index and not self.tasks[index].committed:
            return self._live_local_state()
        return dict(self.tasks[index].local_state)

    # --- running ---------------------------------------------------------------------------------------------------
    def forward(self, task: str, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model as task ``task`` (its blocks, task-local state and head)."""
        self.activate(task)
        if self.task_arg is not None:
            kwargs[self.task_arg] = task
        return self.model(*args, **kwargs)

    def activate(self, name: str) -> None:
        """Swap in task ``name``'s task-local state; saves the in-progress task's live state first."""
        index = self.task_index(name)
        if self._active == index:
            return
        self.activate_none()
        _assign_all(self.model, self.tasks[index].local_state)
        self._active = index

    def activate_none(self) -> None:
        """Leave no task active, keeping the in-progress task's live state."""
        if self._active is not None and not self.tasks[self._active].committed:
            self.tasks[self._active].local_state = self._live_local_state()
        self._active = None

    def _live_local_state(self) -> dict[str, torch.Tensor]:
        tensors = dict(_named_tensors(self.model))
        return {n: tensors[n].detach().clone() for n in self.local_names}

    @contextlib.contextmanager
    def without_computed_weights(self) -> Iterator[list[nn.Module]]:
        """While open, no layer holds a weight computed in a forward, which may belong to its autograd graph
        (``copy.deepcopy`` refuses those). The shared layers' hook weights are dropped (the next forward sets them
        again); the weights torch's pruning computed for pruned heads (``weight_orig * weight_mask``) are set
        aside and put back on exit. Yields those heads."""
        for layer in self.shared_layers():
            self.model.get_submodule(layer.name).__dict__.pop("weight", None)
        pruned = {m: m.__dict__.pop("weight") for m in self.model.modules()
                  if isinstance(m, PRUNABLE_TYPES) and prune_utils.is_pruned(m) and "weight" in m.__dict__}
        try:
            yield list(pruned)
        finally:
            for module, weight in pruned.items():
                module.__dict__["weight"] = weight

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedNetwork:
        """A copy that computes with its own weights and tasks, taken at any moment (e.g. a teacher mid-training).

        >>> import copy
        >>> net = SharedNetwork(nn.Sequential(nn.Conv2d(3, 4, 3)))
        >>> net.begin_task("a", (2, 2)); net("a", torch.rand(1, 3, 5, 5)).sum().backward()
        >>> copy.deepcopy(net).task_in_progress.name
        'a'
        """
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        with self.without_computed_weights() as pruned:
            clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        for module in pruned:  # the copy's pruned heads compute their own weight from their copied parts
            copied = memo[id(module)]
            copied.weight = copied.weight_orig * copied.weight_mask
        return clone

    def _apply(self, fn: Any, recurse: bool = True) -> SharedNetwork:
        super()._apply(fn, recurse)
        for task in self.tasks:
            task.local_state = {k: fn(v) for k, v in task.local_state.items()}
        for layer in self.shared_layers():
            layer.map_masks(fn)
        return self


class _WeightHook:
    """Before a shared layer's forward, sets its weight to the active task's effective weight.

    An object rather than a closure: ``copy.deepcopy`` copies a closure by reference, so a copied network would
    go on computing with the original's weights and tasks; it copies this hook's network and layer with the rest.
    """

    def __init__(self, network: SharedNetwork, layer: SharedLayer) -> None:
        self.network, self.layer = network, layer

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        active = self.network._active
        if active is None:
            raise RuntimeError("no task is active: call the shared network as shared(task, ...)")
        module.weight = self.layer.effective_weight(active, self.network.tasks[active])


def _strongest_blocks(module: nn.Module, block_shape: tuple[int, int], ratio: float) -> torch.Tensor:
    """A weight-shaped 0/1 mask keeping the ``1 - ratio`` share of the layer's blocks of highest RMS (at least one),
    blocks cut from its (output x input) channel plane as the shared layers' are (a task's own head, pruned)."""
    weight = module.weight.detach()
    transposed = bool(getattr(module, "transposed", False))
    squares = (weight.float() ** 2).reshape(weight.shape[0], weight.shape[1], -1).sum(-1)
    plane = squares.T if transposed else squares
    grid = BlockGrid(tuple(plane.shape), block_shape)  # type: ignore[arg-type]
    sizes = grid.block_sum(torch.ones_like(plane))
    rms = torch.sqrt(grid.block_sum(plane) / sizes)
    keep = max(1, grid.num_blocks - round(ratio * grid.num_blocks))
    top = torch.zeros(grid.num_blocks, dtype=torch.bool, device=weight.device)
    top[torch.argsort(rms.flatten(), descending=True, stable=True)[:keep]] = True
    kept = grid.expand(top.reshape(grid.shape))
    kept = kept.T if transposed else kept
    return kept.reshape(kept.shape + (1,) * (weight.dim() - 2)).expand_as(weight).to(weight.dtype)


def _key(name: str) -> str:
    return name.replace(".", "__")


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


def assign_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set parameter or buffer ``name`` of ``model`` to ``value`` (a copy), resizing where the shape differs."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        param = owner._parameters[attr]
        with torch.no_grad():
            if param.shape == value.shape:
                param.copy_(value)
            else:
                param.data = value.detach().clone().to(param.device)
    elif attr in owner._buffers:
        current = owner._buffers[attr]
        owner._buffers[attr] = value.detach().clone().to(current.device if current is not None else value.device)
    else:
        raise KeyError(f"{type(model).__name__} has no parameter or buffer {name!r}")


def _assign_all(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, value in state.items():
        assign_tensor(model, name, value)
