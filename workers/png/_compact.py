"""A committed task exported as a plain module that computes only that task's active channels.

The masked forward of :class:`SharedNetwork` multiplies full dense tensors, so its MACs saving is not a speedup.
:func:`compact_task` cuts each shared layer down to what the task uses. Three ways to run one layer:

* ``dense``: the task's masked weight in one full-size layer (what an exported dense model does);
* ``channels``: output channels with no active weight are not computed (their output is the bias, exactly as in the
  masked model) and input channels with no active weight are not read;
* ``groups``: output channels are grouped by the input channels they use (block-sparse computation), one smaller
  layer per group.

With example inputs, each layer keeps the fastest of these, timed on the input it really gets ("where it pays");
without, ``channels`` wherever it removes a channel. Layers with ``groups > 1`` and subclasses of the standard layers
(whose forward may depend on the weight's shape) stay ``dense``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ._shared import PRUNABLE_TYPES, SharedNetwork, head_prefixes

__all__ = ["COMPACT_TOLERANCE", "STRATEGIES", "CompactLayer", "CompactModel", "CompactNetwork", "CompactionMismatch",
           "LayerPlan", "check_compaction", "compact_task"]

STRATEGIES = ("dense", "channels", "groups")
_SLICEABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# A non-dense way must beat dense by this factor to be kept: timing noise must not pick a slower layer.
_MARGIN = 1.05
# Largest difference allowed between a compacted task's output and the masked model's: fewer terms are summed, so
# float32 rounding differs, but by far less than one 8-bit grey level (1/255 = 3.9e-3).
COMPACT_TOLERANCE = 1e-3


class CompactionMismatch(RuntimeError):
    """A compacted task whose output differs from the masked model's beyond :data:`COMPACT_TOLERANCE`."""


@dataclass(frozen=True)
class LayerPlan:
    """How one shared layer runs in a compacted task: the way chosen, what it keeps, and the timings it was chosen by."""

    layer: str
    strategy: str
    outputs: tuple[int, int]  # (computed, total) output channels
    inputs: tuple[int, int]  # (read, total) input channels
    parts: int
    seconds: dict[str, float]


