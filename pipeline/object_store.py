"""S3 (boto3), thinly: copy an ``s3://bucket/prefix`` folder of training images or Parquet shards to local disk.

The endpoint comes from ``MLFLOW_S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL``) for S3-compatible stores, the
credentials from boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fetch_folder", "is_s3", "s3_client", "split_s3"]


def is_s3(uri: str | None) -> bool:
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


def s3_client():  # noqa: ANN201 - boto3 clients have no importable type
    import boto3

    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    # A fresh session reads the credentials now; boto3's default session would keep the first ones it saw.
    return boto3.session.Session().client("s3", endpoint_url=endpoint)


def fetch_folder(uri: str, dest: str | Path) -> Path:
    """Download the objects directly under ``uri`` (not its sub-folders) into ``dest``; returns ``dest``."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3(uri)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    client = s3_client()
    count = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix):]
                if name:
                    client.download_file(bucket, item["Key"], str(dest / name))
                    count += 1
    except (BotoCoreError, ClientError) as exc:
        raise ValueError(f"cannot read {uri!r}: {exc}") from None
    if count == 0:
        raise ValueError(f"S3 folder {uri!r} is empty or does not exist")
    return dest
