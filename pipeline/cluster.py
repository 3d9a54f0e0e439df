"""Ray, thinly: connect to a cluster (or start Ray in this process), run functions as tasks, wait for them.

A trial asks for ``gpus_per_trial`` GPUs when the cluster has any, else ``cpus_per_trial`` CPUs. The driver's S3 and
MLflow settings are forwarded to every worker (``runtime_env`` environment variables), so workers read and write the
same artifact store as the driver.
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import ray

from .config import RayOptions

__all__ = ["FORWARDED_ENV", "Cluster"]

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


class Cluster:
    """A Ray connection for one search; ``close()`` disconnects (and stops Ray when it was started here)."""

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "include_dashboard": False,
                                  "logging_level": "WARNING", "log_to_driver": False}
        if options.address is None:
            kwargs["num_cpus"] = options.num_cpus or os.cpu_count()
        try:
            ray.init(address=options.address, **kwargs)
        except ConnectionError as exc:
            raise ValueError(f"cannot connect to the Ray cluster at {options.address!r}: {exc}") from None
        resources = ray.cluster_resources()
        self.gpus = float(resources.get("GPU", 0))
        self.cpus = float(resources.get("CPU", 0))
        self._remote: dict[Callable[..., Any], Any] = {}

    @property
    def device(self) -> str:
        """The device each trial trains on: ``cuda`` when the cluster has GPUs."""
        return "cuda" if self.gpus > 0 and self.options.gpus_per_trial > 0 else "cpu"

    @property
    def slots(self) -> int:
        """How many trials the cluster can run at once, by its total resources."""
        if self.device == "cuda":
            return max(1, int(self.gpus // self.options.gpus_per_trial))
        return max(1, int(self.cpus // self.options.cpus_per_trial))

    def submit(self, function: Callable[..., T], *args: Any) -> ray.ObjectRef:
        """Run ``function(*args)`` on a worker with one trial's resources."""
        if function not in self._remote:  # export each function to the cluster once
            gpus = self.options.gpus_per_trial if self.device == "cuda" else 0
            self._remote[function] = ray.remote(function).options(
                num_cpus=self.options.cpus_per_trial, num_gpus=gpus, max_retries=self.options.max_retries
            )
        return self._remote[function].remote(*args)

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
        """Disconnect from Ray (stopping it when it was started here)."""
        ray.shutdown()
