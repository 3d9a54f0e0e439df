"""Run an exported pngrow task (``pngrow export``) with ONNX Runtime alone: no PyTorch, no pngrow model.

It needs ``onnxruntime``, ``numpy`` and CompressAI's range coder (``compressai.ans``, loaded without importing
CompressAI's PyTorch code); copy this file and ``workers/bitstream.py`` to deploy it elsewhere.

* :class:`OnnxUpscaler`: a SISR task's graph, an H x W x 3 uint8 image in, the upscaled one out.
* :class:`OnnxCodec`: a NIC task's four graphs and its entropy tables (``entropy.json``): :meth:`OnnxCodec.encode`
  writes the pngrow bitstream that ``pngrow decompress`` reads, :meth:`OnnxCodec.decode` reads what ``pngrow
  compress`` writes (tiles, header and the task's fingerprint alike). Each runtime derives the latent's
  entropy-coding indexes from scales it computes itself; the encoder pins those near a scale-table boundary, where
  the two runtimes' float rounding could disagree (CompressAI issue 309), and a decoder that still derives other
  indexes is refused in one line (see :mod:`pngrow.workers.bitstream`).

>>> from pngrow.pipeline.onnx_codec import load_task          # doctest: +SKIP
>>> codec = load_task("onnx/q4")                             # doctest: +SKIP
>>> image = codec.decode(codec.encode(photo))                # doctest: +SKIP
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..workers.bitstream import CodedTile, LatentIndexes, decoding_indexes, encoded_tile, pack, resolve_tile, tiles, \
    unpack

__all__ = ["FORMAT", "ENTROPY_FORMAT", "OnnxCodec", "OnnxUpscaler", "load_task", "session"]

FORMAT = "pngrow-onnx/1"  # task.json's "format"
ENTROPY_FORMAT = "pngrow-entropy/1"  # entropy.json's "format"
_STRIDE = 64  # the hyperprior codecs' total downsampling: tiles are padded to a multiple of it


def _range_coder() -> Any:
    """CompressAI's rANS coder, loaded from its extension module alone (``import compressai.ans`` would import
    CompressAI's models and PyTorch first)."""
    spec = importlib.util.find_spec("compressai")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("CompressAI is not installed: its range coder (compressai.ans) codes NIC bitstreams")
    found = glob.glob(os.path.join(spec.submodule_search_locations[0], "ans*.so")) + glob.glob(
        os.path.join(spec.submodule_search_locations[0], "ans*.pyd"))
    if not found:
        raise ImportError("CompressAI is installed without its range coder (compressai.ans)")
    ans_spec = importlib.util.spec_from_file_location("compressai.ans", found[0])
    module = importlib.util.module_from_spec(ans_spec)
    ans_spec.loader.exec_module(module)
    return module


