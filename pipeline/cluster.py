"""Ray, thinly: connect to a cluster (or start Ray in this process), run functions as tasks, wait for them.

Which Ray (:func:`ray_target`): the config's ``ray.address`` as given (``auto``, ``host:port``, ``ray://...``;
``local`` starts one here); with none, the cluster of the Ray job this driver runs in (``ray job submit`` sets
``RAY_ADDRESS``), else Ray started in this process, never a cluster that Ray's temp dir remembers. An address that
does not answer is one line (:class:`ValueError`) within seconds.

A trial asks for ``gpus_per_trial`` GPUs when the cluster has any (and ``ray.device`` is not ``cpu``), else
``cpus_per_trial`` CPUs; on its worker :func:`worker_device` decides what it trains on. The driver's S3 and MLflow
settings are forwarded to every worker (``runtime_env`` environment variables), so workers read and write the same
artifact store as the driver.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import ray

from .config import RayOptions
from .uris import redact

__all__ = ["FORWARDED_ENV", "Cluster", "RayTarget", "ask_actor", "node_id", "ray_target", "worker_device"]

T = TypeVar("T")
FORWARDED_ENV = (
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job's driver (runtime_env, metadata)
PROBE_SECONDS = 5.0  # how long a TCP connect to a Ray address may take before it counts as not answering
ACTOR_SECONDS = 60.0  # how long a worker waits for an actor's answer before it goes on without it
_CONNECT_ATTEMPTS = "2"  # Ray's GCS connect attempts (about 40 s each) once the address answers TCP
_CHOOSE = "choose another with ray.address in the config or --ray-address"


@dataclass(frozen=True)
class RayTarget:
    """What ``ray.init`` is given: ``address`` (``local`` starts Ray here), and where it came from, for messages."""

    address: str
    source: str  # "config", "RAY_ADDRESS" (a Ray job's driver) or "default"

    @property
    def starts_local(self) -> bool:
        return self.address == "local"

    def describe(self) -> str:
        shown = redact(self.address)
        return {"RAY_ADDRESS": f"{shown!r} (RAY_ADDRESS, the Ray job's cluster)", "config": f"{shown!r}"}.get(
            self.source, "a Ray started here")


def ray_target(options: RayOptions, environ: dict[str, str] | None = None) -> RayTarget:
    """Where this search's Ray is: the config's address as given; else ``RAY_ADDRESS`` (what ``ray job submit`` sets
    for a job's driver; an ``http(s)://`` dashboard address, set for the Jobs CLI, is not one ``ray.init`` takes and
    is passed over); else ``local``, a Ray started in this process (so that no stale ``ray_current_cluster`` file
    in Ray's temp dir is ever joined).

    >>> ray_target(RayOptions(), {}).address
    'local'
    >>> ray_target(RayOptions(), {"RAY_ADDRESS": "10.0.0.5:6379"})
    RayTarget(address='10.0.0.5:6379', source='RAY_ADDRESS')
    >>> ray_target(RayOptions(address="auto"), {"RAY_ADDRESS": "10.0.0.5:6379"}).address
    'auto'
    """
    environ = os.environ if environ is None else environ
    if options.address:
        return RayTarget(options.address, "config")
    job = environ.get("RAY_ADDRESS", "").strip()
    if job and not job.startswith(("http://", "https://")):
        return RayTarget(job, "RAY_ADDRESS")
    return RayTarget("local", "default")


def _host_port(address: str) -> tuple[str, int]:
    """The TCP endpoint of a Ray address (``host:port``, ``[v6]:port`` or ``ray://host[:port]``).

    >>> _host_port("ray://head.example:10001"), _host_port("[::1]:6379"), _host_port("ray://head")
    (('head.example', 10001), ('::1', 6379), ('head', 10001))
    """
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    rest = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    if rest.startswith("["):
        host, _, after = rest[1:].partition("]")
        port = after.removeprefix(":")
    elif rest.count(":") == 1:
        host, _, port = rest.partition(":")
    else:
        host, port = rest, ""
    if not port and scheme == "ray":
        port = "10001"  # Ray client's default port
    if not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not host:port, ray://host:port, auto or local; {_CHOOSE}")
    return host, int(port)


def _resolve_auto() -> str:
    """The GCS address ``auto`` means here (RAY_ADDRESS, Ray's ``ray_current_cluster`` file, a local GCS)."""
    from ray._private import services

    try:
        found = services.canonicalize_bootstrap_address("auto")
    except ConnectionError:
        found = None
    if not found:
        raise ValueError(f"ray.address 'auto' finds no running Ray cluster on this machine; start one with "
                         f"'ray start --head', or {_CHOOSE}")
    return found


def probe(target: RayTarget, timeout: float = PROBE_SECONDS) -> None:
    """A ``ValueError`` (one line naming the address) unless something answers TCP at the target's address."""
    if target.starts_local:
        return
    address = _resolve_auto() if target.address == "auto" else target.address
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc) or type(exc).__name__)
        via = f" ('auto' found {address!r})" if address != target.address else ""
        raise ValueError(f"no Ray cluster answers at {target.describe()}{via}: {reason.lower()}; start it, or "
                         f"{_CHOOSE}") from None


@contextmanager
def _few_connect_attempts() -> Iterator[None]:
    """Ray tries a GCS that does not answer 20 times, about 40 s each; a few are plenty once TCP answered (an operator's
    own ``RAY_gcs_server_port_wait_time_s`` is kept)."""
    key = "RAY_gcs_server_port_wait_time_s"
    if key in os.environ:
        yield
        return
    os.environ[key] = _CONNECT_ATTEMPTS
    try:
        yield
    finally:
        os.environ.pop(key, None)


def _job_env_vars(environ: dict[str, str]) -> set[str]:
    """The environment variables a Ray job's runtime_env already sets (ray.init refuses to set them again)."""
    try:
        config = json.loads(environ.get(_JOB_CONFIG) or "{}")
        return set(((config.get("runtime_env") or {}).get("env_vars") or {}))
    except (ValueError, AttributeError):
        return set()


def worker_device(assigned: str, setting: str, cuda_available: bool, gpu_ids: Sequence[Any] = (),
                  node: str = "") -> tuple[str, str]:
    """The torch device a trial trains on, and a warning ('' for none).

    ``assigned`` is what the driver asked Ray for (``cuda``: GPUs, ``cpu``: none); ``setting`` is ``ray.device``.
    A trial given GPUs uses the first one it sees (Ray sets ``CUDA_VISIBLE_DEVICES`` to the ones it assigned, so
    ``cuda`` is the first of them). Where Ray assigned a GPU but torch finds no CUDA (a node declaring GPUs it cannot
    drive), ``auto`` trains on the CPU with a warning and ``cuda`` fails the trial with one line.

    >>> worker_device("cuda", "auto", cuda_available=True, gpu_ids=[3])
    ('cuda', '')
    >>> worker_device("cuda", "auto", cuda_available=False, gpu_ids=[0], node="ab12")
    ('cpu', 'Ray assigned GPU 0 on node ab12 but torch finds no CUDA device there: training on the CPU')
    >>> worker_device("cpu", "auto", cuda_available=True)
    ('cpu', '')
    """
    if assigned != "cuda" or setting == "cpu":
        return "cpu", ""
    if cuda_available:
        return "cuda", ""
    gpus = ",".join(map(str, gpu_ids)) or "none"
    where = f"Ray assigned GPU {gpus} on node {node or socket.gethostname()} but torch finds no CUDA device there"
    if setting == "cuda":
        raise RuntimeError(f"device 'cuda' is not available: {where} (ray.device is cuda; auto would train on "
                           "the CPU)")
    return "cpu", f"{where}: training on the CPU"


def node_id() -> str:
    """This worker's Ray node id ('' outside Ray)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def ask_actor(actor: Any, method: str, *args: Any, timeout: float = ACTOR_SECONDS) -> Any:
    """What ``actor.method(*args)`` returns (an actor of :meth:`Cluster.actor`, asked from any worker); a
    ``ConnectionError`` (one line) when the actor is gone, does not answer within ``timeout`` seconds, or failed."""
    try:
        return ray.get(getattr(actor, method).remote(*args), timeout=timeout)
    except (ray.exceptions.RayError, TimeoutError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConnectionError(f"actor call {method} failed: {type(exc).__name__}: {first}") from None


def import_modules(modules: Sequence[str]) -> int:
    """Import ``modules`` in this process (what a worker warmed by :meth:`Cluster.warm` runs); returns its PID."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # not installed here: the trial that needs it fails naming it
    return os.getpid()


def gpu_ids() -> list[Any]:
    """The GPUs Ray assigned this worker (none outside Ray)."""
    return list(ray.get_gpu_ids()) if ray.is_initialized() else []


class Cluster:
    """A Ray connection for one search; ``close()`` disconnects (and stops Ray when it was started here).

    A process already connected to Ray (a notebook, a script that called ``ray.init``) keeps its connection, and
    ``close()`` leaves it open.
    """

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        self.target = ray_target(options)
        self._owned = not ray.is_initialized()
        if self._owned:
            self._connect()
        resources = ray.cluster_resources()
        self.gpus = float(resources.get("GPU", 0))
        self.cpus = float(resources.get("CPU", 0))
        self._remote: dict[Callable[..., Any], Any] = {}
        if options.device == "cuda" and (self.gpus <= 0 or options.gpus_per_trial <= 0):
            where = "here" if self.target.starts_local else f"at {self.target.describe()}"
            self.close()
            raise ValueError(f"ray.device is 'cuda' but the Ray cluster {where} has no GPUs; use device auto or "
                             f"cpu, or {_CHOOSE}")

    def _connect(self) -> None:
        target = self.target
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and k not in _job_env_vars(os.environ)}
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env} if env else None, "logging_level": "WARNING",
                                  "log_to_driver": False}
        if target.starts_local:
            kwargs.update(include_dashboard=False, num_cpus=self.options.num_cpus or os.cpu_count())
        elif "://" not in target.address:
            kwargs["include_dashboard"] = False
        probe(target)
        try:
            with _few_connect_attempts():
                ray.init(address=target.address, **kwargs)
        except (ConnectionError, RuntimeError, ray.exceptions.RayError) as exc:
            if target.starts_local:
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"cannot connect to the Ray cluster at {target.describe()}: {first}; {_CHOOSE}") from None

    @property
    def device(self) -> str:
        """What each trial asks Ray for: ``cuda`` (``gpus_per_trial`` GPUs) when the cluster has GPUs and
        ``ray.device`` is not ``cpu``; what it trains on is decided on its worker (:func:`worker_device`)."""
        asks = self.gpus > 0 and self.options.gpus_per_trial > 0 and self.options.device != "cpu"
        return "cuda" if asks else "cpu"

    @property
    def slots(self) -> int:
        """How many trials the cluster's alive nodes can hold at once (a trial runs on one node), read now, so that
        nodes joining (an autoscaler) or lost change it."""
        options = self.options
        key, per = ("GPU", options.gpus_per_trial) if self.device == "cuda" else ("CPU", options.cpus_per_trial)
        per = max(float(per), 1e-6)  # a trial that asks for nothing fits anywhere
        return max(1, sum(int(node["Resources"].get(key, 0) / per + 1e-9) for node in ray.nodes() if node["Alive"]))

    def submit(self, function: Callable[..., T], *args: Any, name: str | None = None) -> ray.ObjectRef:
        """Run ``function(*args)`` on a worker with one trial's resources, as the Ray task ``name`` (the function's
        name by default; the dashboard and the worker's process title, ``ray::NAME``, show it)."""
        if function not in self._remote:  # export each function to the cluster once
            gpus = self.options.gpus_per_trial if self.device == "cuda" else 0
            self._remote[function] = ray.remote(function).options(
                num_cpus=self.options.cpus_per_trial, num_gpus=gpus, max_retries=self.options.max_retries,
                name=name or function.__name__)
        return self._remote[function].remote(*args)

    def warm(self, modules: Sequence[str]) -> list[ray.ObjectRef]:
        """Import ``modules`` now in one worker per trial slot, so that the first trials start in workers that have
        them loaded (PyTorch takes seconds) instead of importing them before their first step. Nothing waits for
        these tasks: a trial queued behind one runs in its worker when it ends.

        Each asks for a trial's CPUs (so that each slot's worker takes one) and no GPU (importing needs none), spread
        over the nodes.
        """
        warm = ray.remote(import_modules).options(num_cpus=self.options.cpus_per_trial, num_gpus=0,
                                                  scheduling_strategy="SPREAD", name="warm_worker")
        return [warm.remote(tuple(modules)) for _ in range(self.slots)]

    @staticmethod
    def actor(cls: type, *args: Any) -> Any:
        """A Ray actor holding ``cls(*args)`` for this search's workers to call (:func:`ask_actor`); it asks for no
        CPU, so it never takes a trial's slot, and ends with this driver or at :meth:`end_actor`."""
        return ray.remote(cls).options(num_cpus=0, max_restarts=0).remote(*args)

    @staticmethod
    def end_actor(actor: Any) -> None:
        """Stop an actor of :meth:`actor`; one already gone, or a Ray that is gone, is left as it is."""
        try:
            ray.kill(actor, no_restart=True)
        except (ray.exceptions.RayError, ValueError, ConnectionError):
            pass

    @staticmethod
    def wait_one(refs: list[ray.ObjectRef]) -> ray.ObjectRef:
        """One of ``refs`` whose task has ended (blocks until one has)."""
        done, _ = ray.wait(refs, num_returns=1)
        return done[0]

    @staticmethod
    def result(ref: ray.ObjectRef) -> Any:
        """The function's return value; its exception (the original type) when it raised."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, Exception) else exc.as_instanceof_cause()) from None

    def close(self) -> None:
        """Disconnect from Ray (stopping it when it was started here); a connection made before is left open."""
        if self._owned:
            ray.shutdown()
