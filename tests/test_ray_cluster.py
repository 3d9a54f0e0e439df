"""``ray_cluster.yaml`` is a cluster-launcher file Ray itself accepts, with GPU workers that install the project."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

FILE = Path(__file__).parents[1] / "ray_cluster.yaml"


def test_ray_accepts_the_cluster_file() -> None:
    config = prepare_config(yaml.safe_load(FILE.read_text()))
    validate_config(config)
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any("pip install -e ~/pngrow" in c for c in config["setup_commands"])
    assert config["file_mounts"] == {"~/pngrow": "."}
