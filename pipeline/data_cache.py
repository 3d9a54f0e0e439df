"""Training and evaluation images fetched and decoded once per node.

An ``s3://`` folder's objects are kept in a node-local cache folder (the config's ``data: {cache: ...}``, else
``$PNGROW_CACHE``, else ``~/.cache/pngrow``) under their ETag and size, so an unchanged object is downloaded once per
node, across trials and searches; a folder's objects are downloaded in parallel. A download goes to a temporary
name, renamed when complete, under a file lock, so the workers of one node racing for an object fetch it once. The
driver lists every ``s3://`` source once (:func:`list_sources`); a worker lists again and refuses, in one line, an
object whose ETag is no longer the listed one. Every folder's images are then decoded once per node into the same
cache, and each process maps them (:func:`load_images`, :mod:`pngrow.workers.decoded`).

A local folder that workers on other machines cannot read is uploaded once by the driver (:func:`upload_folder`) as
the search run's artifacts ``data/<split>/<content digest>``; a worker fetches that ``runs:/`` copy into the same
cache, under its digest (:func:`fetch_upload`), so once per node, and checks it holds what the driver uploaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ..workers.decoded import cache_folder, data_files, made_once
from .object_store import changed, download, list_folder, object_info
from .uris import is_remote, is_s3

if TYPE_CHECKING:
    from ..workers.data import ImageSet
    from .tracking import Tracking

__all__ = ["DOWNLOADS", "Manifest", "fetch_file", "fetch_folder", "fetch_upload",
           "list_sources", "load_images", "upload_folder"]

Listing = dict[str, tuple[str, int]]  # an s3:// folder's objects: name -> (ETag, size)
DOWNLOADS = 16  # objects of a folder downloaded at once
_UPLOADED = re.compile(r"runs:/[^/]+/data/[^/]+/([0-9a-f]{20})")  # a folder upload_folder uploaded


@dataclass(frozen=True)
class Manifest:
    """What the driver listed when the search started: each ``s3://`` folder's objects, each ``s3://`` file's
    (ETag, size), and the cache folder the config names (None: each node's default)."""

    folders: dict[str, Listing] = field(default_factory=dict)
    files: dict[str, tuple[str, int]] = field(default_factory=dict)
    cache: str | None = None


def list_sources(folders: Iterable[str | None], files: Iterable[str | None] = (),
                 cache: str | None = None) -> Manifest:
    """List the ``s3://`` ones of ``folders`` (image folders) and ``files`` (init weights), once; the rest are skipped.

    >>> list_sources(["/data/train", None], ["dense.safetensors"], "/tmp/cache")
    Manifest(folders={}, files={}, cache='/tmp/cache')
    """
    return Manifest({f: list_folder(f) for f in folders if f and is_s3(f)},
                    {f: object_info(f) for f in files if f and is_s3(f)}, cache)


def _cached(uri: str, etag: str, size: int, cache: Path) -> Path:
    """The object ``uri`` in the cache under its ETag and size, downloaded unless the cache holds it already."""

    def fetch(scratch: Path) -> Path:
        download(uri, scratch / "object", etag)
        return scratch / "object"

    return made_once(cache / "objects" / f"{re.sub(r'[^A-Za-z0-9_-]', '_', etag)}-{size}", fetch)


def _digest(value: object) -> str:
    """A short hash of ``value`` as JSON: a folder's listing or its files' stats; the same value, the same digest.

    >>> _digest(sorted({"a.png": ("9b2c", 10)}.items())) != _digest(sorted({"a.png": ("77f0", 10)}.items()))
    True
    """
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:20]


