"""What a URI names, in one place: passwords hidden for messages, ``s3://`` objects, ``runs:/`` artifacts, URIs that
MLflow resolves, and the registered model a ``models:/`` URI names. Plain string work: no service is asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ModelUri", "is_mlflow_uri", "is_remote", "is_run_artifact", "is_s3", "parse_model_uri", "redact",
           "split_run_artifact", "split_s3"]

_MODELS = "models:/"
_RUNS = "runs:/"


def redact(uri: str | None) -> str | None:
    """``uri`` with any password (``scheme://user:password@host``) replaced, for logs, params and tags.

    >>> redact("postgresql://pngrow:s3cret@db:5432/optuna")
    'postgresql://pngrow:***@db:5432/optuna'
    """
    return None if uri is None else re.sub(r"(://[^/:@]*):[^/@]*@", r"\1:***@", uri)


def is_s3(uri: str | None) -> bool:
    """Whether ``uri`` names an S3 object or folder.

    >>> is_s3("s3://data/train"), is_s3("/data/train"), is_s3(None)
    (True, False, False)
    """
    return bool(uri) and str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` as (bucket, ``some/prefix/``).

    >>> split_s3("s3://data/div2k/train")
    ('data', 'div2k/train/')
    >>> split_s3("s3://")
    Traceback (most recent call last):
    ...
    ValueError: S3 URI 's3://' names no bucket
    """
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"S3 URI {uri!r} names no bucket")
    return bucket, (prefix.rstrip("/") + "/") if prefix else ""


def is_run_artifact(uri: str | None) -> bool:
    """Whether ``uri`` names an MLflow run's artifact (``runs:/RUN_ID/PATH``).

    >>> is_run_artifact("runs:/abc/init/w.safetensors"), is_run_artifact("w.safetensors"), is_run_artifact(None)
    (True, False, False)
    """
    return str(uri).startswith(_RUNS)


def split_run_artifact(uri: str) -> tuple[str, str]:
    """``runs:/RUN_ID/PATH`` as (run id, path).

    >>> split_run_artifact("runs:/abc/data/train/9f")
    ('abc', 'data/train/9f')
    >>> split_run_artifact("runs:/abc")
    Traceback (most recent call last):
    ...
    ValueError: artifact URI 'runs:/abc' is not runs:/RUN_ID/PATH
    """
    run_id, _, path = uri.removeprefix(_RUNS).partition("/")
    if not is_run_artifact(uri) or not run_id or not path:
        raise ValueError(f"artifact URI {uri!r} is not runs:/RUN_ID/PATH")
    return run_id, path


def is_remote(uri: str | None) -> bool:
    """Whether ``uri`` names an ``s3://`` object or a ``runs:/`` artifact, not a file on this machine.

    >>> [is_remote(u) for u in ("s3://b/w.safetensors", "runs:/abc/init/w.safetensors", "w.safetensors", None)]
    [True, True, False, False]
    """
    return is_s3(uri) or is_run_artifact(uri)


def is_mlflow_uri(uri: str) -> bool:
    """Whether ``uri`` names a model MLflow resolves (``models:/``, ``runs:/`` or a remote URL), not a folder.

    >>> is_mlflow_uri("models:/sisr@champion"), is_mlflow_uri("runs/sisr-model"), is_mlflow_uri("file:///m")
    (True, False, False)
    """
    return uri.startswith((_MODELS, _RUNS)) or ("://" in uri and not uri.startswith("file://"))


@dataclass(frozen=True, kw_only=True)
class ModelUri:
    """What a ``models:/`` URI names: a registered model's version (``models:/NAME/VERSION``) or alias
    (``models:/NAME@ALIAS``); neither for MLflow's id of a logged model (``models:/m-...``)."""

    name: str
    version: str = ""
    alias: str = ""


def parse_model_uri(uri: str) -> ModelUri | None:
    """The model a ``models:/`` URI names; None for any other URI (a folder, ``runs:/``).

    >>> parse_model_uri("models:/sisr-shared@champion")
    ModelUri(name='sisr-shared', version='', alias='champion')
    >>> parse_model_uri("models:/sisr-shared/3")
    ModelUri(name='sisr-shared', version='3', alias='')
    >>> parse_model_uri("runs:/abc/shared_model") is None, parse_model_uri("models/sisr") is None
    (True, True)
    >>> parse_model_uri("models:/@champion")
    Traceback (most recent call last):
    ...
    ValueError: model URI 'models:/@champion' names no model: models:/NAME/VERSION or models:/NAME@ALIAS
    """
    if not uri.startswith(_MODELS):
        return None
    rest = uri.removeprefix(_MODELS)
    name, at, alias = rest.partition("@")
    version = ""
    if not at:
        name, _, version = rest.partition("/")
    if not name or "/" in name or (at and not alias):
        raise ValueError(f"model URI {uri!r} names no model: models:/NAME/VERSION or models:/NAME@ALIAS")
    return ModelUri(name=name, version=version, alias=alias)
