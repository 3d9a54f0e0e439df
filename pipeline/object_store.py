"""S3 (boto3), thinly: list an ``s3://bucket/prefix`` folder of training images or Parquet shards (each object's
ETag and size), and download an object only while its ETag is the one listed, counting the bytes read.

The endpoint comes from ``MLFLOW_S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL``) for S3-compatible stores, the
credentials from boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .uris import split_s3

__all__ = ["bytes_fetched", "changed", "download", "list_folder", "object_info", "s3_client"]

_fetched = 0  # bytes of object content downloaded by this process (bytes_fetched)
LIST_PAGE = 1000  # objects per listing request (S3's most); a folder of more is listed page after page


def s3_client():  # noqa: ANN201 - boto3 clients have no importable type
    import boto3

    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    # A fresh session reads the credentials now; boto3's default session would keep the first ones it saw.
    return boto3.session.Session().client("s3", endpoint_url=endpoint)


def bytes_fetched() -> int:
    """How many bytes of object content this process has downloaded from S3 (:func:`download`), in all.

    >>> bytes_fetched() >= 0
    True
    """
    return _fetched


def _etag(value: str) -> str:
    """An ETag without the quotes S3 puts around it.

    >>> _etag('"9b2cf535f27731c974343645a3985328"')
    '9b2cf535f27731c974343645a3985328'
    """
    return value.strip('"')


def list_folder(uri: str) -> dict[str, tuple[str, int]]:
    """The objects directly under ``uri`` (not its sub-folders): name -> (ETag, size). One line when the folder
    cannot be read or is empty."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3(uri)
    found: dict[str, tuple[str, int]] = {}
    try:
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/",
                                                                      PaginationConfig={"PageSize": LIST_PAGE})
        for page in pages:
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix):]
                if name:
                    found[name] = (_etag(item["ETag"]), int(item["Size"]))
    except (BotoCoreError, ClientError) as exc:
        raise ValueError(f"cannot read {uri!r}: {exc}") from None
    if not found:
        raise ValueError(f"S3 folder {uri!r} is empty or does not exist")
    return found


def object_info(uri: str) -> tuple[str, int]:
    """The (ETag, size) of the object ``s3://bucket/key``; one line when it cannot be read."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    try:
        head = s3_client().head_object(Bucket=bucket, Key=key.rstrip("/"))
    except (BotoCoreError, ClientError) as exc:
        raise ValueError(f"cannot read {uri!r}: {exc}") from None
    return _etag(head["ETag"]), int(head["ContentLength"])


def changed(uri: str, listed: str, now: str) -> ValueError:
    """The error for an object whose ETag is no longer the one listed when the search started.

    >>> changed("s3://data/train/a.png", "9b2c", "77f0")
    ValueError("S3 object 's3://data/train/a.png' changed during the search: ETag 9b2c when it started, now 77f0")
    """
    return ValueError(f"S3 object {uri!r} changed during the search: ETag {listed} when it started, now {now}")


def download(uri: str, dest: str | Path, etag: str) -> int:
    """Write the object ``uri`` to ``dest`` if its ETag is still ``etag``; returns the bytes read (counted by
    :func:`bytes_fetched`). An object whose ETag is another now is one line naming both."""
    from botocore.exceptions import BotoCoreError, ClientError

    global _fetched
    bucket, key = split_s3(uri)
    try:
        response = s3_client().get_object(Bucket=bucket, Key=key.rstrip("/"), IfMatch=f'"{etag}"')
        now = _etag(response["ETag"])
        if now == etag:
            with open(dest, "wb") as out:
                shutil.copyfileobj(response["Body"], out, 1 << 20)
        response["Body"].close()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
            raise ValueError(f"cannot read {uri!r}: {exc}") from None
        now = object_info(uri)[0]
    except BotoCoreError as exc:
        raise ValueError(f"cannot read {uri!r}: {exc}") from None
    if now != etag:
        raise changed(uri, etag, now)
    size = Path(dest).stat().st_size
    _fetched += size
    return size
