"""Which Ray a search joins (the embedded default, a Ray job's cluster, an explicit address), how a Ray address that
does not answer is reported, and what device a trial trains on."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from pngrow.errors import ConfigError
from pngrow.pipeline import cluster as cluster_module
from pngrow.pipeline.cli import main
from pngrow.pipeline.cluster import Cluster, RayTarget, probe, ray_target, worker_device
from pngrow.pipeline.config import RayOptions, SearchConfig, flat_params, load_config
from tests.services import free_ports, short_tempdir


# --- addresses -----------------------------------------------------------------------------------------------------
def test_the_embedded_default_starts_its_own_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_target(RayOptions()) == RayTarget("local", "default")
    assert ray_target(RayOptions(), {"RAY_ADDRESS": "http://127.0.0.1:8265"}).address == "local"  # the Jobs CLI's


@pytest.mark.parametrize("address", ["auto", "10.0.0.5:6379", "ray://head:10001", "local"])
def test_an_explicit_address_is_used_as_given(address: str) -> None:
    assert ray_target(RayOptions(address=address), {"RAY_ADDRESS": "10.9.9.9:6379"}) == RayTarget(address, "config")


class _FakeRay:
    """Stands in for ray.init and the cluster's resources; records what ray.init was given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, resources: dict[str, float],
                 nodes: list[dict[str, Any]] | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.shutdowns = 0
        self.nodes = nodes if nodes is not None else [{"Alive": True, "Resources": resources}]
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", lambda **kwargs: self.calls.append(kwargs))
        monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
        monkeypatch.setattr(ray, "nodes", lambda: self.nodes)
        monkeypatch.setattr(ray, "shutdown", self._shutdown)
        monkeypatch.setattr(cluster_module, "probe", lambda target: None)

    def _shutdown(self) -> None:
        self.shutdowns += 1


