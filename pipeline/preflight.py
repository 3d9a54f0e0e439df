"""Check, before a search starts anything, that the services it will use answer; one line names the one that does
not, with its URI (password redacted)."""

from __future__ import annotations

import urllib.error
import urllib.request

from ..errors import ServiceError, failure_line
from .config import SearchConfig
from .object_store import s3_client
from .uris import is_s3, redact, split_s3

__all__ = ["check_artifact_store", "check_services"]


def _reason(exc: BaseException, secret_uri: str) -> str:
    """The failure line of ``exc`` without the password in ``secret_uri`` (redacted before it is cut short)."""
    return failure_line(exc, limit=1_000_000).replace(secret_uri, redact(secret_uri) or "")[:300]


def check_services(config: SearchConfig) -> None:
    """The MLflow server (``/health``), the Optuna database and any ``s3://`` data answer, or :class:`ServiceError`."""
    uri = config.resolved_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as response:
                response.read()
        except (OSError, urllib.error.URLError) as exc:
            raise ServiceError(f"MLflow tracking server {redact(uri)!r} is unreachable: {_reason(exc, uri)}") from None
    storage = config.resolved_optuna_storage()
    if not storage.startswith("sqlite"):
        import sqlalchemy

        try:
            args = {"connect_timeout": 10} if storage.startswith("postgresql") else {}
            with sqlalchemy.create_engine(storage, connect_args=args).connect():
                pass
        except Exception as exc:  # noqa: BLE001 - drivers raise many types; all mean "cannot use it"
            raise ServiceError(f"Optuna storage {redact(storage)!r} is unreachable: {_reason(exc, storage)}") from None
    for source in (config.train_data, config.eval_data):
        if is_s3(source):
            _check_bucket(source or "", "training data")


def check_artifact_store(location: str) -> None:
    """The experiment's artifact store answers (S3 only; a local folder is created on demand)."""
    if is_s3(location):
        _check_bucket(location, "MLflow artifact store")


def _check_bucket(uri: str, what: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _ = split_s3(uri)
    try:
        s3_client().head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as exc:
        raise ServiceError(f"{what} {uri!r} is unreachable: {_reason(exc, uri)}") from None
