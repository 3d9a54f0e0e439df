"""MLflow, thinly: runs of searches, stages and trials with lineage tags, checkpoints as artifacts, the pyfunc model.

Every pngrow tag name and run kind is in :mod:`pngrow.pipeline.names`; callers pass tag names whole
(``names.TASK``). The rest of pngrow talks to MLflow through :class:`Tracking` only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import mlflow

with warnings.catch_warnings():
    # MLflow's own pyfunc loaders warn at import that they lack predict() type hints: not ours to fix.
    warnings.simplefilter("ignore", UserWarning)
    import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.db.db_types import DATABASE_ENGINES
from mlflow.utils.time import get_current_time_millis

from ..errors import ServiceError, failure_line
from . import names
from .uris import is_run_artifact, redact, split_run_artifact

__all__ = ["AnsweringClient", "Tracking", "metric_key", "tag_filter", "unreachable", "using"]

# pngrow prints its own progress; MLflow's per-download progress bars and "View run at" lines would drown it.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")
# The experiment tag MLflow's UI reads to open an experiment as model training rather than GenAI development.
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
_PYFUNC_CODE = Path(__file__).with_name("shared_model.py")


def unreachable(error: BaseException) -> str | None:
    """Which service ``error`` says stopped answering ("tracking" or "artifacts"), or None for any other error.

    MLflow's REST client retries with backoff itself (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``..._BACKOFF_FACTOR``,
    ``..._TIMEOUT``) and boto3 too (``AWS_MAX_ATTEMPTS``); what reaches here has outlasted those retries.
    """
    import boto3.exceptions
    import botocore.exceptions
    import requests.exceptions

    if isinstance(error, (botocore.exceptions.ConnectionError, boto3.exceptions.S3UploadFailedError)):
        return "artifacts"
    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return "tracking"
    text = str(error)
    if isinstance(error, MlflowException) and "API request to" in text and (
        "Max retries exceeded" in text or "timed out" in text or "Connection" in text
    ):
        return "tracking"
    return None


class AnsweringClient:
    """An ``MlflowClient`` whose every call turns a tracking server or artifact store that stopped answering (after
    the libraries' own retries with backoff) into one :class:`ServiceError` naming it, without credentials."""

    def __init__(self, client: MlflowClient, uri: str) -> None:
        self._client = client
        self._uri = uri

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attribute(*args, **kwargs)
            except Exception as error:
                service = unreachable(error)
                if service is None:
                    raise
                reason = redact(failure_line(error, limit=1_000_000))[:300]  # redacted before it is cut short
                if service == "tracking":
                    what = f"MLflow tracking server {redact(self._uri)!r}"
                else:
                    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
                    what = f"artifact store {redact(endpoint)!r}" if endpoint else "artifact store"
                raise ServiceError(f"{what} stopped answering ({name}): {reason}", service) from None

        return call


@contextlib.contextmanager
def _without_type_hint_advice() -> Iterator[None]:
    """Drop MLflow's advice to add predict() type hints while a model is logged. MLflow forces that warning on
    (``simplefilter("once")`` inside), so a filter cannot; the hints it wants cannot describe a dict or DataFrame of
    encoded images. Every other warning is shown as usual."""
    show = warnings.showwarning

    def filtered(message: Any, *args: Any, **kwargs: Any) -> None:
        if "type hints to the `predict` method" not in str(message):
            show(message, *args, **kwargs)

    warnings.showwarning = filtered
    try:
        yield
    finally:
        warnings.showwarning = show


@contextlib.contextmanager
def using(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (tracking and registry) at ``uri`` for a block, then restore exactly what was
    there (MLflow keeps these in module state and in environment variables), so that pngrow never leaves a
    caller's MLflow pointing elsewhere."""
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    saved = (tracking_state._tracking_uri, registry_state._registry_uri,
             {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")})
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_state._registry_uri = saved[1]
        for key, value in saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def metric_key(*parts: str) -> str:
    """A metric name MLflow accepts, joining ``parts`` with ``/``.

    >>> metric_key("final", "lambda=0.02", "psnr")
    'final/lambda_0.02/psnr'
    """
    return "/".join(_BAD.sub("_", p) for p in parts)


def _tags(tags: dict[str, Any] | None) -> dict[str, str]:
    """``tags`` as MLflow stores them; a name that is not a pngrow tag (see :mod:`.names`) is a ValueError."""
    wrong = [k for k in tags or {} if not names.is_pngrow_tag(k)]
    if wrong:
        raise ValueError(f"tag {wrong[0]!r} is not a pngrow tag name: use pngrow.pipeline.names")
    return {k: str(v) for k, v in (tags or {}).items()}


class Tracking:
    """One MLflow tracking server (or local store) and one experiment in it."""

    def __init__(self, uri: str, experiment: str | None = None, artifact_root: str | None = None) -> None:
        self.uri = uri
        answering = AnsweringClient(MlflowClient(tracking_uri=uri, registry_uri=uri), uri)
        self.client: MlflowClient = answering  # type: ignore[assignment]
        self.experiment_id = self._experiment(experiment, artifact_root) if experiment else None

    @staticmethod
    def store_modules(uri: str) -> tuple[str, ...]:
        """What MLflow imports when a client of ``uri`` first reaches its store, for a worker to import ahead: for a
        database, its SQLAlchemy store (SQLAlchemy and Alembic, about 0.6 s on 2 cores).

        >>> Tracking.store_modules("sqlite:///runs/mlflow.db"), Tracking.store_modules("http://mlflow:5000")
        (('mlflow.store.tracking.sqlalchemy_store',), ())
        """
        scheme = uri.partition(":")[0].partition("+")[0]
        return ("mlflow.store.tracking.sqlalchemy_store",) if scheme in DATABASE_ENGINES else ()

    def _experiment(self, name: str, artifact_root: str | None) -> str:
        """The experiment called ``name``, created when missing; either way marked as model training, so that the
        MLflow UI opens it on its runs (MLflow 3 otherwise may take it for a GenAI experiment)."""
        found = self.find_experiment(name)
        if found is None:
            found = self.client.create_experiment(name, artifact_location=artifact_root, tags={
                "mlflow.note.content": "pngrow prune-and-grow searches: one run per search, a nested run per stage "
                                       "(task) and per trial."})
        self.client.set_experiment_tag(found, EXPERIMENT_KIND, MODEL_TRAINING)
        return found

    def find_experiment(self, name: str) -> str | None:
        """The id of the experiment called ``name``; None when there is none."""
        found = self.client.get_experiment_by_name(name)
        return None if found is None else found.experiment_id

    def experiment_name(self, experiment_id: str) -> str:
        """The name of experiment ``experiment_id``."""
        return self.client.get_experiment(experiment_id).name

    @property
    def artifact_location(self) -> str:
        """Where the experiment's runs keep their artifacts (a folder URI or ``s3://...``)."""
        if self.experiment_id is None:
            raise ValueError("this Tracking was opened without an experiment")
        return self.client.get_experiment(self.experiment_id).artifact_location

    def start_run(self, name: str, tags: dict[str, Any], parent: str | None = None) -> str:
        """A new run in the experiment, nested under ``parent``, with pngrow ``tags`` (names from :mod:`.names`)."""
        if self.experiment_id is None:
            raise ValueError("this Tracking was opened without an experiment, so it cannot start runs")
        all_tags = _tags(tags)
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent
        return self.client.create_run(self.experiment_id, tags=all_tags, run_name=name).info.run_id

    def log(self, run_id: str, metrics: dict[str, float] | None = None, params: dict[str, Any] | None = None,
            tags: dict[str, Any] | None = None, step: int = 0) -> None:
        """Metrics (at ``step``), params and pngrow tags (names from :mod:`.names`) in one request."""
        now = get_current_time_millis()
        self.client.log_batch(
            run_id,
            metrics=[Metric(metric_key(k), float(v), now, step) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
            tags=[RunTag(k, v) for k, v in _tags(tags).items()],
        )

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED)."""
        self.client.set_terminated(run_id, status)

    def reopen_run(self, run_id: str) -> None:
        """Mark an ended (or orphaned) run RUNNING again, for a resumed search."""
        self.client.update_run(run_id, "RUNNING")

    def describe(self, run_id: str, text: str) -> None:
        """The run's description, as the MLflow UI shows it (Markdown)."""
        self.client.set_tag(run_id, "mlflow.note.content", text)

    def log_dataset(self, run_id: str, name: str, source: str | None, digest: str, context: str) -> None:
        """Record on the run (the UI's Datasets column) that ``context`` ("training" or "evaluation") used images
        ``name`` from ``source`` (a folder, an ``s3://`` prefix, a ``runs:/`` folder the driver uploaded, or None for
        scikit-image's bundled photos), whose content hashes to ``digest``."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        if source is None or is_run_artifact(source):  # MLflow has no dataset source type for these: named
            origin = CodeDatasetSource({"mlflow.source.name": source or "skimage.data"})
        else:
            origin = resolve_dataset_source(source if "://" in source else Path(source).resolve().as_uri())
        dataset = MetaDataset(origin, name=name, digest=digest)._to_mlflow_entity()
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
        try:
            self.client.log_inputs(run_id, datasets=inputs)
        except MlflowException as exc:
            # Two trials recording the same new dataset at once: the store's insert of the loser fails on its
            # unique key (SQLite and PostgreSQL word it differently); the dataset exists now, so once more links it.
            if not any(words in str(exc).lower() for words in ("unique constraint", "duplicate key")):
                raise
            self.client.log_inputs(run_id, datasets=inputs)

    def copy_datasets(self, source_run: str, dest_run: str) -> None:
        """Record on ``dest_run`` the datasets ``source_run`` used (a stage and its search show their trials' data)."""
        inputs = self.run(source_run).inputs.dataset_inputs
        known = {(d.dataset.name, d.dataset.digest) for d in self.run(dest_run).inputs.dataset_inputs}
        new = [d for d in inputs if (d.dataset.name, d.dataset.digest) not in known]
        if new:
            self.client.log_inputs(dest_run, datasets=new)

    def log_dict(self, run_id: str, data: dict[str, Any], path: str) -> None:
        """``data`` as the run's JSON artifact ``path``."""
        self.client.log_dict(run_id, data, path)

    def load_dict(self, run_id: str, path: str) -> dict[str, Any]:
        """The run's JSON artifact ``path`` (see :meth:`log_dict`)."""
        with tempfile.TemporaryDirectory(prefix="pngrow-json-") as tmp:
            return json.loads(Path(self.client.download_artifacts(run_id, path, tmp)).read_text())

    def log_folder(self, run_id: str, folder: str | Path, path: str) -> None:
        """Upload every file of ``folder`` as the run's artifacts under ``path``."""
        self.client.log_artifacts(run_id, str(folder), path)

    def log_file(self, run_id: str, file: str | Path, path: str) -> str:
        """Upload ``file`` as the run's artifact under ``path``; returns its ``runs:/`` URI
        (see :meth:`download_artifact`)."""
        self.client.log_artifact(run_id, str(file), path)
        return f"runs:/{run_id}/{path.strip('/')}/{Path(file).name}"

    def download_artifact(self, uri: str, dest: str | Path) -> Path:
        """The artifact ``runs:/RUN_ID/PATH`` (as :meth:`log_file` returns), downloaded into ``dest``."""
        run_id, path = split_run_artifact(uri)
        Path(dest).mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dest)))

    def log_checkpoint(self, run_id: str, folder: str | Path) -> None:
        """Upload a saved shared model (safetensors + JSON) as the run's ``checkpoint`` artifacts."""
        self.log_folder(run_id, folder, "checkpoint")

    def download_checkpoint(self, run_id: str, dest: str | Path) -> Path:
        """The run's ``checkpoint`` artifacts, downloaded into ``dest``."""
        return self.download_artifact(f"runs:/{run_id}/checkpoint", dest)

    def copy_checkpoint(self, source_run: str, dest_run: str) -> None:
        """Log ``source_run``'s checkpoint on ``dest_run`` too."""
        with tempfile.TemporaryDirectory(prefix="pngrow-ckpt-") as tmp:
            self.log_checkpoint(dest_run, self.download_checkpoint(source_run, tmp))

    def log_shared_model(self, run_id: str, checkpoint: str | Path) -> str:
        """Log the checkpoint as a pyfunc model on ``run_id``; returns the model's URI (also tagged on the run).

        The model carries its signature (JSON-servable columns of base64 text, see :mod:`.shared_model`), the
        ``pngrow`` package as code (``code/pngrow``, first on ``sys.path`` when it loads) and requirements that name
        only PyPI packages, so ``mlflow models serve`` and ``build-docker`` install it anywhere.
        """
        import shutil

        from ..workers.png import read_description

        family = read_description(checkpoint)["architecture"]["family"]
        with tempfile.TemporaryDirectory(prefix="pngrow-code-") as code, using(self.uri), \
                mlflow.start_run(run_id=run_id), _without_type_hint_advice(), warnings.catch_warnings():
            # The signature documents the columns; an input example would run the model once more at every log.
            warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
            from . import shared_model  # defining its PythonModel draws the type-hint advice too

            if Path(checkpoint).name != "checkpoint":  # MLflow keeps the folder's name: artifacts/checkpoint
                checkpoint = shutil.copytree(checkpoint, Path(code) / "checkpoint")
            info = mlflow.pyfunc.log_model(
                name="shared_model",
                python_model=str(_PYFUNC_CODE),
                artifacts={"checkpoint": str(checkpoint)},
                code_paths=[shared_model.package_code(code)],
                pip_requirements=shared_model.requirements(),
                signature=shared_model.signature(family),
            )
        self.log(run_id, tags={names.MODEL_URI: info.model_uri})
        return info.model_uri

    def model_version(self, name: str, version: str) -> ModelVersion:
        """Version ``version`` of the registered model ``name``."""
        return self.client.get_model_version(name, version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``alias`` of the registered model ``name`` at ``version``."""
        self.client.set_registered_model_alias(name, alias, version)

    def run(self, run_id: str) -> Run:
        """The run ``run_id``, with its tags, params and latest metrics."""
        return self.client.get_run(run_id)

    def runs(self, filter_string: str = "", experiment_ids: Iterable[str] | None = None) -> list[Run]:
        """Runs matching an MLflow filter (e.g. :func:`tag_filter`), newest first, every page."""
        ids = list(experiment_ids) if experiment_ids is not None else (
            [self.experiment_id] if self.experiment_id else [e.experiment_id for e in self.client.search_experiments()]
        )
        result: list[Run] = []
        token = None
        while True:
            page = self.client.search_runs(ids, filter_string, max_results=1000, order_by=["attributes.start_time DESC"],
                                           page_token=token)
            result.extend(page)
            token = page.token
            if not token:
                return result

    def children(self, run: Run, kind: str) -> list[Run]:
        """The ``kind`` runs (a :class:`~.names.Kind`) nested under ``run``."""
        return self.runs(f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and {tag_filter(names.KIND, kind)}",
                         [run.info.experiment_id])


def tag_filter(tag: str, value: Any) -> str:
    """An MLflow filter for runs whose ``tag`` is ``value``.

    >>> tag_filter("pngrow.kind", "search")
    "tags.`pngrow.kind` = 'search'"
    """
    return f"tags.`{tag}` = '{value}'"