def fetch_folder(uri: str, manifest: Manifest | None = None) -> Path:
    """A local folder holding the objects directly under ``uri`` as the driver listed them (links into the node's
    cache). One line names an object whose ETag changed since (or that was deleted)."""
    manifest = manifest or Manifest()
    now = list_folder(uri)
    listed = manifest.folders.get(uri, now)
    base = uri.rstrip("/")
    for name, (etag, _) in sorted(listed.items()):
        current = now.get(name, ("none (deleted)", 0))[0]
        if current != etag:
            raise changed(f"{base}/{name}", etag, current)
    cache = cache_folder(manifest.cache)
    folder = cache / "folders" / _digest(sorted(listed.items()))
    if folder.is_dir() and not all((folder / name).exists() for name in listed):
        shutil.rmtree(folder, ignore_errors=True)  # links to objects removed from the cache: built again

    def link(scratch: Path) -> Path:
        def fetch(item: tuple[str, tuple[str, int]]) -> None:
            name, (etag, size) = item
            (scratch / name).symlink_to(_cached(f"{base}/{name}", etag, size, cache))

        with ThreadPoolExecutor(DOWNLOADS) as pool:
            list(pool.map(fetch, listed.items()))
        return scratch

    return made_once(folder, link)


def fetch_file(uri: str, manifest: Manifest | None = None) -> Path:
    """The object ``uri`` (init weights, say) from the node's cache; one line when its ETag changed since the driver
    listed it."""
    manifest = manifest or Manifest()
    now = object_info(uri)
    etag, size = manifest.files.get(uri, now)
    if now[0] != etag:
        raise changed(uri, etag, now[0])
    return _cached(uri, etag, size, cache_folder(manifest.cache))


def _content_digest(folder: Path) -> str:
    """A short hash of the relative path and bytes of every file under ``folder`` (links followed)."""
    hasher = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as file:
            hasher.update(f"{path.relative_to(folder).as_posix()}:{hashlib.file_digest(file, 'sha256').hexdigest()};"
                          .encode())
    return hasher.hexdigest()[:20]


def upload_folder(folder: str, tracking: Tracking, run_id: str, split: str) -> str:
    """Upload the files a local image ``folder`` holds for pngrow (:func:`~pngrow.workers.decoded.data_files`: a paired
    SR folder keeps its ``HR/`` and ``LR_bicubic/X<s>/``) as the run's artifacts ``data/<split>/<content digest>``;
    returns their ``runs:/`` URI, which :func:`load_images` reads on any node."""
    root = Path(folder)
    with tempfile.TemporaryDirectory(prefix="pngrow-upload-") as tmp:
        for file in data_files(root):
            link = Path(tmp) / file.relative_to(root)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(file.absolute())
        path = f"data/{split}/{_content_digest(Path(tmp))}"
        tracking.log_folder(run_id, tmp, path)
    return f"runs:/{run_id}/{path}"


def fetch_upload(uri: str, tracking: Tracking, manifest: Manifest | None = None) -> Path:
    """A local copy of a folder :func:`upload_folder` uploaded, in the node's cache under its content digest:
    downloaded once per node, and refused in one line unless it holds what the driver uploaded."""
    match = _UPLOADED.fullmatch(uri.rstrip("/"))
    if match is None:
        raise ValueError(f"data {uri!r} is not a folder pngrow uploaded (runs:/RUN_ID/data/SPLIT/DIGEST)")
    digest = match.group(1)

    def fetch(scratch: Path) -> Path:
        folder = tracking.download_artifact(uri, scratch)
        found = _content_digest(folder)
        if found != digest:
            raise ValueError(f"artifact {uri!r} does not hold the data the driver uploaded: content digest {found}")
        return folder

    return made_once(cache_folder(manifest.cache if manifest else None) / "uploads" / digest, fetch)


def load_images(source: str | None, split: str, manifest: Manifest | None = None,
                tracking: Tracking | None = None) -> ImageSet:
    """Images from a folder, an ``s3://`` prefix or a ``runs:/`` folder the driver uploaded (fetched through the
    node's cache; the latter from ``tracking``), decoded once per node into that cache and mapped (see
    :func:`~pngrow.workers.data.load_folder`), or scikit-image's photos (None).

    >>> load_images(None, "eval") is load_images(None, "eval")
    True
    """
    from ..workers.data import default_images, load_folder  # PyTorch: a worker's

    if source is None:
        return default_images(split)
    folder = Path(source)
    if is_s3(source):
        folder = fetch_folder(source, manifest)
    elif is_remote(source):
        if tracking is None:
            raise ValueError(f"data {source!r} is an MLflow artifact: reading it needs the tracking server")
        folder = fetch_upload(source, tracking, manifest)
    return load_folder(folder, manifest.cache if manifest else None, source)