def test_inside_a_ray_job_the_driver_joins_the_jobs_cluster_without_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeRay(monkeypatch, {"CPU": 8.0})
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # what `ray job submit` gives the job's driver
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://s3:9000")
    job_config = {"runtime_env": {"env_vars": {"AWS_ACCESS_KEY_ID": "AK"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job_config))
    Cluster(RayOptions(num_cpus=3)).close()
    (call,) = fake.calls
    assert call["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in call and "num_gpus" not in call  # Ray refuses them for an existing cluster
    # The job's runtime_env already sets AWS_ACCESS_KEY_ID (ray.init refuses to set it again); the rest is forwarded.
    assert call["runtime_env"] == {"env_vars": {"MLFLOW_S3_ENDPOINT_URL": "http://s3:9000"}}


def test_the_embedded_default_passes_local_and_its_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeRay(monkeypatch, {"CPU": 3.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(RayOptions(num_cpus=3))
    assert (fake.calls[0]["address"], fake.calls[0]["num_cpus"]) == ("local", 3)
    assert (cluster.device, cluster.slots) == ("cpu", 3)
    cluster.close()
    assert fake.shutdowns == 1


def test_slots_are_what_each_alive_node_holds_read_as_nodes_come_and_go(monkeypatch: pytest.MonkeyPatch) -> None:
    node = lambda cpus, gpus=0.0, alive=True: {"Alive": alive, "Resources": {"CPU": cpus, "GPU": gpus}}  # noqa: E731
    fake = _FakeRay(monkeypatch, {"CPU": 3.0, "GPU": 2.0}, [node(1.0), node(1.0, 1.0), node(1.0, 1.0)])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(RayOptions(num_cpus=3, gpus_per_trial=1.0))
    assert (cluster.device, cluster.slots) == ("cuda", 2)
    fake.nodes[2]["Alive"] = False  # a GPU node lost
    assert cluster.slots == 1
    fake.nodes += [node(4.0, 2.0)]  # a node with two GPUs joins (an autoscaler)
    assert cluster.slots == 3
    cpu = Cluster(RayOptions(num_cpus=3, cpus_per_trial=2, device="cpu"))
    fake.nodes[:] = [node(1.0), node(1.0), node(3.0)]
    assert cpu.slots == 1  # a trial runs on one node: the one-CPU nodes hold no 2-CPU trial, the 3-CPU node one


def test_a_process_already_connected_to_ray_keeps_its_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeRay(monkeypatch, {"CPU": 2.0})
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    Cluster(RayOptions()).close()
    assert fake.calls == [] and fake.shutdowns == 0


def _dead_port() -> int:
    return free_ports(1)[0]


def test_a_dead_address_is_one_line_within_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    port = _dead_port()
    begun = time.monotonic()
    with pytest.raises(ValueError) as caught:
        Cluster(RayOptions(address=f"127.0.0.1:{port}"))
    assert time.monotonic() - begun < 10
    message = str(caught.value)
    assert f"no Ray cluster answers at '127.0.0.1:{port}'" in message and "\n" not in message
    assert "ray.address in the config or --ray-address" in message
    with pytest.raises(ValueError, match=r"ray://127\.0\.0\.1:\d+'.*--ray-address"):
        probe(RayTarget(f"ray://127.0.0.1:{port}", "config"))
    with pytest.raises(ValueError, match=rf"'127\.0\.0\.1:{port}' \(RAY_ADDRESS, the Ray job's cluster\)"):
        probe(RayTarget(f"127.0.0.1:{port}", "RAY_ADDRESS"))
    with pytest.raises(ValueError, match="'head' is not host:port"):
        probe(RayTarget("head", "config"))


def test_the_cli_reports_a_dead_address_in_one_line(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = _dead_port()
    (tmp_path / "search.yaml").write_text("family: sisr\ntasks: [x2]\nsearch_space: sisr-tiny\n")
    begun = time.monotonic()
    assert main(["search", str(tmp_path / "search.yaml"), "--workdir", str(tmp_path / "runs"),
                 "--ray-address", f"127.0.0.1:{port}", "--quiet"]) == 2
    assert time.monotonic() - begun < 60
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"pngrow: error: no Ray cluster answers at '127.0.0.1:{port}'")
    assert errors[0].endswith("choose another with ray.address in the config or --ray-address")
    assert not (tmp_path / "runs").exists()  # checked before any run or store was created


def test_a_stale_current_cluster_file_does_not_touch_the_embedded_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray remembers the last `ray start` head in <temp>/ray/ray_current_cluster; after that head is gone, the
    embedded default still starts its own Ray, and only 'auto' (which reads the file) reports the dead address."""
    root = short_tempdir("pngrow-rt-")
    try:
        (root / "ray").mkdir()
        port = _dead_port()
        (root / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
        monkeypatch.setenv("RAY_TMPDIR", str(root))
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        # 'auto' takes a running GCS process first (other Ray heads may run on this machine), then the file.
        from ray._private import services

        monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset())
        begun = time.monotonic()
        with pytest.raises(ValueError, match=rf"no Ray cluster answers at 'auto' \('auto' found '[\d.]+:{port}'\)"):
            Cluster(RayOptions(address="auto"))
        assert time.monotonic() - begun < 10
        monkeypatch.undo()
        monkeypatch.setenv("RAY_TMPDIR", str(root))
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        cluster = Cluster(RayOptions(num_cpus=1))
        try:
            assert cluster.cpus == 1 and ray.is_initialized()
            assert ray.get(ray.remote(lambda: 6 * 7).remote()) == 42
        finally:
            cluster.close()
        assert not ray.is_initialized()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _imported(module: str) -> tuple[bool, int]:
    """Whether this worker has ``module`` imported, and its PID (a trial's stand-in)."""
    import os
    import sys

    return module in sys.modules, os.getpid()


def test_the_first_trials_run_in_workers_warmed_while_the_driver_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each slot's worker imports PyTorch and the trial's code once, before the first trials are even submitted, and
    those trials (queued behind the warm-up) run in the warmed workers instead of importing it themselves."""
    root = short_tempdir("pngrow-rt-")
    monkeypatch.setenv("RAY_TMPDIR", str(root))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(RayOptions(num_cpus=2, cpus_per_trial=1))
    try:
        module = "xml.dom.minidom"  # no Ray worker imports it by itself
        warming = cluster.warm([module])
        trials = [cluster.submit(_imported, module) for _ in range(cluster.slots)]  # queued behind the warm-up
        warmed = set(ray.get(warming))
        assert [loaded for loaded, _ in ray.get(trials)] == [True, True]
        assert {pid for _, pid in ray.get(trials)} <= warmed and len(warmed) == cluster.slots
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


# --- devices -------------------------------------------------------------------------------------------------------
def test_a_trial_uses_the_gpu_ray_assigned_it() -> None:
    assert worker_device("cuda", "auto", cuda_available=True, gpu_ids=[2]) == ("cuda", "")
    assert worker_device("cuda", "cuda", cuda_available=True, gpu_ids=[0]) == ("cuda", "")


def test_a_trial_asked_for_no_gpu_or_set_to_cpu_trains_on_the_cpu() -> None:
    assert worker_device("cpu", "auto", cuda_available=True) == ("cpu", "")
    assert worker_device("cuda", "cpu", cuda_available=True, gpu_ids=[0]) == ("cpu", "")


def test_a_logical_gpu_without_cuda_falls_back_with_a_warning_or_fails_under_cuda() -> None:
    device, warning = worker_device("cuda", "auto", cuda_available=False, gpu_ids=[1], node="n1")
    assert device == "cpu"
    assert warning == "Ray assigned GPU 1 on node n1 but torch finds no CUDA device there: training on the CPU"
    with pytest.raises(RuntimeError) as caught:
        worker_device("cuda", "cuda", cuda_available=False, gpu_ids=[1], node="n1")
    assert str(caught.value).startswith("device 'cuda' is not available: Ray assigned GPU 1 on node n1")
    assert "\n" not in str(caught.value)


def test_what_trials_ask_for_follows_the_device_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    _FakeRay(monkeypatch, {"CPU": 4.0, "GPU": 2.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert (Cluster(RayOptions()).device, Cluster(RayOptions()).slots) == ("cuda", 2)
    assert (Cluster(RayOptions(device="cpu")).device, Cluster(RayOptions(device="cpu")).slots) == ("cpu", 4)
    assert Cluster(RayOptions(device="cuda", gpus_per_trial=0.5)).slots == 4


def test_cuda_on_a_cluster_without_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeRay(monkeypatch, {"CPU": 4.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="ray.device is 'cuda' but the Ray cluster here has no GPUs"):
        Cluster(RayOptions(device="cuda"))
    assert fake.shutdowns == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ray: {device: gpu}", "ray field 'device' is 'gpu', not one of auto, cpu, cuda"),
        ("ray: {device: 0}", "ray field 'device' is 0, not str"),
        ("ray: {device: cuda, gpus_per_trial: 0}", "ray field 'device' is 'cuda' but 'gpus_per_trial' is 0"),
    ],
)
def test_a_bad_device_is_refused_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "s.yaml").write_text(f"family: sisr\ntasks: [x2]\n{text}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "s.yaml")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_device_setting_is_read_and_recorded(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("family: sisr\ntasks: [x2]\nray: {device: cpu, address: local}\n")
    config = load_config(tmp_path / "s.yaml")
    assert (config.ray.device, config.ray.address) == ("cpu", "local")
    assert load_config(tmp_path / "s.yaml", {"ray": {}}).ray.device == "auto"
    assert flat_params(SearchConfig(family="sisr", tasks=["x2"]))["ray.device"] == "auto"
