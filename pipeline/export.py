"""ONNX, thinly: each task's compacted model (:func:`~pngrow.workers.png.compact_task`) exported as ONNX graphs with
a dynamic batch and image size, run in ONNX Runtime against PyTorch before it is handed over.

A SISR task is one graph (``model.onnx``: ``lr`` in, ``sr`` out). A NIC task is what runs before and after entropy
coding, four graphs (``analysis``: image to latent ``y``; ``hyper_analysis``: ``y`` to hyper-latent ``z``;
``hyper_synthesis``: the decoded ``z_hat`` to the latent's ``scales`` (and ``means``); ``synthesis``: the decoded
``y_hat`` to the image), plus ``entropy.json``: the tables CompressAI's range coder needs. Each task's folder has
``task.json`` (its manifest: family, task, fingerprint, graphs, opset, the differences measured);
:mod:`pngrow.pipeline.onnx_codec` runs it with ONNX Runtime alone.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .._validation import writable_folder
from ..workers.models import Codec, Family, Upscaler, load_model
from ..workers.png import CompactLayer, CompactModel, SharedNetwork, check_compaction, compact_task
from .onnx_codec import ENTROPY_FORMAT, FORMAT, session

__all__ = ["DEFAULT_OPSET", "LOWEST_OPSET", "TOLERANCE", "ExportMismatch", "ExportedTask", "check_graphs",
           "check_opset", "entropy_tables", "export_graphs", "export_model", "export_task", "for_onnx", "task_graphs"]

DEFAULT_OPSET = 18
LOWEST_OPSET = 18  # PyTorch's exporter writes no lower opset itself (it converts, or silently keeps 18)
# Largest difference allowed between a graph's output in ONNX Runtime and in PyTorch, relative to the output's
# largest magnitude when that is over 1 (a NIC latent): float32 rounding of another runtime's kernels.
TOLERANCE = 1e-4
_CHECK_SIZE = 64  # side of the random input a compacted task is checked on against the masked model
_BATCH = 2  # example batch for tracing: 2, so that the batch stays dynamic (a size-1 dimension is specialised)


class ExportMismatch(ValueError):
    """An exported graph whose output in ONNX Runtime differs from PyTorch's beyond :data:`TOLERANCE`."""


@dataclass(frozen=True)
class ExportedTask:
    """One exported task: its folder, graph files and the largest ORT-vs-PyTorch difference of each graph."""

    task: str
    folder: Path
    graphs: dict[str, str]
    max_difference: dict[str, float]


class _Graph(nn.Module):
    """One exported graph: ``body`` on its input (``prepare``d first), its output split in ``split`` along channels."""

    def __init__(self, body: nn.Module, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 split: int = 1) -> None:
        super().__init__()
        self.body = body
        self.prepare = prepare
        self.split = split

    def forward(self, x: torch.Tensor) -> Any:
        out = self.body(x if self.prepare is None else self.prepare(x))
        return out if self.split == 1 else out.chunk(self.split, 1)


