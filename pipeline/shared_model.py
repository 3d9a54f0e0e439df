"""The MLflow pyfunc flavour of a shared model (logged as code, so nothing is pickled), served as it is by
``mlflow models serve``.

Input, one row per request (a dict for one, a DataFrame or JSON columns for many)::

    task       string  the task (x2, q6, ...); optional for a decompress row, whose task is in the bitstream
    image      string  base64 of an encoded image (PNG, JPEG, anything PIL reads); from Python also the encoded
                       bytes or a uint8 H x W x 3 array
    bitstream  string  base64 of a pngrow bitstream (from Python also its bytes): a decompress request, in place
                       of ``image``

Output, one row per input row: ``task``, ``image`` (base64 of a PNG) and the task's figures: ``scale`` for SISR;
``bytes``, ``bpp`` and ``bitstream`` (base64 of the pngrow bitstream; empty for a decompress row) for NIC, where
``image`` is the decoded bitstream. Over HTTP (``mlflow models serve``) every form MLflow's scoring server reads
works: ``{"dataframe_records": [{"task": "x2", "image": "<base64>"}]}``, ``{"dataframe_split": ...}`` and
``{"inputs": {"task": [...], "image": [...]}}``. A bad row (an unknown task, something that is not an image or
not base64, an image over :data:`MAX_IMAGE_PIXELS`, a request over :data:`MAX_REQUEST_PIXELS`) fails the request
with one line naming it (HTTP 400; a ``ValueError`` in Python). Large images are processed in tiles, as
:class:`pngrow.pipeline.api.RestorationModel` does.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from PIL import Image, UnidentifiedImageError

__all__ = ["MAX_IMAGE_PIXELS", "MAX_REQUEST_PIXELS", "SERVING_REQUIREMENTS", "RequestError", "SharedModel",
           "decode_base64", "package_code", "requirements", "signature"]

#: The largest image (input, or a bitstream's image), in pixels; ``PNGROW_MAX_IMAGE_PIXELS`` overrides it.
MAX_IMAGE_PIXELS = int(os.environ.get("PNGROW_MAX_IMAGE_PIXELS", 16_000_000))
#: The most pixels of all images of one request together; ``PNGROW_MAX_REQUEST_PIXELS`` overrides it.
MAX_REQUEST_PIXELS = int(os.environ.get("PNGROW_MAX_REQUEST_PIXELS", 64_000_000))

#: What the model's environment installs from PyPI (at the versions installed here); pngrow itself ships with the
#: model as code (:func:`package_code`), so no package index needs to have it.
SERVING_REQUIREMENTS = ("torch", "torchvision", "compressai", "safetensors", "pillow", "numpy", "pandas", "mlflow",
                        "scikit-image", "pytorch-msssim", "pyyaml", "tqdm")
_SUBPACKAGES = ("workers", "pipeline", "search_spaces")

_DATA_URL = re.compile(r"data:[\w/+.-]*;base64,", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


class RequestError(MlflowException, ValueError):
    """A request the model cannot answer: a ``ValueError`` in Python, HTTP 400 with this message when served."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def signature(family: str) -> mlflow.models.ModelSignature:
    """The pyfunc signature of a model of the family named ``family``: the columns above, the bitstream's where the
    family is a :class:`~pngrow.workers.models.Codec`, the scale's where it is an
    :class:`~pngrow.workers.models.Upscaler`."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    from pngrow.workers.models import Codec, Upscaler, get_family

    built = get_family(family)
    inputs = [ColSpec("string", "task", required=False), ColSpec("string", "image", required=False)]
    outputs = [ColSpec("string", "task"), ColSpec("string", "image")]
    if isinstance(built, Codec):
        inputs.append(ColSpec("string", "bitstream", required=False))
        outputs += [ColSpec("long", "bytes"), ColSpec("double", "bpp"), ColSpec("string", "bitstream", required=False)]
    if isinstance(built, Upscaler):
        outputs.append(ColSpec("long", "scale"))
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def requirements() -> list[str]:
    """:data:`SERVING_REQUIREMENTS` pinned at the installed versions, without local labels (``2.14.1+cpu``)."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in SERVING_REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pinned


def package_code(dest: str | os.PathLike) -> str:
    """Copy the importable ``pngrow`` package (every subpackage, wherever an editable install keeps it) into
    ``dest/pngrow``, for ``code_paths``; returns that folder."""
    import importlib
    import shutil
    from pathlib import Path

    import pngrow

    root = Path(dest) / "pngrow"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(Path(pngrow.__file__).parent, root, ignore=ignore)
    for name in _SUBPACKAGES:  # the editable install maps these to folders outside pngrow/
        module = importlib.import_module(f"pngrow.{name}")
        if not (root / name).exists():
            shutil.copytree(Path(module.__file__).parent, root / name, ignore=ignore)
    return str(root)


def decode_base64(text: str, what: str) -> bytes:
    """The bytes of base64 ``text`` (whitespace and a ``data:...;base64,`` prefix allowed), or a RequestError."""
    body = _SPACE.sub("", _DATA_URL.sub("", text, count=1))
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is not base64 ({len(text)} characters starting {text[:20]!r})") from None


def _check_pixels(height: int, width: int, what: str) -> None:
    if height * width > MAX_IMAGE_PIXELS:
        raise RequestError(f"{what} has {width}x{height} = {height * width:,} pixels, over the limit of "
                           f"{MAX_IMAGE_PIXELS:,} (PNGROW_MAX_IMAGE_PIXELS)")