def session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of one graph, every graph optimisation on; ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "task.json"
    if not path.is_file():
        raise ValueError(f"{str(folder)!r} is not an exported pngrow task (no task.json)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
    return manifest


def _to_float(image: Any) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise ValueError(f"expected a uint8 H x W x 3 image, got {array.dtype} {array.shape}")
    return array.transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """A (1, 3, H, W) float image as H x W x 3 uint8, rounded as pngrow rounds (to 8-bit levels, then to bytes)."""
    levels = np.round(np.clip(x[0], 0, 1) * np.float32(255)) / np.float32(255)
    return np.round(levels * np.float32(255)).astype(np.uint8).transpose(1, 2, 0)


class OnnxUpscaler:
    """A SISR task exported by ``pngrow export``: ``upscale(image)`` zooms an H x W x 3 uint8 image by its scale."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = _read_manifest(self.folder)
        self.task, self.scale = self.manifest["task"], self.manifest["scale"]
        self.graph = session(self.folder / self.manifest["graphs"]["upscale"], threads)

    def upscale(self, image: Any) -> np.ndarray:
        """The image upscaled by the task's scale (H*s x W*s x 3 uint8)."""
        return _to_uint8(self.graph.run(None, {"lr": _to_float(image)})[0])


class _Tables:
    """One entropy model's tables as CompressAI's coder takes them (lists), from ``entropy.json``."""

    def __init__(self, tables: dict[str, Any]) -> None:
        self.cdf = [list(map(int, row)) for row in tables["cdf"]]
        self.cdf_length = [int(n) for n in tables["cdf_length"]]
        self.offset = [int(n) for n in tables["offset"]]

    def encode(self, coder: Any, symbols: np.ndarray, indexes: np.ndarray) -> bytes:
        return coder.RansEncoder().encode_with_indexes(symbols.ravel().tolist(), indexes.ravel().tolist(), self.cdf,
                                                       self.cdf_length, self.offset)

    def decode(self, coder: Any, string: bytes, indexes: np.ndarray) -> np.ndarray:
        values = coder.RansDecoder().decode_with_indexes(string, indexes.ravel().tolist(), self.cdf, self.cdf_length,
                                                         self.offset)
        return np.asarray(values, dtype=np.int32).reshape(indexes.shape)


class OnnxCodec:
    """A NIC task exported by ``pngrow export``: its analysis, hyper-analysis, hyper-synthesis and synthesis graphs
    around CompressAI's entropy coding (``entropy.json``), writing and reading the pngrow bitstream."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = _read_manifest(self.folder)
        self.task = self.manifest["task"]
        self.graphs = {name: session(self.folder / file, threads) for name, file in self.manifest["graphs"].items()}
        entropy = json.loads((self.folder / self.manifest["entropy"]).read_text())
        if entropy.get("format") != ENTROPY_FORMAT:
            raise ValueError(f"{self.manifest['entropy']!r} is not a {ENTROPY_FORMAT} file")
        self.hyper = _Tables(entropy["hyper_latent"])
        self.medians = np.asarray(entropy["hyper_latent"]["medians"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.latent = _Tables(entropy["latent"])
        self.scale_table = np.asarray(entropy["latent"]["scale_table"], dtype=np.float32)
        self.scale_bound = np.float32(entropy["latent"]["scale_bound"])
        self.coder = _range_coder()

    def _run(self, graph: str, value: np.ndarray) -> list[np.ndarray]:
        session_ = self.graphs[graph]
        return session_.run(None, {session_.get_inputs()[0].name: value})

    def _hyper_synthesis(self, z_hat: np.ndarray) -> tuple[LatentIndexes, np.ndarray | None]:
        """The latent's scales and their CDF indexes as CompressAI's ``GaussianConditional.build_indexes`` derives
        them (how many of the table's scales but the last are below the scale, bounded below by ``scale_bound``),
        and its means (None for a scale hyperprior)."""
        outputs = self._run("hyper_synthesis", z_hat)
        boundaries = self.scale_table[:-1]
        indexes = np.searchsorted(boundaries, np.maximum(outputs[0], self.scale_bound), side="left").astype(np.int32)
        return LatentIndexes(outputs[0], boundaries, indexes), outputs[1] if len(outputs) > 1 else None

    def _channel_indexes(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(np.arange(shape[1], dtype=np.int32).reshape(1, -1, 1, 1), shape)

    def encode_tile(self, x: np.ndarray) -> CodedTile:
        """One (1, 3, h, w) float tile in [0, 1], padded to a multiple of 64 as pngrow pads (edge pixels repeated)."""
        h, w = x.shape[-2:]
        padded = np.pad(x, ((0, 0), (0, 0), (0, -h % _STRIDE), (0, -w % _STRIDE)), mode="edge")
        y = self._run("analysis", padded)[0]
        z = self._run("hyper_analysis", y)[0]
        z_symbols = np.round(z - self.medians).astype(np.int32)
        z_string = self.hyper.encode(self.coder, z_symbols, self._channel_indexes(z.shape))
        z_hat = z_symbols.astype(np.float32) + self.medians
        latent, means = self._hyper_synthesis(z_hat)
        y_symbols = np.round(y if means is None else y - means).astype(np.int32)
        y_string = self.latent.encode(self.coder, y_symbols, latent.indexes)
        return encoded_tile([y_string, z_string], (z.shape[2], z.shape[3]), latent)

    def hyper_decode(self, tile: CodedTile) -> tuple[LatentIndexes, np.ndarray | None]:
        """What this runtime derives from a coded tile's hyper-latent: the latent's scales, the scale table's
        boundaries and the indexes it derives (before the encoder's pinned ones), and the means (or None)."""
        zh, zw = tile.shape
        channels = len(self.hyper.cdf_length)
        z_symbols = self.hyper.decode(self.coder, tile.strings[1], self._channel_indexes((1, channels, zh, zw)))
        return self._hyper_synthesis(z_symbols.astype(np.float32) + self.medians)

    def decode_tile(self, tile: CodedTile, number: int = 0) -> np.ndarray:
        """The (1, 3, h', w') float image of one coded tile (padded size), its latent decoded with this runtime's
        indexes and the encoder's pinned ones (refused if they still differ from the encoder's)."""
        latent, means = self.hyper_decode(tile)
        indexes = decoding_indexes(tile, latent, number)
        y_hat = self.latent.decode(self.coder, tile.strings[0], indexes).astype(np.float32)
        return self._run("synthesis", y_hat if means is None else y_hat + means)[0]

    def encode(self, image: Any, tile: int | None = None, model: str | None = None) -> bytes:
        """The pngrow bitstream of an H x W x 3 uint8 image at this task's rate (``tile``: as ``pngrow compress
        --tile``, a multiple of 64; ``model``: the label in the header, the export's by default)."""
        x = _to_float(image)
        h, w = x.shape[-2:]
        tile = resolve_tile(h, w, tile)
        if tile is not None and tile % _STRIDE:
            raise ValueError(f"NIC tile {tile!r} is not a multiple of 64, the codec's stride")
        header = {"family": "nic", "task": self.task, "fingerprint": self.manifest["fingerprint"],
                  "model": self.manifest["model"] if model is None else model, "height": h, "width": w, "tile": tile}
        coded = [self.encode_tile(x[..., t : t + th, l : l + tw]) for t, l, th, tw in tiles(h, w, tile)]
        return pack(header, coded)

    def decode(self, data: bytes) -> np.ndarray:
        """The H x W x 3 uint8 image of a pngrow bitstream written at this task (by pngrow or :meth:`encode`)."""
        header, coded = unpack(data)
        if header["task"] != self.task or header["fingerprint"] != self.manifest["fingerprint"]:
            raise ValueError(f"the bitstream was written by task {header['task']!r} of model "
                             f"{header['model'] or 'unnamed'}, not by this export's task {self.task!r}")
        out = np.empty((header["height"], header["width"], 3), dtype=np.uint8)
        for number, (tile, (t, l, th, tw)) in enumerate(zip(coded, tiles(header["height"], header["width"],
                                                                          header["tile"]))):
            out[t : t + th, l : l + tw] = _to_uint8(self.decode_tile(tile, number)[..., :th, :tw])
        return out


def load_task(folder: str | Path, threads: int | None = None) -> OnnxCodec | OnnxUpscaler:
    """The exported task in ``folder`` (``task.json`` says its family): an :class:`OnnxCodec` or an
    :class:`OnnxUpscaler`."""
    family = _read_manifest(Path(folder))["family"]
    return OnnxCodec(folder, threads) if family == "nic" else OnnxUpscaler(folder, threads)