class CompactLayer(nn.Module):
    """One Conv/ConvTranspose/Linear layer computing only some (output, input) channel pairs, each part a smaller
    layer of the same type; outputs not computed are the bias (or zero).

    >>> conv = nn.Conv2d(4, 4, 1)
    >>> active = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    >>> weight = conv.weight.detach() * active[:, :, None, None]
    >>> layer = CompactLayer(conv, weight, active, "groups")
    >>> x = torch.randn(1, 4, 3, 3)
    >>> torch.allclose(layer(x), nn.functional.conv2d(x, weight, conv.bias), atol=1e-6), len(layer.parts)
    (True, 2)
    """

    def __init__(self, module: nn.Module, weight: torch.Tensor, active: torch.Tensor, strategy: str) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"compaction strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        self.transposed = bool(getattr(module, "transposed", False))
        self.spatial = 0 if isinstance(module, nn.Linear) else len(module.kernel_size)
        self.out_channels, self.in_channels = active.shape
        bias = module.bias.detach().clone() if module.bias is not None else None
        if strategy == "dense" or not bool(active.any()):
            groups = [(None, None)]
        elif strategy == "channels":
            groups = [(_nonzero(active.any(1)), _nonzero(active.any(0)))]
        else:
            patterns: dict[bytes, list[int]] = {}
            for row in _nonzero(active.any(1)).tolist():
                patterns.setdefault(active[row].cpu().numpy().tobytes(), []).append(row)
            groups = [(torch.tensor(rows), _nonzero(active[rows[0]])) for rows in patterns.values()]
        self.parts = nn.ModuleList()
        rows_in_order: list[torch.Tensor] = []
        for index, (rows, cols) in enumerate(groups):
            rows = torch.arange(self.out_channels) if rows is None else rows.cpu()
            cols = torch.arange(self.in_channels) if cols is None else cols.cpu()
            self.parts.append(_sliced(module, weight, rows, cols, None if bias is None else bias[rows]))
            whole = len(cols) == self.in_channels
            self.register_buffer(f"cols{index}", None if whole else cols.to(weight.device))
            rows_in_order.append(rows)
        rows = torch.cat(rows_in_order)
        natural = len(rows) == self.out_channels and bool((rows == torch.arange(self.out_channels)).all())
        self.register_buffer("rows", None if natural else rows.to(weight.device))
        # Outputs not computed are the bias, as in the masked model: it is kept whole to fill them.
        self.register_buffer("fill", None if natural else bias)

    @property
    def computed_outputs(self) -> int:
        """How many output channels are computed."""
        return self.out_channels if self.rows is None else len(self.rows)

    @property
    def read_inputs(self) -> int:
        """How many input channels are read."""
        cols = [getattr(self, f"cols{i}") for i in range(len(self.parts))]
        if any(c is None for c in cols):
            return self.in_channels
        return len(torch.unique(torch.cat(cols)))

    def channel_dim(self, x: torch.Tensor) -> int:
        """The dimension of ``x`` that holds the channels (a Linear layer's: the features)."""
        return x.dim() - 1 if self.spatial == 0 else x.dim() - self.spatial - 1

    def computed(self, x: torch.Tensor) -> torch.Tensor:
        """The computed output channels alone, in the order of :attr:`rows` (every channel when it is None)."""
        dim = self.channel_dim(x)
        outs = []
        for index, part in enumerate(self.parts):
            cols = getattr(self, f"cols{index}")
            outs.append(part(x if cols is None else x.index_select(dim, cols)))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output on ``x``: computed parts, the bias elsewhere."""
        y = self.computed(x)
        if self.rows is None:
            return y
        dim = self.channel_dim(x)
        shape = list(y.shape)
        shape[dim] = self.out_channels
        if self.fill is None:
            full = y.new_zeros(shape)
        else:
            view = [1] * len(shape)
            view[dim] = self.out_channels
            full = self.fill.view(view).expand(shape).contiguous()
        return full.index_copy_(dim, self.rows, y)


class CompactModel(nn.Module):
    """One task of a shared network as a plain module: ``compact(*inputs)`` runs the task as ``shared(task, *inputs)``
    does; :attr:`model` is the underlying model (e.g. a CompressAI codec with that task's entropy tables)."""

    def __init__(self, model: nn.Module, task: str, task_arg: str | None, plans: Sequence[LayerPlan]) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.task_arg = task_arg
        self.plans = tuple(plans)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the compacted model for its task."""
        if self.task_arg is not None:
            kwargs[self.task_arg] = self.task
        return self.model(*args, **kwargs)

    def parameter_count(self) -> int:
        """Weights and biases this task stores and computes with (the other tasks' heads are dropped)."""
        filled = sum(m.out_channels - m.computed_outputs for m in self.model.modules()
                     if isinstance(m, CompactLayer) and m.fill is not None)
        return sum(t.numel() for t in self.model.parameters()) + filled


def compact_task(
    shared: SharedNetwork,
    task: str,
    *example_inputs: Any,
    strategies: Sequence[str] = STRATEGIES,
    repeats: int = 5,
    **example_kwargs: Any,
) -> CompactModel:
    """Committed task ``task`` of ``shared`` as a standalone :class:`CompactModel` whose outputs match
    ``shared(task, ...)`` (up to float rounding: fewer terms are summed).

    Given example inputs, each shared layer runs the fastest of ``strategies`` on the input it gets there (best of
    ``repeats`` timings); otherwise ``channels`` where it removes a channel. ``strategies=("dense",)`` exports the
    task as a plain dense model.

    >>> net = SharedNetwork(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)))
    >>> net.begin_task("a", block_shape=(4, 64)); net.prune(0.5); net.commit()
    >>> compact = compact_task(net, "a")
    >>> x = torch.randn(1, 3, 16, 16)
    >>> torch.allclose(compact(x), net("a", x), atol=1e-5), [plan.outputs for plan in compact.plans]
    (True, [(4, 8), (3, 3)])
    """
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise ValueError(f"compaction strategy {unknown[0] if unknown else None!r} is not one of {', '.join(STRATEGIES)}")
    index = shared.task_index(task)
    record = shared.tasks[index]
    if not record.committed:
        raise RuntimeError(f"task {task!r} is in progress; only committed tasks can be compacted")
    _refuse_second_names(shared)
    targets = _targets(shared, task)
    names = [name for name, _, _ in targets]
    inputs = _layer_inputs(shared, task, names, example_inputs, example_kwargs) if example_inputs else {}
    shared.activate(task)
    # The shared layers are replaced below, so their hooks' network and layers need not be copied.
    keep = {id(shared): shared, **{id(layer): layer for layer in shared.shared_layers()}}
    with shared.without_computed_weights():
        model = copy.deepcopy(shared.model, keep).eval()
    for head in shared.task_heads:
        routed = model.get_submodule(head)
        for name in [n for n in routed._modules if n != task]:
            del routed._modules[name]
    plans = []
    with torch.no_grad():
        for name, weight, active in targets:
            module = shared.model.get_submodule(name)
            allowed = [s for s in strategies if s == "dense" or _sliceable(module)] or ["dense"]
            candidates = {s: CompactLayer(module, weight, active, s) for s in allowed}
            seconds = _time(candidates, inputs[name], repeats) if name in inputs else {}
            chosen = _choose(candidates, seconds)
            compact = candidates[chosen]
            _replace(model, name, compact)
            plans.append(LayerPlan(name, chosen, (compact.computed_outputs, compact.out_channels),
                                   (compact.read_inputs, compact.in_channels), len(compact.parts), seconds))
    for producer, consumer in shared.channel_pairs:
        _pass_channels_on(model.get_submodule(producer), model.get_submodule(consumer))
    return CompactModel(model, task, shared.task_arg, plans)


def _pass_channels_on(producer: nn.Module, consumer: nn.Module) -> None:
    """Where a channel pair's consumer reads exactly the channels its producer computes, the producer hands on only
    those (no full-width output filled with its bias) and the consumer reads them as they come."""
    if not (isinstance(producer, CompactLayer) and isinstance(consumer, CompactLayer)):
        return
    if producer.rows is None or len(consumer.parts) != 1 or consumer.cols0 is None:
        return
    if torch.equal(producer.rows, consumer.cols0):
        producer.rows = producer.fill = None
        producer.out_channels = len(consumer.cols0)
        consumer.in_channels = len(consumer.cols0)
        consumer.cols0 = None


def _refuse_second_names(shared: SharedNetwork) -> None:
    """A shared layer reached under a second module name would be replaced under one only, and keep its hook (the
    original network's weights) under the other: refused, by that name."""
    first = {id(shared.model.get_submodule(name)): name for name in shared.layer_names}
    for name, module in shared.model.named_modules(remove_duplicate=False):
        if first.get(id(module), name) != name:
            raise ValueError(f"layer {name!r} is shared layer {first[id(module)]!r} under a second name; "
                             f"compact_task cannot export it")


def _targets(shared: SharedNetwork, task: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """What can be compacted for ``task``: every shared layer with the task's effective weight and active (output x
    input) channel plane, then the Conv/Linear layers of its own head with their non-zero plane (a head the active
    pruning scope pruned has whole zero blocks)."""
    index = shared.task_index(task)
    record = shared.tasks[index]
    targets = [(layer.name, layer.effective_weight(index, record).detach().clone(),
                layer.active_plane(index, record)) for layer in shared.shared_layers()]
    prefixes = head_prefixes(shared.task_heads, task)
    for name, module in shared.model.named_modules():
        if isinstance(module, PRUNABLE_TYPES) and name.startswith(prefixes):
            weight = module.weight.detach().clone()
            plane = (weight != 0).reshape(weight.shape[0], weight.shape[1], -1).any(-1)
            targets.append((name, weight, plane.T if getattr(module, "transposed", False) else plane))
    return targets


def _choose(candidates: dict[str, CompactLayer], seconds: dict[str, float]) -> str:
    if seconds:
        fastest = min(seconds, key=seconds.__getitem__)
        if "dense" in seconds and seconds[fastest] * _MARGIN > seconds["dense"]:
            return "dense"
        return fastest
    channels = candidates.get("channels")
    if channels is not None and (channels.computed_outputs, channels.read_inputs) != (channels.out_channels,
                                                                                   channels.in_channels):
        return "channels"
    return "dense" if "dense" in candidates else next(iter(candidates))


def _layer_inputs(shared: SharedNetwork, task: str, names: list[str], args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The input each named layer gets in one forward of ``task`` on the example (its first call, if several)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            seen.setdefault(name, inputs[0].detach())  # a hook that returns a value replaces the output

        return hook

    handles = [shared.model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    try:
        with torch.no_grad():
            shared(task, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _time(candidates: dict[str, CompactLayer], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Best time of each candidate on ``x``, the candidates taking turns so that machine noise hits them alike."""
    best = {name: float("inf") for name in candidates}
    with torch.no_grad():
        for layer in candidates.values():
            layer(x)
        for _ in range(max(1, repeats)):
            for name, layer in candidates.items():
                start = time.perf_counter()
                layer(x)
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def _nonzero(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask).flatten()


def _sliceable(module: nn.Module) -> bool:
    return type(module) in _SLICEABLE and getattr(module, "groups", 1) == 1


def _sliced(module: nn.Module, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
            bias: torch.Tensor | None) -> nn.Module:
    """A copy of ``module`` (same type and geometry) restricted to output channels ``rows`` and inputs ``cols``."""
    part = copy.copy(module)
    part._parameters, part._buffers, part._modules = {}, {}, {}
    part._forward_pre_hooks, part._forward_hooks = type(module._forward_pre_hooks)(), type(module._forward_hooks)()
    device = weight.device
    if bool(getattr(module, "transposed", False)):
        piece = weight.index_select(0, cols.to(device)).index_select(1, rows.to(device))
    else:
        piece = weight.index_select(0, rows.to(device)).index_select(1, cols.to(device))
    part.weight = nn.Parameter(piece.contiguous(), requires_grad=False)
    part.register_parameter("bias", None if bias is None else nn.Parameter(bias.contiguous(), requires_grad=False))
    if isinstance(module, nn.Linear):
        part.in_features, part.out_features = len(cols), len(rows)
    else:
        part.in_channels, part.out_channels = len(cols), len(rows)
    return part


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    setattr(owner, attr, module)


def _output(value: Any) -> torch.Tensor:
    return value["x_hat"] if isinstance(value, dict) else value  # a codec's forward: its reconstruction


def check_compaction(compact: CompactModel, shared: SharedNetwork, inputs: tuple[torch.Tensor, ...]) -> float:
    """The largest difference between ``compact`` and the masked task on ``inputs``; raises
    :class:`CompactionMismatch` beyond :data:`COMPACT_TOLERANCE`, so that a wrong compacted model never serves."""
    with torch.no_grad():
        error = float((_output(compact(*inputs)) - _output(shared(compact.task, *inputs))).abs().max())
    if not error <= COMPACT_TOLERANCE:
        raise CompactionMismatch(f"compacted task {compact.task!r} differs from the masked model by {error:.3g} "
                                 f"(tolerance {COMPACT_TOLERANCE:g})")
    return error


class CompactNetwork:
    """A shared network's committed tasks for inference, each run by its compacted model (:func:`compact_task`,
    ``channels`` wherever it removes a channel, so the same task always computes the same way), built on first use,
    checked against the masked model on ``example(task)`` and cached. It runs as the shared network does:
    ``network(task, *inputs)``, or ``network.activate(task)`` then ``network.model`` (e.g. a codec's ``compress``).

    >>> net = SharedNetwork(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)))
    >>> net.begin_task("a", block_shape=(4, 64)); net.prune(0.5); net.commit()
    >>> fast = CompactNetwork(net, lambda task: (torch.rand(1, 3, 16, 16),))
    >>> x = torch.rand(1, 3, 8, 8)
    >>> torch.allclose(fast("a", x), net("a", x), atol=1e-5), fast.compact("a") is fast.compact("a")
    (True, True)
    """

    def __init__(self, shared: SharedNetwork, example: Callable[[str], tuple[torch.Tensor, ...]]) -> None:
        self.shared = shared
        self.example = example
        self._compacted: dict[str, CompactModel] = {}
        self._active: str | None = None

    @property
    def task_names(self) -> list[str]:
        return self.shared.task_names

    @property
    def device(self) -> torch.device:
        return self.shared.device

    def fingerprint(self, task: str) -> str:
        """The task's fingerprint: the shared network's (compaction computes the same task)."""
        return self.shared.fingerprint(task)

    def compact(self, task: str) -> CompactModel:
        """Task ``task`` compacted, built and checked on first use."""
        if task not in self._compacted:
            self.shared.eval()
            compact = compact_task(self.shared, task)
            check_compaction(compact, self.shared, tuple(x.to(self.device) for x in self.example(task)))
            self._compacted[task] = compact
        return self._compacted[task]

    def activate(self, task: str) -> None:
        self._active = self.compact(task).task

    @property
    def model(self) -> nn.Module:
        """The active task's compacted model (see :meth:`activate`); before any, the shared network's whole model."""
        return self.shared.model if self._active is None else self._compacted[self._active].model

    def task_index(self, task: str) -> int:
        """The task's position (an unknown task is refused by name)."""
        return self.shared.task_index(task)

    def __call__(self, task: str, *args: Any, **kwargs: Any) -> Any:
        return self.compact(task)(*args, **kwargs)
