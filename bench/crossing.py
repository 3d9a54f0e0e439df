"""Do NIC bitstreams cross between ONNX Runtime and pngrow? Every image of a folder at every rate of a model, coded
by its export in ONNX Runtime (``pngrow export``, :class:`~pngrow.pipeline.onnx_codec.OnnxCodec`) and decoded by
pngrow, and the reverse: how many crossings decode, how many are refused (the index checksum), how many misdecode
(more than one grey level from the writer's own decode), how many bitstreams the two write byte for byte alike,
what the pinned indexes cost (the bytes a bitstream has over the same bitstream without them, and the bpp they add),
and how far apart the two runtimes' latent scales are, against the pinning margin (a fraction of the tile's largest
scale, :data:`~pngrow.workers.bitstream.BOUNDARY_MARGIN`).

    python -m bench.crossing MODEL ONNX_DIR [--tasks q7,q5] [--images FOLDER] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from pngrow import load_shared_model
from pngrow.errors import failure_line
from pngrow.pipeline.api import RestorationModel
from pngrow.pipeline.onnx_codec import OnnxCodec, load_task
from pngrow.workers.bitstream import BOUNDARY_MARGIN, CodedTile, IndexMismatch, pack, unpack

from . import require_at_least

__all__ = ["Crossing", "crossings", "format_crossings", "main"]

KODAK = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "kodak"


@dataclass(frozen=True)
class Crossing:
    """One rate over a folder of images, both ways: counts, per image (medians and largest over both writers'
    bitstreams) the pinned latents, the bytes they cost, the bpp that adds and the bitstream's bpp, and the largest
    difference between the two runtimes' scales of a tile, as a fraction of the tile's largest scale."""

    task: str
    images: int
    crossings: int
    refused: int
    misdecoded: int
    identical: int
    pinned_median: float
    pinned_max: int
    pinned_bytes_median: float
    pinned_bytes_max: int
    pinned_bpp_median: float
    bpp_median: float
    disagreement: float
    seconds: float


def _pinned_cost(data: bytes) -> tuple[int, int]:
    """A bitstream's pinned latents and the bytes they cost (its length less that of the same bitstream without
    them: the lists and the header's ``boundary_margin``)."""
    header, coded = unpack(data)
    unpinned = pack(header, [CodedTile(t.strings, t.shape, t.checksum) for t in coded])
    return sum(len(t.pinned or ()) for t in coded), len(data) - len(unpinned)


def _disagreement(codec: OnnxCodec, model: RestorationModel, data: bytes) -> float:
    """The largest difference between ONNX Runtime's and pngrow's scales of a bitstream's tiles, as a fraction of
    each tile's largest scale."""
    worst = 0.0
    for tile in unpack(data)[1]:
        ours = codec.hyper_decode(tile)[0].scales
        coded = {"strings": [[s] for s in tile.strings], "shape": tile.shape}
        theirs = model.family.coding_indexes(model.network, codec.task, coded).scales
        worst = max(worst, float(np.abs(ours - theirs).max() / max(np.abs(ours).max(), np.finfo(np.float32).tiny)))
    return worst


def _cross_image(codec: OnnxCodec, model: RestorationModel, image: np.ndarray) -> tuple[list[str], list[bytes]]:
    """Each way's outcome for one image ("decoded", "refused", "misdecoded") and the two bitstreams (ONNX Runtime's,
    pngrow's). An image both write alike is decoded once by each."""
    written = {"onnx": codec.encode(image), "pngrow": model.compress(image, codec.task)}
    decoders: dict[str, Callable[[bytes], np.ndarray]] = {"onnx": codec.decode, "pngrow": model.decompress}
    decoded: dict[tuple[str, bytes], np.ndarray | None] = {}

    def decode(decoder: str, writer: str) -> np.ndarray | None:
        key = (decoder, written[writer])
        if key not in decoded:
            try:
                decoded[key] = decoders[decoder](written[writer]).astype(int)
            except IndexMismatch:
                decoded[key] = None
        return decoded[key]

    outcomes = []
    for writer, reader in (("onnx", "pngrow"), ("pngrow", "onnx")):
        own, other = decode(writer, writer), decode(reader, writer)
        if own is None or other is None:
            outcomes.append("refused")
        else:
            outcomes.append("misdecoded" if np.abs(own - other).max() > 1 else "decoded")
    return outcomes, list(written.values())


