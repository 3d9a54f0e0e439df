"""A search on a local Ray cluster of separate node processes, as ``ray up`` would give: a head that runs no trial
and ``--nodes`` worker nodes, each with its own CPUs (and logical GPUs), all ended by their PIDs (never ``ray
stop``). Reports what the search's run measured: wall time, the share outside training and slot utilisation.

    python -m bench.cluster search_spaces/examples/small-sisr.yaml --nodes 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from .local_services import BIN, RayHead, RayNode, cluster_nodes, short_tempdir

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="the search's YAML")
    parser.add_argument("--nodes", type=int, default=3, help="worker nodes (default 3)")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="logical GPUs per node (default 0)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where the summary JSON goes")
    return parser


def _start(root: Path, nodes: int, cpus: int, gpus: int) -> tuple[RayHead, list[RayNode]]:
    """A head with no CPUs for trials, and ``nodes`` worker nodes, started and joined."""
    head = RayHead(root / "ray", num_cpus=0)
    head.root.mkdir()
    head.start()
    workers = [RayNode(head, root / f"node{i}.log", num_cpus=cpus, num_gpus=gpus) for i in range(nodes)]
    for node in workers:
        node.start()
    cluster_nodes(head, nodes + 1)
    return head, workers


def main(argv: Sequence[str] | None = None) -> int:
    """Start the cluster, run ``pngrow search CONFIG`` against it as its own process, print and save the figures."""
    args = _parser().parse_args(argv)
    if args.nodes < 1 or args.cpus_per_node < 1 or args.gpus_per_node < 0:
        _parser().error(f"--nodes {args.nodes}, --cpus-per-node {args.cpus_per_node} must be at least 1 and "
                        f"--gpus-per-node {args.gpus_per_node} at least 0")
    root = short_tempdir("pngrow-bc-")
    config = args.config.resolve()
    head, workers = _start(root, args.nodes, args.cpus_per_node, args.gpus_per_node)
    try:
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **head.env()}
        start = time.monotonic()
        done = subprocess.run([str(BIN / "pngrow"), "search", str(config), "--ray-address", head.address,
                               "--workdir", str(root / "runs"), "--json", str(root / "summary.json"), "--quiet"],
                              cwd=config.parent, env=env, capture_output=True, text=True)
        seconds = time.monotonic() - start
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        summary = json.loads((root / "summary.json").read_text())
    finally:
        for node in workers:
            node.stop()
        head.stop()
        shutil.rmtree(root, ignore_errors=True)
    summary.update(nodes=args.nodes, cpus_per_node=args.cpus_per_node, gpus_per_node=args.gpus_per_node,
                   driver_seconds=seconds, config=str(args.config))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cluster-{config.stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{config.stem} on {args.nodes} nodes x {args.cpus_per_node} CPU: {summary['trials']} trials in "
          f"{summary['wall_seconds']:.0f} s, outside training {summary['overhead']:.1%}, slot utilisation "
          f"{summary['utilisation']:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
