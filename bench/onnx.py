"""Does the speed survive the export? Each task's compacted graph against the dense model's graph, both in ONNX
Runtime on this CPU, beside the same two models in PyTorch: all four taking turns on the same input, the median of
``--rounds`` (NIC: the encoder plus decoder transforms, analysis, hyper-analysis, hyper-synthesis and synthesis).

    python -m bench.onnx MODEL [--tasks x2,x3] [--size 96] [--rounds 10] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pngrow.errors import failure_line
from pngrow.pipeline.export import DEFAULT_OPSET, check_graphs, check_opset, export_graphs, task_graphs
from pngrow.pipeline.onnx_codec import session
from pngrow.workers.latency import median_latencies
from pngrow.workers.models import Family, load_model
from pngrow.workers.png import CompactModel, check_compaction, compact_task

from . import require_at_least

__all__ = ["OnnxSpeed", "main", "onnx_speed"]


@dataclass(frozen=True)
class OnnxSpeed:
    """One task's median milliseconds, compacted and dense, in ONNX Runtime and in PyTorch."""

    task: str
    ort_ms: float
    ort_dense_ms: float
    torch_ms: float
    torch_dense_ms: float
    max_difference: float  # the compacted graphs' largest difference from PyTorch in ONNX Runtime

    @property
    def ort_speedup(self) -> float:
        return self.ort_dense_ms / self.ort_ms

    @property
    def torch_speedup(self) -> float:
        return self.torch_dense_ms / self.torch_ms


def _chain(steps: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """The graphs run one after the other, each on the previous one's first output (rounded where the entropy
    coder would round: the hyper-latent before the hyper-synthesis, the latent before the synthesis)."""

    def run(x: Any) -> Any:
        y = steps[0](x)
        if len(steps) == 1:
            return y
        z = steps[1](y)
        steps[2](z.round())
        return steps[3](y.round())

    return run


def _ort_chain(family: Family, compact: CompactModel, folder: Path, opset: int,
               threads: int) -> tuple[Callable[[Any], Any], dict[str, float]]:
    """The task's graphs exported into ``folder`` and run in turn in ONNX Runtime, and their differences from PyTorch."""
    files = export_graphs(family, compact, folder, opset)
    specs = task_graphs(family, compact)
    sessions = {name: session(folder / file, threads) for name, file in files.items()}

    def step(name: str) -> Callable[[np.ndarray], np.ndarray]:
        return lambda x: sessions[name].run(None, {specs[name].input: x})[0]

    return _chain([step(name) for name in specs]), check_graphs(family, compact, folder, files)


def _torch_chain(family: Family, compact: CompactModel) -> Callable[[Any], Any]:
    modules = [spec.module for spec in task_graphs(family, compact).values()]
    return _chain([lambda x, m=m: (lambda out: out if isinstance(out, torch.Tensor) else out[0])(m(x)) for m in modules])


def onnx_speed(model: str, tasks: Sequence[str] | None, size: int | None, rounds: int, threads: int,
               opset: int = DEFAULT_OPSET) -> list[OnnxSpeed]:
    """Time every task of the model folder ``model`` (or ``tasks``) as described in this module's docstring."""
    family, shared = load_model(model)
    shared.eval()
    torch.set_num_threads(threads)
    chosen = list(tasks) if tasks else shared.task_names
    for task in chosen:
        shared.task_index(task)
    (image,) = family.latency_inputs(size)
    results = []
    with tempfile.TemporaryDirectory(prefix="pngrow-onnx-speed-") as tmp, torch.no_grad():
        for task in chosen:
            compact = compact_task(shared, task)
            check_compaction(compact, shared, family.latency_inputs(64))
            dense = compact_task(shared, task, strategies=("dense",))
            ort_compact, differences = _ort_chain(family, compact, Path(tmp) / task / "compact", opset, threads)
            ort_dense, _ = _ort_chain(family, dense, Path(tmp) / task / "dense", opset, threads)
            torch_compact, torch_dense = _torch_chain(family, compact), _torch_chain(family, dense)
            x = image.numpy()
            ms = median_latencies({"ort": lambda: ort_compact(x), "ort_dense": lambda: ort_dense(x),
                                   "torch": lambda: torch_compact(image), "torch_dense": lambda: torch_dense(image)},
                                  rounds, torch.device("cpu"))
            results.append(OnnxSpeed(task, ms["ort"], ms["ort_dense"], ms["torch"], ms["torch_dense"],
                                     max(differences.values())))
    return results


def format_speeds(speeds: list[OnnxSpeed]) -> str:
    """The Markdown table docs/benchmark.md shows."""
    lines = ["| task | ORT dense ms | ORT compacted ms | ORT speedup | PyTorch dense ms | PyTorch compacted ms | "
             "PyTorch speedup | ORT vs PyTorch max diff |", "|---|---|---|---|---|---|---|---|"]
    for s in speeds:
        lines.append(f"| {s.task} | {s.ort_dense_ms:.1f} | {s.ort_ms:.1f} | **{s.ort_speedup:.2f}x** | "
                     f"{s.torch_dense_ms:.1f} | {s.torch_ms:.1f} | {s.torch_speedup:.2f}x | {s.max_difference:.1e} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a pngrow model folder (pngrow run --out)")
    parser.add_argument("--tasks", help="comma-separated tasks (default: every task)")
    parser.add_argument("--size", type=int, help="side of the square input (default: the family's, SISR 96, NIC 256)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of both runtimes (default 2)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table of :func:`onnx_speed`; a bad value ends in one line."""
    parser = _parser()
    args = parser.parse_args(argv)
    require_at_least(parser, args, 1, "rounds", "threads", "size")
    try:
        check_opset(args.opset)
        speeds = onnx_speed(args.model, [t for t in (args.tasks or "").split(",") if t] or None, args.size,
                            args.rounds, args.threads, args.opset)
    except ValueError as error:
        parser.error(failure_line(error))
    print(format_speeds(speeds))
    if args.json is not None:
        args.json.write_text(json.dumps([{**asdict(s), "ort_speedup": s.ort_speedup,
                                          "torch_speedup": s.torch_speedup} for s in speeds], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