def crossings(model: str, onnx_dir: str | Path, tasks: Sequence[str] | None, images: str | Path,
              threads: int) -> list[Crossing]:
    """Cross every PNG of ``images`` at each of ``tasks`` (every task when None) of the model folder ``model``,
    exported into ``onnx_dir/<task>/``, as this module's docstring says."""
    import torch

    paths = sorted(Path(images).glob("*.png"))
    if not paths:
        raise ValueError(f"{str(images)!r} holds no PNG image")
    torch.set_num_threads(threads)
    restoration = load_shared_model(str(model), progress=False)
    results = []
    for task in tasks or restoration.tasks:
        start, codec = time.perf_counter(), load_task(Path(onnx_dir) / task, threads)
        outcomes, pinned, costs, added, bpps, identical, disagreement = [], [], [], [], [], 0, 0.0
        for path in paths:
            image = np.array(Image.open(path).convert("RGB"))
            ways, written = _cross_image(codec, restoration, image)
            outcomes += ways
            identical += written[0] == written[1]
            for data in written:
                count, cost = _pinned_cost(data)
                pixels = image.shape[0] * image.shape[1]
                pinned.append(count)
                costs.append(cost)
                added.append(8 * cost / pixels)
                bpps.append(8 * len(data) / pixels)
                disagreement = max(disagreement, _disagreement(codec, restoration, data))
        results.append(Crossing(task, len(paths), len(outcomes), outcomes.count("refused"),
                                outcomes.count("misdecoded"), identical, statistics.median(pinned), max(pinned),
                                statistics.median(costs), max(costs), statistics.median(added),
                                statistics.median(bpps), disagreement, time.perf_counter() - start))
    return results


def format_crossings(results: list[Crossing]) -> str:
    """The Markdown table docs/benchmark.md shows."""
    lines = ["| rate | images | crossings | refused | misdecoded | identical bitstreams | pinned latents per image "
             "(median / max) | pinned bytes per image (median / max) | bpp they add | bitstream bpp | largest scale "
             "difference (of the tile's largest scale) | margin over it | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.task} | {r.images} | {r.crossings} | {r.refused} | **{r.misdecoded}** | "
                     f"{r.identical}/{r.images} | {r.pinned_median:g} / {r.pinned_max} | "
                     f"{r.pinned_bytes_median:g} / {r.pinned_bytes_max} | {r.pinned_bpp_median:.4f} | "
                     f"{r.bpp_median:.3f} | {r.disagreement:.2g} | {_headroom(r.disagreement)} | {r.seconds:.0f} |")
    return "\n".join(lines)


def _headroom(disagreement: float) -> str:
    """How many times the largest scale difference the pinning margin is.

    >>> _headroom(2e-7), _headroom(0.0)
    ('50x', 'inf')
    """
    return f"{BOUNDARY_MARGIN / disagreement:.0f}x" if disagreement else "inf"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.crossing", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a pngrow NIC model folder (pngrow run --out)")
    parser.add_argument("onnx_dir", help="its export (pngrow export MODEL --out ONNX_DIR)")
    parser.add_argument("--tasks", help="comma-separated rates (default: every rate)")
    parser.add_argument("--images", type=Path, default=KODAK, help="a folder of PNG images (default: ../shared's "
                                                                   "Kodak)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of both runtimes (default 2)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table of :func:`crossings`; a bad value ends in one line."""
    parser = _parser()
    args = parser.parse_args(argv)
    require_at_least(parser, args, 1, "threads")
    try:
        results = crossings(args.model, args.onnx_dir, [t for t in (args.tasks or "").split(",") if t] or None,
                            args.images, args.threads)
    except ValueError as error:
        parser.error(failure_line(error))
    print(format_crossings(results))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
