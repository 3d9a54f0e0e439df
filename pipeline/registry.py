"""The MLflow Model Registry, thinly: register a search's shared model (or a stage's) and point an alias at it."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion

from ..errors import SearchError
from . import names
from .names import Kind
from .tracking import Tracking, tag_filter, using
from .uris import redact

__all__ = ["promote", "resolve_run"]

_RUN_ID = re.compile(r"[0-9a-f]{32}")


def resolve_run(tracking: Tracking, ref: str) -> Run:
    """The run named by ``ref``: a run id, or the name of a search (its newest finished run)."""
    if _RUN_ID.fullmatch(ref):
        try:
            return tracking.run(ref)
        except mlflow.exceptions.MlflowException:
            raise ValueError(f"run {ref!r} does not exist at {redact(tracking.uri)!r}") from None
    runs = [r for r in tracking.runs(tag_filter(names.KIND, Kind.SEARCH)) if r.info.run_name == ref]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if not finished:
        detail = f"none of its {len(runs)} runs finished" if runs else "no search has that name"
        raise ValueError(f"search {ref!r} has no finished run: {detail}")
    return finished[0]


def _servable(tracking: Tracking, uri: str) -> bool:
    """Whether the pyfunc model at ``uri`` has a signature, as pngrow logs it since models are served over JSON
    (earlier ones took raw bytes only and required ``pngrow`` from a package index)."""
    with using(tracking.uri):
        return mlflow.models.get_model_info(uri).signature is not None


def _model_uri(tracking: Tracking, run: Run) -> str:
    tags = run.data.tags
    if names.MODEL_URI in tags:
        uri = tags[names.MODEL_URI]
        if _servable(tracking, uri):
            return uri
        from .api import resolve_checkpoint

        with tempfile.TemporaryDirectory(prefix="pngrow-promote-") as tmp:  # logged by an older pngrow: log anew
            return tracking.log_shared_model(run.info.run_id, resolve_checkpoint(uri, tmp, tracking.uri)[0])
    kind = tags.get(names.KIND)
    if kind == Kind.SEARCH:
        raise SearchError(f"search {run.info.run_id} has no shared model yet (its run is {run.info.status})")
    if kind not in (Kind.STAGE, Kind.TRIAL) or run.info.status != "FINISHED":
        raise SearchError(f"run {run.info.run_id} is not a finished pngrow stage or trial (kind {kind!r}, "
                          f"status {run.info.status})")
    with tempfile.TemporaryDirectory(prefix="pngrow-promote-") as tmp:
        return tracking.log_shared_model(run.info.run_id, tracking.download_checkpoint(run.info.run_id, tmp))


def promote(tracking: Tracking, ref: str, name: str, alias: str | None = "champion",
            onnx: bool = False) -> ModelVersion:
    """Register the shared model of ``ref`` (see :func:`resolve_run`) as a new version of ``name``; point
    ``alias`` (unless None) at it.

    The version's tags record its lineage: the run it came from, the search, the task order, and the model
    version it was grown from when the search grew a released model. With ``onnx``, every task is exported first
    (:func:`~pngrow.pipeline.export.export_model`, checked in ONNX Runtime; a failure registers nothing) and logged
    on the source run under ``onnx/NAME/VERSION/<task>/``, which the version's ``pngrow.onnx`` tag names.
    """
    if alias is not None and (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", alias)
                              or re.fullmatch(r"latest|[vV][0-9]+", alias)):
        raise ValueError(f"alias {alias!r} must be letters, digits, '_', '-' or '.', and not 'latest' or 'vN'")
    run = resolve_run(tracking, ref)
    tags = run.data.tags
    if tags.get(names.SMOKE_TEST) == "true":
        raise ValueError(f"{ref!r} is the model of smoke test {tags.get(names.SEARCH_ID, run.info.run_id)} (pngrow "
                         "search --smoke-test), trained a few steps only: promote a search run without --smoke-test")
    uri = _model_uri(tracking, run)
    lineage = {
        names.SOURCE_RUN: run.info.run_id,
        names.SEARCH_ID: tags.get(names.SEARCH_ID, run.info.run_id),
        names.TASKS: tags.get(names.TASKS) or tags.get(names.TASK_ORDER, ""),
    }
    if names.GROWN_FROM_MODEL in tags:
        lineage[names.GROWN_FROM_MODEL] = tags[names.GROWN_FROM_MODEL]
    with tempfile.TemporaryDirectory(prefix="pngrow-onnx-") as tmp:
        exported = _export(tracking, uri, Path(tmp)) if onnx else []
        with using(tracking.uri):
            version = mlflow.register_model(uri, name, tags=lineage)
        if exported:
            _attach_onnx(tracking, exported, Path(tmp), name, version.version, run.info.run_id)
    if alias is not None:
        tracking.set_alias(name, alias, version.version)
    return tracking.model_version(name, version.version)


def _export(tracking: Tracking, uri: str, folder: Path) -> list[Any]:
    from .export import export_model

    return export_model(uri, folder, tracking_uri=tracking.uri)


def _attach_onnx(tracking: Tracking, exported: list[Any], folder: Path, name: str, version: str, run_id: str) -> None:
    """Each exported task, labelled as the version (its bitstreams' header names it), logged on ``run_id``."""
    label = f"models:/{name}/{version}"
    for task in exported:
        manifest = json.loads((task.folder / "task.json").read_text())
        (task.folder / "task.json").write_text(json.dumps({**manifest, "model": label}, indent=2) + "\n")
    path = f"onnx/{name}/{version}"
    tracking.log_folder(run_id, folder, path)
    tracking.client.set_model_version_tag(name, version, names.ONNX, f"runs:/{run_id}/{path}")
