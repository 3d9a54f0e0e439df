"""Data fetched and decoded once per node (``pipeline/data_cache.py``), against a real SeaweedFS S3 server; and init weights and local data folders that reach trials through the artifact store, not the driver's
disk."""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image

from pngrow.pipeline.cli import main
from pngrow.pipeline.data_cache import Manifest, fetch_file, fetch_folder, list_sources, load_images
from pngrow.pipeline.object_store import bytes_fetched, download, list_folder, object_info
from pngrow.workers import decoded
from pngrow.workers.data import default_images, write_shard
from pngrow.workers.decoded import cache_folder
from tests.services import SeaweedS3


@pytest.fixture
def s3_env(services, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3:
    """The session's S3 (one SeaweedFS per test session: MLflow caches its boto3 client by endpoint, not by
    credentials, so a second S3 given the same port later would be asked with the first one's keys)."""
    for key, value in services.s3.env().items():
        monkeypatch.setenv(key, value)
    return services.s3


def _png(colour: tuple[int, int, int], size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the images this process decodes from now on."""
    seen: list[str] = []
    real = decoded.decode_array

    def counting(source, name):  # noqa: ANN001, ANN202
        seen.append(name)
        return real(source, name)

    monkeypatch.setattr(decoded, "decode_array", counting)
    return seen


def _upload(s3: SeaweedS3, prefix: str, objects: dict[str, bytes]) -> str:
    for name, body in objects.items():
        s3.client().put_object(Bucket="pngrow", Key=f"data-cache-test/{prefix}/{name}", Body=body)
    return f"s3://pngrow/data-cache-test/{prefix}"


@pytest.mark.slow
def test_a_prefix_is_downloaded_and_decoded_once_per_cache(s3_env: SeaweedS3, tmp_path: Path,
                                                             decodes: list[str]) -> None:
    objects = {"a.png": _png((200, 10, 10)), "b.png": _png((10, 200, 10), 48)}
    uri = _upload(s3_env, "once/train", {**objects, "nested/ignored.png": b"not read"})
    size = sum(len(body) for body in objects.values())
    manifest = list_sources([uri, None], cache=str(tmp_path / "node1"))
    assert manifest.folders[uri] == list_folder(uri) and set(manifest.folders[uri]) == set(objects)
    before = bytes_fetched()
    images = load_images(uri, "train", manifest)
    assert images.names == ("a.png", "b.png") and images.source == uri
    assert bytes_fetched() - before == size and len(decodes) == 2
    # Another trial of the search, and another search (listed afresh): nothing downloaded, nothing decoded again.
    assert load_images(uri, "train", manifest).digest == images.digest and len(decodes) == 2
    assert fetch_folder(uri, list_sources([uri], cache=str(tmp_path / "node1"))).is_dir()
    assert bytes_fetched() - before == size
    # Another node (its own cache folder) downloads the data once too.
    fetch_folder(uri, Manifest(cache=str(tmp_path / "node2")))
    assert bytes_fetched() - before == 2 * size
    assert sorted(p.name for p in (tmp_path / "node2" / "objects").iterdir() if not p.name.startswith(".")) == sorted(
        f"{etag}-{length}" for etag, length in manifest.folders[uri].values())


@pytest.mark.slow
def test_a_folder_of_more_objects_than_a_listing_page_is_listed_and_fetched_whole(
        s3_env: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pngrow.pipeline import object_store

    objects = {f"{i:02d}.png": _png((i, 2 * i, 3 * i), 16) for i in range(7)}
    uri = _upload(s3_env, "pages/train", objects)
    monkeypatch.setattr(object_store, "LIST_PAGE", 3)
    first_page = s3_env.client().list_objects_v2(Bucket="pngrow", Prefix="data-cache-test/pages/train/", MaxKeys=3)
    assert first_page["IsTruncated"] and len(first_page["Contents"]) == 3  # the server pages at 3
    assert sorted(list_folder(uri)) == sorted(objects)
    images = load_images(uri, "train", list_sources([uri], cache=str(tmp_path / "cache")))
    assert images.names == tuple(sorted(objects))


@pytest.mark.slow
def test_an_object_that_changed_during_the_search_is_refused_in_one_line(s3_env: SeaweedS3, tmp_path: Path) -> None:
    uri = _upload(s3_env, "changed/train", {"a.png": _png((1, 2, 3)), "b.png": _png((4, 5, 6))})
    manifest = list_sources([uri], cache=str(tmp_path / "cache"))
    fetch_folder(uri, manifest)  # cached under the first ETag
    old = manifest.folders[uri]["a.png"][0]
    _upload(s3_env, "changed/train", {"a.png": _png((9, 9, 9))})
    new = object_info(f"{uri}/a.png")[0]
    assert new != old
    expected = f"S3 object '{uri}/a.png' changed during the search: ETag {old} when it started, now {new}"
    with pytest.raises(ValueError) as caught:
        fetch_folder(uri, manifest)
    assert str(caught.value) == expected
    with pytest.raises(ValueError, match="^S3 object .* changed during the search") as caught:
        download(f"{uri}/a.png", tmp_path / "a.png", old)  # S3 itself refuses the old ETag
    assert "\n" not in str(caught.value) and not (tmp_path / "a.png").exists()
    relisted = list_sources([uri], cache=str(tmp_path / "cache"))
    s3_env.client().delete_object(Bucket="pngrow", Key="data-cache-test/changed/train/b.png")
    with pytest.raises(ValueError, match="b.png' changed during the search: ETag .* now none \\(deleted\\)"):
        fetch_folder(uri, relisted)
    weights = _upload(s3_env, "changed", {"w.safetensors": b"first"}) + "/w.safetensors"
    listed = list_sources([], [weights], str(tmp_path / "cache"))
    assert fetch_file(weights, listed).read_bytes() == b"first"
    _upload(s3_env, "changed", {"w.safetensors": b"second"})
    with pytest.raises(ValueError, match=f"S3 object '{weights}' changed during the search"):
        fetch_file(weights, listed)


@pytest.mark.slow
def test_training_data_from_an_s3_folder_of_parquet_shards(s3_env: SeaweedS3, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    images = default_images("eval")
    write_shard(images, tmp_path / "part-0.parquet")
    uri = _upload(s3_env, "shards/train", {"part-0.parquet": (tmp_path / "part-0.parquet").read_bytes()})
    loaded = load_images(uri, "train", Manifest(cache=str(tmp_path / "cache")))
    assert loaded.names == ("part-0.parquet:astronaut", "part-0.parquet:chelsea")
    assert all(torch.equal(a, b) for a, b in zip(loaded.images, images.images))
    with pytest.raises(ValueError, match="S3 folder 's3://pngrow/shards/none' is empty or does not exist"):
        list_folder("s3://pngrow/shards/none")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(ValueError, match="cannot read 's3://pngrow/data-cache-test/shards/train'"):
        list_folder(uri)


def test_an_unwritable_cache_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "blocker").write_text("a file, so no folder can be made under it")
    cache = tmp_path / "blocker" / "cache"
    with pytest.raises(ValueError) as caught:  # a worker's check
        cache_folder(str(cache))
    assert str(caught.value) == f"cache folder '{cache}' cannot be written: Not a directory"
    # The driver's check, at plan time: one line, before any service starts.
    (tmp_path / "search.yaml").write_text(f"family: sisr\ntasks: [x2]\ndata: {{train: 's3://pngrow/train', "
                                          f"cache: '{cache}'}}\n")
    assert main(["search", str(tmp_path / "search.yaml"), "--workdir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"cache folder '{cache}' cannot be written: Not a directory" in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_a_folder_is_decoded_once_per_node_until_it_changes(tmp_path: Path, decodes: list[str]) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png((1, 0, 0)))
    node = Manifest(cache=str(tmp_path / "cache"))
    first = load_images(str(folder), "train", node)
    assert load_images(str(folder), "train", node).digest == first.digest and len(decodes) == 1
    (folder / "b.png").write_bytes(_png((0, 0, 0)))  # new content: decoded again, all of it
    second = load_images(str(folder), "train", node)
    assert second.names == ("a.png", "b.png") and second.digest != first.digest and len(decodes) == 3
    assert load_images(str(folder), "train", Manifest(cache=str(tmp_path / "node2"))).digest == second.digest
    assert len(decodes) == 5  # another node's cache decodes it once too


@pytest.mark.slow
def test_local_init_weights_reach_trials_through_the_artifact_store(s3_env: SeaweedS3, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from safetensors.torch import save_file

    from pngrow.pipeline.config import SearchConfig
    from pngrow.pipeline.plan import prepare
    from pngrow.pipeline.resume import CONFIG_ARTIFACT
    from pngrow.pipeline.search import _start_search_run
    from pngrow.pipeline.tracking import Tracking
    from pngrow.pipeline.records import TrialSpec
    from pngrow.pipeline.trial import run_trial
    from pngrow.workers.models import get_family
    from pngrow.workers.png import load_shared
    from pngrow.workers.settings import TaskSettings

    arch = {"width": 16, "depth": 1}
    family = get_family("sisr", ["x2"], **arch)
    torch.manual_seed(3)
    dense = family.build_model().state_dict()
    init = tmp_path / "dense.safetensors"
    save_file(dense, str(init))
    config = SearchConfig(family="sisr", tasks=["x2"], arch=arch, search_space="sisr-tiny", init=str(init),
                          eval_limit=1, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", workdir=str(tmp_path))
    tracking = Tracking(config.resolved_tracking_uri(), "init-test", "s3://pngrow/mlflow-init")
    search_id, plan = _start_search_run(prepare(config), tracking)
    assert plan.config.init == f"runs:/{search_id}/init/dense.safetensors"
    assert tracking.load_dict(search_id, CONFIG_ARTIFACT)["init"] == plan.config.init  # what a resume reads
    assert [a.path for a in MlflowClient(tracking.uri).list_artifacts(search_id, "init")] == ["init/dense.safetensors"]
    keys = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket="pngrow", Prefix="mlflow-init/")["Contents"]]
    assert any(k.endswith(f"{search_id}/artifacts/init/dense.safetensors") for k in keys)
    os.remove(init)  # the driver's file is gone: the trial reads the uploaded copy
    run_id = tracking.start_run("x2 trial 0", {}, parent=search_id)
    settings = TaskSettings(grow_steps=0, prune_steps=0, finetune_steps=0, batch_size=2)
    run_trial(TrialSpec(tracking_uri=tracking.uri, run_id=run_id, family="sisr", tasks=["x2"], arch=arch, task="x2",
                        parent_run=None, settings=asdict(settings), eval_limit=1, init=plan.config.init))
    checkpoint = tracking.download_checkpoint(run_id, tmp_path / "checkpoint")
    shared = load_shared(checkpoint, lambda a: get_family("sisr", a["tasks"], **arch).build_model())
    head = shared.layers["head"]
    owned = head.to_weight(head.owner == 0).expand_as(head.weight)
    assert owned.any() and torch.equal(head.weight[owned], dense["head.weight"][owned])


def _paired_folder(folder: Path) -> Path:
    """A paired SR folder (HR/ and LR_bicubic/X2/) with files pngrow does not read beside them."""
    for name, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        for sub, size, suffix in (("HR", 48, ""), ("LR_bicubic/X2", 24, "x2"), ("LR_unknown/X2", 24, "x2")):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            (folder / sub / f"{name}{suffix}.png").write_bytes(_png(colour, size))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_a_local_folder_the_driver_uploads_is_fetched_once_per_node(tmp_path: Path) -> None:
    from pngrow.pipeline.data_cache import fetch_upload, upload_folder
    from pngrow.pipeline.tracking import Tracking
    from pngrow.workers.data import load_folder

    folder = _paired_folder(tmp_path / "train")
    tracking = Tracking(f"sqlite:///{tmp_path}/mlflow.db", "upload-test", str(tmp_path / "artifacts"))
    run = tracking.start_run("search", {})
    uri = upload_folder(str(folder), tracking, run, "train")
    digest = uri.rsplit("/", 1)[-1]
    assert uri == f"runs:/{run}/data/train/{digest}" and len(digest) == 20
    stored = tmp_path / "artifacts" / run / "artifacts" / "data" / "train" / digest
    assert sorted(str(p.relative_to(stored)) for p in stored.rglob("*") if p.is_file()) == [
        "HR/a.png", "HR/b.png", "LR_bicubic/X2/ax2.png", "LR_bicubic/X2/bx2.png"]  # what pngrow reads, nothing else
    node1 = Manifest(cache=str(tmp_path / "node1"))
    images = load_images(uri, "train", node1, tracking)
    local = load_folder(folder)
    assert images.source == uri and images.names == local.names and images.digest == local.digest
    assert sorted(images.low_res) == [2]  # the paired layout survived the round trip
    cached = fetch_upload(uri, tracking, node1)
    assert cached == tmp_path / "node1" / "uploads" / digest
    # A copy that does not hold what the driver uploaded is refused in one line (on a node without it cached) ...
    (stored / "HR" / "a.png").write_bytes(_png((0, 0, 0), 48))
    with pytest.raises(ValueError, match=f"^artifact '{uri}' does not hold the data the driver uploaded: content "
                                         "digest [0-9a-f]{20}$"):
        fetch_upload(uri, tracking, Manifest(cache=str(tmp_path / "node2")))
    assert [p.name for p in (tmp_path / "node2" / "uploads").iterdir() if not p.name.startswith(".")] == []
    # ... and a node that has it cached downloads nothing: it reads its copy even with the artifacts gone.
    shutil.rmtree(stored)
    assert fetch_upload(uri, tracking, node1) == cached and (cached / "LR_bicubic" / "X2" / "bx2.png").is_file()
    with pytest.raises(ValueError, match="^data 'runs:/abc/init/w' is not a folder pngrow uploaded"):
        fetch_upload("runs:/abc/init/w", tracking, node1)
    with pytest.raises(ValueError, match="reading it needs the tracking server$"):
        load_images(f"runs:/{run}/data/eval/{'0' * 20}", "eval", node1)


def test_a_resumed_search_reads_the_copy_its_driver_uploaded(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from pngrow.pipeline.config import SearchConfig
    from pngrow.pipeline.plan import prepare
    from pngrow.pipeline.resume import recorded_config
    from pngrow.pipeline.search import _start_search_run, _upload_data
    from pngrow.pipeline.tracking import Tracking

    folder = _paired_folder(tmp_path / "data")
    config = SearchConfig(family="sisr", tasks=["x2"], arch={"width": 16, "depth": 1}, search_space="sisr-tiny",
                          train_data=str(folder), eval_data=str(folder), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                          workdir=str(tmp_path))
    tracking = Tracking(config.resolved_tracking_uri(), "resume-upload", str(tmp_path / "artifacts"))
    search_id, plan = _start_search_run(prepare(config), tracking, upload_data=True)
    uri = plan.config.train_data or ""
    assert uri.startswith(f"runs:/{search_id}/data/train/") and plan.config.eval_data == uri  # one upload for both
    tags = tracking.run(search_id).data.tags
    assert tags["pngrow.uploaded_data.train"] == tags["pngrow.uploaded_data.eval"] == str(folder)
    shutil.rmtree(folder)  # a resume needs nothing from the driver's disk
    resumed = prepare(recorded_config(tracking, search_id))
    assert resumed.config.train_data == resumed.config.eval_data == uri
    assert _upload_data(resumed, tracking, search_id, relog=True) is resumed  # nothing uploaded again
    assert [a.path for a in MlflowClient(tracking.uri).list_artifacts(search_id, "data")] == ["data/train"]