class _GatheredOutputs(nn.Module):
    """A :class:`CompactLayer` with outputs it does not compute, assembled for ONNX: its computed channels and its
    bias for the others concatenated, then gathered into place (``Concat`` and ``Gather``). The layer's own
    ``index_copy_`` exports as ``ScatterND`` between two ``Transpose``: three passes over a full-width output,
    17% of a pruned x4 EDSR's time in ONNX Runtime. The values are the same, bit for bit."""

    def __init__(self, layer: CompactLayer) -> None:
        super().__init__()
        self.layer = layer
        computed = set(layer.rows.tolist())
        missing = torch.tensor([c for c in range(layer.out_channels) if c not in computed], dtype=torch.long)
        self.register_buffer("order", torch.argsort(torch.cat([layer.rows.cpu(), missing])))
        fill = layer.fill[missing] if layer.fill is not None else torch.zeros(len(missing))
        self.register_buffer("missing", fill.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer.computed(x)
        dim = self.layer.channel_dim(x)
        if not len(self.missing):
            return y.index_select(dim, self.order)
        shape, view = list(y.shape), [1] * y.dim()
        shape[dim] = view[dim] = len(self.missing)
        return torch.cat([y, self.missing.view(view).expand(shape)], dim).index_select(dim, self.order)


def for_onnx(compact: CompactModel) -> CompactModel:
    """A copy of ``compact`` that exports to faster ONNX graphs and computes the same values: each layer with outputs
    it does not compute is a :class:`_GatheredOutputs`."""
    compact = copy.deepcopy(compact)
    for name, module in list(compact.model.named_modules()):
        if isinstance(module, CompactLayer) and module.rows is not None:
            owner, _, attribute = name.rpartition(".")
            setattr(compact.model.get_submodule(owner) if owner else compact.model, attribute,
                    _GatheredOutputs(module))
    return compact


@dataclass(frozen=True)
class _GraphSpec:
    """One graph to export: its module, input and output names, file, and the input it is traced on (``channels``
    x ``side`` x ``side``, batch 2; every size but the channels stays dynamic)."""

    module: _Graph
    input: str
    outputs: list[str]
    file: str
    channels: int
    side: int


def task_graphs(family: Family, compact: CompactModel) -> dict[str, _GraphSpec]:
    """The graphs a task exports as (name to :class:`_GraphSpec`): SISR one, NIC four, each NIC graph traced on
    what it gets from a 128 x 128 image."""
    model = compact.model
    if isinstance(family, Upscaler):
        return {"upscale": _GraphSpec(_Graph(compact), "lr", ["sr"], "model.onnx", 3, 24)}
    if not isinstance(family, Codec):
        raise ValueError(f"family {family.name!r} has no ONNX export")
    means = family.arch["codec"] == "mean-scale-hyperprior"
    latent, hyper = family.arch["M"], family.arch["N"]
    return {
        "analysis": _GraphSpec(_Graph(model.g_a), "image", ["y"], "analysis.onnx", 3, 128),
        "hyper_analysis": _GraphSpec(_Graph(model.h_a, None if means else torch.abs), "y", ["z"],
                                     "hyper_analysis.onnx", latent, 8),
        "hyper_synthesis": _GraphSpec(_Graph(model.h_s, split=2 if means else 1), "z_hat",
                                      ["scales", "means"] if means else ["scales"], "hyper_synthesis.onnx", hyper, 2),
        "synthesis": _GraphSpec(_Graph(model.g_s), "y_hat", ["x_hat"], "synthesis.onnx", latent, 8),
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """PyTorch's exporter prints its steps and warns of what it converts; pngrow reports the result itself."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _export_graph(spec: _GraphSpec, path: Path, opset: int) -> None:
    dynamic = torch.export.Dim.DYNAMIC
    example = torch.rand(_BATCH, spec.channels, spec.side, spec.side, generator=torch.Generator().manual_seed(0))
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(spec.module.eval(), (example,), dynamo=True, opset_version=opset,
                                    dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},),
                                    input_names=[spec.input], output_names=spec.outputs, verbose=False)
        program.save(str(path), external_data=False)
    written = {o.domain: o.version for o in program.model_proto.opset_import}.get("", opset)
    if written != opset:
        raise ValueError(f"opset {opset} could not be written (PyTorch's exporter wrote opset {written})")


def export_graphs(family: Family, compact: CompactModel, folder: Path, opset: int) -> dict[str, str]:
    """Each graph of ``compact`` (see :func:`task_graphs`) written into ``folder``; returns name to file."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = task_graphs(family, for_onnx(compact))
    for spec in specs.values():
        _export_graph(spec, folder / spec.file, opset)
    return {name: spec.file for name, spec in specs.items()}


def entropy_tables(model: nn.Module) -> dict[str, Any]:
    """What CompressAI's range coder needs to code a task's latents (written as ``entropy.json``)."""

    def tables(entropy_model: nn.Module) -> dict[str, Any]:
        return {"cdf": entropy_model._quantized_cdf.tolist(), "cdf_length": entropy_model._cdf_length.tolist(),
                "offset": entropy_model._offset.tolist()}

    bottleneck, conditional = model.entropy_bottleneck, model.gaussian_conditional
    return {
        "format": ENTROPY_FORMAT,
        "precision": bottleneck.entropy_coder_precision,
        "hyper_latent": {**tables(bottleneck), "medians": bottleneck.quantiles[:, 0, 1].tolist()},
        "latent": {**tables(conditional), "scale_table": conditional.scale_table.tolist(),
                   "scale_bound": float(conditional.lower_bound_scale.bound)},
    }


def _photo(height: int, width: int) -> torch.Tensor:
    """A real photo (scikit-image's astronaut, from its centre) as a (1, 3, height, width) image in [0, 1]."""
    import skimage.data

    image = skimage.data.astronaut()[128 : 128 + height, 96 : 96 + width]
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255)


def _check_images(family: Family) -> dict[str, torch.Tensor]:
    """The images a task's graphs are checked on: random and real, of sizes other than the traced ones."""
    if isinstance(family, Upscaler):
        sizes = {"random": (40, 56), "photo": (96, 120)}
    else:
        sizes = {"random": (192, 128), "photo": (256, 320)}
    generator = torch.Generator().manual_seed(1)
    return {"random": torch.rand(1, 3, *sizes["random"], generator=generator), "photo": _photo(*sizes["photo"])}


def _graph_inputs(family: Family, compact: CompactModel, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each graph's input on ``image`` as PyTorch computes it (NIC: the latents the entropy coder would hand on)."""
    if isinstance(family, Upscaler):
        return {"upscale": image}
    model = compact.model
    y = model.g_a(image)
    z = model.h_a(y if family.arch["codec"] == "mean-scale-hyperprior" else torch.abs(y))
    medians = model.entropy_bottleneck.quantiles[:, 0, 1].view(1, -1, 1, 1)
    z_hat = torch.round(z - medians) + medians
    params = model.h_s(z_hat)
    means = params.chunk(2, 1)[1] if family.arch["codec"] == "mean-scale-hyperprior" else torch.zeros_like(y)
    return {"analysis": image, "hyper_analysis": y, "hyper_synthesis": z_hat,
            "synthesis": torch.round(y - means) + means}


@torch.no_grad()
def check_graphs(family: Family, compact: CompactModel, folder: Path, files: dict[str, str]) -> dict[str, float]:
    """The largest difference between each graph's outputs in ONNX Runtime and PyTorch's, over random and real
    images; :class:`ExportMismatch` (one line) beyond :data:`TOLERANCE`."""
    specs = task_graphs(family, compact)
    sessions = {name: session(folder / file) for name, file in files.items()}
    worst = {name: 0.0 for name in files}
    for image in _check_images(family).values():
        for name, x in _graph_inputs(family, compact, image).items():
            expected = specs[name].module(x)
            expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
            found = sessions[name].run(None, {specs[name].input: x.numpy()})
            for want, got in zip(expected, found):
                difference = float(np.abs(got - want.numpy()).max())
                if not difference <= TOLERANCE * max(1.0, float(want.abs().max())):
                    raise ExportMismatch(f"exported graph {name!r} of task {compact.task!r} differs from PyTorch by "
                                         f"{difference:.3g} in ONNX Runtime (tolerance {TOLERANCE:g})")
                worst[name] = max(worst[name], difference)
    return worst


def export_task(family: Family, shared: SharedNetwork, task: str, folder: Path, opset: int = DEFAULT_OPSET,
                model: str = "") -> ExportedTask:
    """Task ``task`` compacted (``channels`` wherever that removes a channel, as pngrow serves it, checked against
    the masked model), exported into ``folder`` and checked in ONNX Runtime (see :func:`check_graphs`)."""
    shared.eval()
    compact = compact_task(shared, task)
    check_compaction(compact, shared, family.latency_inputs(_CHECK_SIZE))
    files = export_graphs(family, compact, folder, opset)
    differences = check_graphs(family, compact, folder, files)
    manifest: dict[str, Any] = {
        "format": FORMAT, "family": family.name, "task": task, "fingerprint": shared.fingerprint(task),
        "model": model, "opset": opset, "graphs": files, "size_multiple": family.size_multiple,
        "max_difference": differences, "checked_on": "a random and a real image (scikit-image's astronaut)",
        "versions": {"torch": torch.__version__, "onnxruntime": _ort_version()},
    }
    if isinstance(family, Upscaler):
        manifest["scale"] = family.scale(task)
    else:
        manifest["entropy"] = "entropy.json"
        (folder / "entropy.json").write_text(json.dumps(entropy_tables(compact.model)) + "\n")
    (folder / "task.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return ExportedTask(task, folder, files, differences)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _highest_runtime_opset() -> int:
    """The highest ONNX opset this ONNX Runtime loads, probed with a one-node graph per opset."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", value[:1], value[1:])
    for opset in range(onnx.defs.onnx_opset_version(), LOWEST_OPSET - 1, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        try:
            onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return opset
        except Exception:  # noqa: BLE001 - ONNX Runtime refuses an opset it lacks with its own exception types
            continue
    return LOWEST_OPSET - 1


def check_opset(opset: int) -> int:
    """``opset`` when PyTorch writes it and ONNX Runtime runs it; otherwise a ``ValueError`` naming it.

    >>> check_opset(17)
    Traceback (most recent call last):
    ...
    ValueError: opset 17 is not one pngrow exports: PyTorch's exporter writes opsets from 18
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < LOWEST_OPSET:
        raise ValueError(f"opset {opset!r} is not one pngrow exports: PyTorch's exporter writes opsets from "
                         f"{LOWEST_OPSET}")
    highest = _highest_runtime_opset()
    if opset > highest:
        raise ValueError(f"opset {opset} is not supported by ONNX Runtime {_ort_version()} (it runs opsets up to "
                         f"{highest})")
    return opset


def export_model(model: str, out: str | Path, tasks: Sequence[str] | None = None, opset: int | None = None,
                 tracking_uri: str | None = None) -> list[ExportedTask]:
    """Export ``tasks`` (every task when None) of the shared model ``model`` (a folder or an MLflow URI, see
    :func:`~pngrow.pipeline.api.resolve_checkpoint`) into ``out/<task>/`` at ``opset`` (:data:`DEFAULT_OPSET` when
    None). Every input is checked before anything is written."""
    from .api import resolve_checkpoint

    opset = check_opset(DEFAULT_OPSET if opset is None else opset)
    with tempfile.TemporaryDirectory(prefix="pngrow-export-") as tmp:
        checkpoint, version = resolve_checkpoint(model, tmp, tracking_uri)
        family, shared = load_model(checkpoint)
    chosen = list(tasks) if tasks else shared.task_names
    for task in chosen:
        shared.task_index(task)
    folder = writable_folder(out, "output folder")
    return [export_task(family, shared, task, folder / task, opset, version) for task in chosen]
