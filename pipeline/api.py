"""The Python API: load a shared model from a folder or the MLflow Model Registry, restore images with it.

>>> from pngrow import load_shared_model                     # doctest: +SKIP
>>> model = load_shared_model("models:/sisr-shared@champion")  # doctest: +SKIP
>>> big = model.upscale(image, scale=3)                       # HxWx3 uint8 in, 3H x 3W x 3 out  # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..workers import restoration
from ..workers.models import Codec, Family, Upscaler, load_model
from ..workers.png import CheckpointError, CompactNetwork, SharedNetwork, read_description
from .uris import is_mlflow_uri, parse_model_uri

__all__ = ["RestorationModel", "check_device", "load_shared_model", "resolve_checkpoint"]


def check_device(device: str) -> torch.device:
    """``device`` as a torch device, or a ``ValueError`` naming it when it is not one or this machine lacks it.

    >>> check_device("cpu")
    device(type='cpu')
    >>> check_device("gpu")
    Traceback (most recent call last):
    ...
    ValueError: device 'gpu' is not a torch device (e.g. cpu, cuda, cuda:1, mps)
    """
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r} is not available: this machine has no CUDA device")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {device!r} is not available: this machine has {count} CUDA device(s)")
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError) as exc:  # torch says "not compiled with ..." by AssertionError
        raise ValueError(f"device {device!r} is not available on this machine: {str(exc).splitlines()[0]}") from None
    return parsed


def _tensor(image: Any) -> torch.Tensor:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a uint8 H x W x 3 image, got {array.dtype} {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def _array(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).contiguous().numpy()


# Side of the random input each task's compacted model is checked on against the masked model when first used.
_CHECK_SIZE = 64


@dataclass
class RestorationModel:
    """A shared model and where it came from (``version``: ``models:/NAME/N``, a run or a folder).

    Images are restored by each task's compacted model (:class:`~pngrow.workers.png.CompactNetwork`: only the
    channels the task's blocks use, built on a task's first use, checked against the masked model, then cached);
    ``compacted=False`` runs the masked shared network instead.
    """

    family: Family
    shared: SharedNetwork
    version: str
    progress: bool = True  # progress bars over tiles, shown only on a terminal
    compacted: bool = True
    _network: CompactNetwork | None = field(default=None, init=False, repr=False)

    @property
    def network(self) -> CompactNetwork | SharedNetwork:
        """What restores images: the compacted tasks, or the masked shared network."""
        if not self.compacted:
            return self.shared
        if self._network is None:
            self._network = CompactNetwork(self.shared, lambda task: self.family.latency_inputs(_CHECK_SIZE))
        return self._network

    @property
    def tasks(self) -> list[str]:
        """The model's tasks, in the order they were grown."""
        return self.shared.task_names

    def _bar(self, total: int, what: str) -> Any:
        from .._progress import progress_bar

        return progress_bar(total, what, enabled=self.progress and total > 1)

    def upscale(self, image: Any, task: str | None = None, scale: int | None = None,
                tile: int | None = None) -> np.ndarray:
        """Super-resolve an H x W x 3 uint8 image with ``task`` (or the task of ``scale``)."""
        if task is None:
            if scale is None or not isinstance(self.family, Upscaler):
                raise ValueError("name a task, or a scale of a SISR model")
            task = self.family.task_for_scale(scale)
        x = _tensor(image)
        count = restoration.tile_count(x.shape[1], x.shape[2], tile)
        with self._bar(count, "tiles") as bar:
            return _array(restoration.upscale(self.family, self.network, task, x, tile, bar.update))

    def compress(self, image: Any, task: str, tile: int | None = None) -> bytes:
        """The pngrow bitstream of an H x W x 3 uint8 image at NIC ``task``'s rate."""
        x = _tensor(image)
        count = restoration.tile_count(x.shape[1], x.shape[2], tile)
        with self._bar(count, "tiles") as bar:
            return restoration.encode(self.family, self.network, task, x, self.version, tile, bar.update)

    def decompress(self, data: bytes) -> np.ndarray:
        """The image of a pngrow bitstream (its task is read from the header)."""
        header = restoration.read_header(data)
        count = restoration.tile_count(header["height"], header["width"], header["tile"])
        with self._bar(count, "tiles") as bar:
            return _array(restoration.decode(self.family, self.network, data, bar.update)[1])

    def restore(self, image: Any, task: str) -> np.ndarray:
        """What ``task`` makes of the image: upscaled (SISR) or coded and decoded (NIC)."""
        if isinstance(self.family, Codec):
            return self.decompress(self.compress(image, task))
        return self.upscale(image, task)


def resolve_checkpoint(uri: str, dest: str | Path, tracking_uri: str | None = None) -> tuple[Path, str]:
    """The checkpoint folder of ``uri`` (downloaded into ``dest`` when remote) and a label of its version.

    ``uri``: a checkpoint folder (``model.json`` + ``weights.safetensors``), a pyfunc model folder, or an MLflow
    URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/...``).
    """
    if not is_mlflow_uri(uri):
        path = Path(uri.removeprefix("file://"))
        for candidate in (path, path / "artifacts" / "checkpoint"):
            if (candidate / "model.json").is_file():
                read_description(candidate)
                return candidate, str(path.resolve())
        raise CheckpointError(f"{uri!r} is neither a pngrow model folder nor a pngrow pyfunc model")
    import mlflow
    from mlflow.exceptions import MlflowException

    from .tracking import using  # also imports MLflow's pyfunc quietly

    label, model = uri, parse_model_uri(uri)
    try:
        with using(tracking_uri or mlflow.get_tracking_uri()):
            if model is not None and model.alias:
                version = mlflow.MlflowClient().get_model_version_by_alias(model.name, model.alias).version
                label = f"models:/{model.name}/{version}"
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except MlflowException as exc:
        raise ValueError(f"cannot load model {uri!r}: {str(exc).splitlines()[0]}") from None
    for candidate in (local, local / "artifacts" / "checkpoint", local / "checkpoint"):
        if (candidate / "model.json").is_file():
            return candidate, label
    raise CheckpointError(f"{uri!r} is not a pngrow shared model (no checkpoint in it)")


def load_shared_model(uri: str, tracking_uri: str | None = None, device: str = "cpu",
                      progress: bool = True, compacted: bool = True) -> RestorationModel:
    """Load a shared model from a folder or MLflow (see :func:`resolve_checkpoint`) for restoring images on
    ``device`` (a ``ValueError`` naming it where this machine lacks it), by each task's compacted model unless
    ``compacted=False`` (see :class:`RestorationModel`)."""
    check_device(device)
    with tempfile.TemporaryDirectory(prefix="pngrow-model-") as tmp:
        folder, version = resolve_checkpoint(uri, tmp, tracking_uri)
        family, shared = load_model(folder)
    shared.to(device).eval()
    return RestorationModel(family, shared, version, progress, compacted)
