"""Faults at random moments of real searches: on a local Ray cluster (a head and worker nodes, each its own process)
with the real services (PostgreSQL for MLflow and Optuna, SeaweedFS S3 artifacts behind an MLflow server), kill a
trial's worker process, a worker node's raylet, or the search's driver (then ``pngrow resume`` it), and count what
the fault cost:

* finished trials lost (a trial FINISHED before the fault that is not FINISHED after): target 0;
* finished trials re-run (a trial FINISHED before the fault whose run ended again later): target 0;
* runs left RUNNING once the search (and its resume) ended: target 0;
* the wall time the fault cost: the search's wall time against the median of ``--clean`` clean searches'.

    python -m bench.chaos search_spaces/examples/tiny-sisr.yaml --faults 10 --nodes 2

Not a CI test: it runs ``--clean + 3 x --faults`` searches. The services and every Ray process are ended by their PIDs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import psutil
from mlflow import MlflowClient

from . import require_at_least
from .local_services import BIN, MlflowServer, Postgres, RayHead, RayNode, SeaweedS3, cluster_nodes, short_tempdir

__all__ = ["KINDS", "main"]

KINDS = ("worker", "node", "driver")


@dataclass
class Outcome:
    """What one fault cost its search."""

    kind: str
    at_seconds: float
    search_id: str
    finished_before: int
    lost: int
    rerun: int
    left_running: int
    wall_seconds: float
    resumes: int


class Lab:
    """The services and the Ray cluster of a chaos run, started once, ended by their PIDs."""

    def __init__(self, root: Path, nodes: int) -> None:
        self.root, self.started = root, []  # type: ignore[var-annotated]
        self.postgres = self._start(Postgres(root / "pg"), ["mlflow", "optuna"])
        self.s3 = self._start(SeaweedS3(root / "s3", bucket="pngrow"))
        self.mlflow = self._start(MlflowServer(root, self.postgres.url("mlflow"), "s3://pngrow/mlflow", self.s3.env()))
        self.head = self._start(RayHead(root / "ray", num_cpus=0))
        self.nodes = [self.add_node() for _ in range(nodes)]
        cluster_nodes(self.head, nodes + 1)
        self.client = MlflowClient(self.mlflow.uri)

    def _start(self, service, *args):  # noqa: ANN001, ANN202 - the services of .local_services
        service.root.mkdir(exist_ok=True)
        service.start(*args)
        self.started.append(service)
        return service

    def add_node(self) -> RayNode:
        node = RayNode(self.head, self.root / f"node-{time.monotonic_ns()}.log", num_cpus=1)
        node.start()
        return node

    def env(self) -> dict[str, str]:
        return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **self.s3.env(), **self.head.env()}

    def pngrow(self, *args: str) -> subprocess.Popen:
        """``pngrow ARGS`` against the lab's services and cluster, in its own session (killed as a whole)."""
        services = ["--tracking-uri", self.mlflow.uri, "--optuna-storage", self.postgres.url("optuna"),
                    "--ray-address", self.head.address, "--quiet"]
        return subprocess.Popen([str(BIN / "pngrow"), *args, *services], env=self.env(), cwd=self.root,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        for service in reversed(self.started):
            service.stop()


def _runs(lab: Lab, search_id: str | None = None) -> list:
    experiment = lab.client.get_experiment_by_name("pngrow")
    if experiment is None:
        return []
    query = f"tags.`pngrow.search_id` = '{search_id}'" if search_id else ""
    return lab.client.search_runs([experiment.experiment_id], query, max_results=5000)


def _newest_search(lab: Lab, known: set[str]) -> str | None:
    return next((r.info.run_id for r in _runs(lab) if r.data.tags.get("pngrow.kind") == "search"
                 and r.info.run_id not in known), None)


def _inject(lab: Lab, kind: str, driver: subprocess.Popen, rng: random.Random) -> bool:
    """Kill a trial's worker process, a worker node's raylet (a new node joins in its place) or the driver."""
    if kind == "driver":
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
        return True
    if kind == "worker":
        workers = [p for node in lab.nodes for p in _processes(node) if "ray::run_trial" in _cmdline(p)]
        if not workers:
            return False
        rng.choice(workers).kill()
        return True
    node = rng.choice(lab.nodes)
    raylets = [p for p in _processes(node) if "raylet" in _cmdline(p).split(" ", 1)[0]]
    for raylet in raylets:
        raylet.kill()
    node.stop()
    lab.nodes.remove(node)
    lab.nodes.append(lab.add_node())
    return bool(raylets)


def _processes(node: RayNode) -> list[psutil.Process]:
    try:
        return psutil.Process(node.process.pid).children(recursive=True)  # type: ignore[union-attr]
    except psutil.NoSuchProcess:
        return []


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # ended meanwhile
        return ""


def _snapshot(lab: Lab, search_id: str) -> dict[str, float]:
    """This search's FINISHED trials, by run id, with their end times."""
    return {r.info.run_id: r.info.end_time for r in _runs(lab, search_id)
            if r.data.tags.get("pngrow.kind") == "trial" and r.info.status == "FINISHED"}


def one_fault(lab: Lab, config: Path, kind: str, delay: float, rng: random.Random) -> Outcome | None:
    """Run a search, inject ``kind`` after ``delay`` seconds, see the search to its end (resuming a killed driver),
    and count what the fault cost; None when the search ended before the fault could land."""
    known = {r.info.run_id for r in _runs(lab)}
    start = time.monotonic()
    driver = lab.pngrow("search", str(config))
    while time.monotonic() - start < delay and driver.poll() is None:
        time.sleep(0.2)
    search_id = _newest_search(lab, known)
    if driver.poll() is not None or search_id is None:
        driver.wait()
        return None
    before = _snapshot(lab, search_id)
    if not _inject(lab, kind, driver, rng):
        driver.wait()
        return None
    resumes = 0
    while driver.wait() != 0 and resumes < 3:  # a killed driver: resumed, as a user would
        resumes += 1
        driver = lab.pngrow("resume", search_id)
    after = _snapshot(lab, search_id)
    return Outcome(kind, delay, search_id, len(before), sum(r not in after for r in before),
                   sum(r in after and after[r] != before[r] for r in before),
                   sum(r.info.status == "RUNNING" for r in _runs(lab, search_id)), time.monotonic() - start, resumes)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="the search's YAML (its services are the lab's)")
    parser.add_argument("--faults", type=int, default=10, help="faults of each kind (default 10; 0: clean only)")
    parser.add_argument("--clean", type=int, default=3,
                        help="clean searches first; their median is the reference wall time (default 3)")
    parser.add_argument("--nodes", type=int, default=2, help="one-CPU worker nodes (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    return parser


def _summary(outcomes: list[Outcome], clean: float) -> str:
    lines = ["| fault | landed | finished trials lost | finished trials re-run | runs left RUNNING | resumes | "
             "extra wall time (median) |", "|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        mine = [o for o in outcomes if o.kind == kind]
        extra = sorted(o.wall_seconds - clean for o in mine)
        median = f"{extra[len(extra) // 2]:+.0f} s" if extra else "n/a"
        lines.append(f"| {kind} | {len(mine)} | {sum(o.lost for o in mine)} | {sum(o.rerun for o in mine)} | "
                     f"{sum(o.left_running for o in mine)} | {sum(o.resumes for o in mine)} | {median} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``--clean`` clean searches for the reference wall time (their median), then ``--faults`` faults of each kind
    at random moments."""
    parser = _parser()
    args = parser.parse_args(argv)
    require_at_least(parser, args, 0, "faults")
    require_at_least(parser, args, 1, "clean", "nodes")
    rng, root = random.Random(args.seed), short_tempdir("pngrow-chaos-")
    config = args.config.resolve()
    shutil.copy(config, root / config.name)
    lab = Lab(root, args.nodes)
    outcomes: list[Outcome] = []
    try:
        cleans = []
        for _ in range(args.clean):
            start = time.monotonic()
            assert lab.pngrow("search", config.name).wait() == 0, "the clean search failed"
            cleans.append(time.monotonic() - start)
        clean = statistics.median(cleans)
        for kind in [k for _ in range(args.faults) for k in KINDS]:
            landed = None
            while landed is None:  # a fault that came after the search ended is drawn again, earlier
                landed = one_fault(lab, Path(config.name), kind, rng.uniform(0.1, 0.9) * clean, rng)
            outcomes.append(landed)
            print(json.dumps(asdict(landed)), flush=True)
    finally:
        lab.close()
        shutil.rmtree(root, ignore_errors=True)
    table = _summary(outcomes, clean)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaos.json").write_text(json.dumps({"clean_seconds": clean, "clean_runs": cleans,
                                                     "faults": [asdict(o) for o in outcomes]}, indent=2) + "\n")
    print(f"clean search: {clean:.0f} s (median of {', '.join(f'{c:.0f}' for c in cleans)})\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