def _image_array(value: Any, what: str = "image") -> np.ndarray:
    """An H x W x 3 uint8 array from base64 text, encoded bytes, or an array (or nested lists) of 0..255 values."""
    if isinstance(value, str):
        value = decode_base64(value, what)
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(value))) as img:
                _check_pixels(img.height, img.width, what)
                return np.array(img.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            if isinstance(exc, RequestError):
                raise
            detail = "not an image PIL can read" if isinstance(exc, UnidentifiedImageError) else str(exc)
            raise RequestError(f"{what} ({len(value):,} bytes) is not a readable image: {detail}") from None
    array = np.asarray(value)
    if array.ndim != 3 or array.shape[2] != 3 or not (array.dtype == np.uint8 or (
            array.dtype.kind in "iu" and array.size and 0 <= array.min() and array.max() <= 255)):
        raise RequestError(f"{what} must be base64 or bytes of an encoded image, or a uint8 H x W x 3 array; "
                           f"got {array.dtype} {array.shape}")
    _check_pixels(array.shape[0], array.shape[1], what)
    return array.astype(np.uint8, copy=False)


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _given(value: Any) -> bool:
    if value is None or (isinstance(value, str) and not value):
        return False
    return not (isinstance(value, float) and math.isnan(value))


def _rows(model_input: Any) -> list[dict]:
    if isinstance(model_input, dict):
        return [model_input]
    if not isinstance(model_input, pd.DataFrame):
        raise RequestError(f"expected a dict or DataFrame with columns task, image, bitstream, got "
                           f"{type(model_input).__name__}")
    rows = model_input.to_dict("records")
    # With a column signature MLflow turns predict({"task": t, "image": HxWx3 array}) into a DataFrame of one row
    # per pixel row (W x 3 lists); put that one image back together.
    images = [row.get("image") for row in rows]
    if rows and all(isinstance(i, list) and i and isinstance(i[0], list) and not isinstance(i[0][0], list)
                    for i in images):
        return [{**rows[0], "image": images}]
    return rows


class SharedModel(PythonModel):
    """Loads the checkpoint artifact with :func:`pngrow.workers.models.load_model` and restores images by task."""

    def load_context(self, context: Any) -> None:
        from pngrow.pipeline.api import RestorationModel
        from pngrow.workers.models import load_model

        family, shared = load_model(context.artifacts["checkpoint"])
        self.model = RestorationModel(family, shared.eval(), version="", progress=False)

    # No type hints here: MLflow would read them as an input schema.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        rows = _rows(model_input)
        # Decode and check every row before restoring any, so a bad row fails the request at once.
        requests, pixels = [], 0
        for index, row in enumerate(rows):
            request = self._request(row, f"row {index}: " if len(rows) > 1 else "")
            pixels += request[3]
            if pixels > MAX_REQUEST_PIXELS:
                raise RequestError(f"rows 0-{index} of the request have {pixels:,} pixels together, over the "
                                   f"request limit of {MAX_REQUEST_PIXELS:,} (PNGROW_MAX_REQUEST_PIXELS)")
            requests.append(request)
        return pd.DataFrame([self._answer(*request) for request in requests])

    def _request(self, row: dict, where: str) -> tuple[str, np.ndarray | None, bytes | None, int]:
        """(task, image or None, bitstream or None, pixels) of one row (``where``: "row N: " or ""), checked."""
        from pngrow.workers import restoration
        from pngrow.workers.models import Codec

        model = self.model
        task = row.get("task")
        task = task if _given(task) else None
        if _given(row.get("bitstream")):
            if not isinstance(model.family, Codec):
                raise RequestError(f"{where}this {model.family.name} model decompresses no bitstreams")
            data = row["bitstream"]
            data = decode_base64(data, f"{where}bitstream") if isinstance(data, str) else bytes(data)
            try:
                header = restoration.read_header(data)
            except ValueError as exc:
                raise RequestError(f"{where}{exc}") from None
            if task is not None and task != header["task"]:
                raise RequestError(f"{where}task {task!r} differs from the bitstream's task {header['task']!r}")
            _check_pixels(header["height"], header["width"], f"{where}the bitstream's image")
            return header["task"], None, data, header["height"] * header["width"]
        if task not in model.tasks:
            raise RequestError(f"{where}task {task!r} is not one of this model's tasks: {', '.join(model.tasks)}")
        if not _given(row.get("image")) and not isinstance(row.get("image"), (list, np.ndarray)):
            raise RequestError(f"{where}no image" + (" or bitstream" if isinstance(model.family, Codec) else "")
                               + " given")
        image = _image_array(row["image"], f"{where}image")
        return task, image, None, image.shape[0] * image.shape[1]

    def _answer(self, task: str, image: np.ndarray | None, data: bytes | None, pixels: int) -> dict:
        from pngrow.workers.models import Codec, Upscaler

        model = self.model
        try:
            if image is None:
                restored = model.decompress(data)
                return {"task": task, "image": _png(restored), "bytes": len(data), "bpp": 8 * len(data) / pixels,
                        "bitstream": None}
            if isinstance(model.family, Codec):
                data = model.compress(image, task)
                return {"task": task, "image": _png(model.decompress(data)), "bytes": len(data),
                        "bpp": 8 * len(data) / pixels, "bitstream": base64.b64encode(data).decode("ascii")}
            figures = {"scale": model.family.scale(task)} if isinstance(model.family, Upscaler) else {}
            return {"task": task, "image": _png(model.upscale(image, task)), **figures}
        except RequestError:
            raise
        except ValueError as exc:  # a foreign or corrupted bitstream, an empty image: pngrow says which, in a line
            raise RequestError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


mlflow.models.set_model(SharedModel())
