"""The MLflow pyfunc flavour of a shared model (logged as code, so nothing is pickled).

``mlflow.pyfunc.load_model(uri).predict({"task": "x2", "image": png_bytes})`` restores one image; a DataFrame with
``task`` and ``image`` columns restores one image per row. ``image`` is PNG (or any PIL-readable) bytes or a uint8
H x W x 3 array. The output has one row per input: ``task``, ``image`` (PNG bytes) and the task's figures (the scale
for SISR; bytes and bpp of the real pngrow bitstream for NIC). Large images are processed in tiles, as
:class:`pngrow.pipeline.api.RestorationModel` does.
"""

from __future__ import annotations

import io
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel
from PIL import Image

__all__ = ["SharedModel"]


def _image_array(value: Any) -> np.ndarray:
    if isinstance(value, (bytes, bytearray)):
        with Image.open(io.BytesIO(value)) as img:
            return np.array(img.convert("RGB"))
    array = np.asarray(value)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be encoded bytes or a uint8 HxWx3 array, got {array.dtype} {array.shape}")
    return array


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class SharedModel(PythonModel):
    """Loads the checkpoint artifact with :func:`pngrow.workers.models.load_model` and restores images by task."""

    def load_context(self, context: Any) -> None:
        from pngrow.pipeline.api import RestorationModel
        from pngrow.workers.models import load_model

        family, shared = load_model(context.artifacts["checkpoint"])
        self.model = RestorationModel(family, shared.eval(), version="", progress=False)

    # No type hints here: MLflow would read them as an input schema.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        rows = model_input.to_dict("records") if isinstance(model_input, pd.DataFrame) else [model_input]
        out = []
        model = self.model
        for row in rows:
            task = row.get("task")
            if task not in model.tasks:
                raise ValueError(f"task {task!r} is not one of this model's tasks: {', '.join(model.tasks)}")
            image = _image_array(row["image"])
            if hasattr(model.family, "compress"):
                data = model.compress(image, task)
                restored = model.decompress(data)
                figures = {"bytes": len(data), "bpp": 8 * len(data) / (image.shape[0] * image.shape[1])}
            else:
                restored = model.upscale(image, task)
                figures = {"scale": model.family.scale(task)}
            out.append({"task": task, "image": _png(restored), **figures})
        return pd.DataFrame(out)


mlflow.models.set_model(SharedModel())
