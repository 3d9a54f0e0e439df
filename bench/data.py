"""Searches on DIV2K-size data: decoded once per node, in bounded memory, at full speed.

    python -m bench.data make DIR --images 800          # a DIV2K-size set (2040x1356 PNGs) from ../shared's photos
    python -m bench.data search DIR                     # the tiny example on it, embedded Ray: memory and time
    python -m bench.data search DIR --nodes 2           # ... on a head plus two worker nodes (2 trials each)
    python -m bench.data feed DIR                       # patches per second against an EDSR-baseline step's need
    python -m bench.data paging DIR --memory 2e9        # the step rate when the set is larger than the memory
    python -m bench.data eval DIR --images 100          # evaluation on 100 such images: time and memory

``search`` samples every process of every node twice a second (/proc/PID/smaps_rollup): each Ray worker's peak
private memory (anonymous: its heap) and shared memory (file pages it maps: the decoded set), each node's peak
proportional set size (PSS, shared pages split among the processes mapping them, so a set mapped by every worker
counts once) and the machine's memory in use; the search itself reports each trial's time to its first step, its
time, and the share of the wall time outside training; each node's cache reports its decode time. ``--env`` adds to
the environment of the search's processes (an older checkout's PYTHONPATH, for a before-and-after). Every Ray process
is ended by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from . import require_at_least

__all__ = ["main"]

DATASETS = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
EXAMPLE = Path(__file__).resolve().parent.parent / "search_spaces" / "examples" / "tiny-sisr.yaml"
DIV2K_SIZE = (2040, 1356)


# --- make: a DIV2K-size set ---------------------------------------------------------------------------------------
def _make_one(job: tuple[Path, Path, int]) -> int:
    """Write one 2040x1356 PNG made from a source photo: a crop of DIV2K's aspect ratio whose place and flips vary
    with ``variant`` (so the set's images differ), resized. Returns the file's bytes."""
    from PIL import Image, ImageOps

    source, out, variant = job
    with Image.open(source) as img:
        photo = img.convert("RGB")
    if photo.height > photo.width:
        photo = photo.transpose(Image.Transpose.ROTATE_90)
    width, height = DIV2K_SIZE
    crop_w = min(photo.width, round(photo.height * width / height))
    crop_h = round(crop_w * height / width)
    rng = random.Random(variant)
    left, top = rng.randint(0, photo.width - crop_w), rng.randint(0, photo.height - crop_h)
    photo = photo.crop((left, top, left + crop_w, top + crop_h)).resize(DIV2K_SIZE, Image.Resampling.LANCZOS)
    if variant % 2:
        photo = ImageOps.mirror(photo)
    if variant // 2 % 2:
        photo = ImageOps.flip(photo)
    photo.save(out)
    return out.stat().st_size


def make_set(folder: Path, images: int, source: Path = DATASETS / "train") -> dict[str, Any]:
    """``images`` PNGs of 2040x1356 in ``folder`` (``0001.png``, ...), made from the photos in ``source`` by all of
    the machine's cores; files already there are kept."""
    photos = sorted(p for p in source.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not photos:
        raise ValueError(f"no photos in {str(source)!r} to make the set from")
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(photos[i % len(photos)], folder / f"{i + 1:04d}.png", i) for i in range(images)]
    todo = [job for job in jobs if not job[1].exists()]
    start = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_make_one, todo, chunksize=4))
    size = sum(out.stat().st_size for _, out, _ in jobs)
    return {"folder": str(folder), "images": images, "size": list(DIV2K_SIZE), "png_bytes": size,
            "pixel_bytes": images * 3 * DIV2K_SIZE[0] * DIV2K_SIZE[1], "made": len(todo),
            "seconds": time.perf_counter() - start}


# --- search: the tiny example on the set, its memory sampled -------------------------------------------------------
def _smaps(pid: int) -> dict[str, int]:
    """A process's memory from the kernel's accounting, in bytes: Rss, Pss, Anonymous (its private heap)."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0]) * 1024
    return values


def _pixels_resident(pid: int) -> int:
    """Bytes of decoded pixel files (the node cache's ``pixels.u8``) a process has resident: its mapped data."""
    total, counting = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if not line[:1].isupper() or ":" not in line.split()[0]:  # a mapping's header line: address range, path
            counting = line.rstrip().endswith("/pixels.u8")
        elif counting and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def _in_use() -> int:
    """The machine's memory in use (total less available: page cache that can be dropped is not in use)."""
    info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}
    return info["MemTotal"] - info["MemAvailable"]


@dataclass
class _WorkerPeak:
    node: str
    private: int = 0  # anonymous memory: the process's own heap (the decoded set, where it is decoded into it)
    mapped_pixels: int = 0  # resident pages of the node cache's decoded pixel files it maps
    rss: int = 0  # everything resident, libraries included


@dataclass
class MemorySampler:
    """Samples every process under each node's root process twice a second; keeps each Ray worker's peaks, each
    node's peak PSS (every process of the node summed) and the machine's peak memory in use."""

    roots: dict[str, int]  # node name -> the PID its processes descend from
    interval: float = 0.5
    workers: dict[int, _WorkerPeak] = field(default_factory=dict)
    node_pss: dict[str, int] = field(default_factory=dict)
    idle: int = field(default_factory=_in_use)
    peak_in_use: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for node, root in self.roots.items():
                self._sample(node, root)
            self.peak_in_use = max(self.peak_in_use, _in_use() - self.idle)

    def _sample(self, node: str, root: int) -> None:
        import psutil

        try:
            processes = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
        except psutil.Error:
            return
        pss = 0
        for process in processes:
            try:
                memory, title = _smaps(process.pid), " ".join(process.cmdline())
                pixels = _pixels_resident(process.pid) if title.startswith("ray::") else 0
            except (OSError, psutil.Error):
                continue
            pss += memory["Pss"]
            if title.startswith("ray::") and "IDLE" not in title:
                peak = self.workers.setdefault(process.pid, _WorkerPeak(node))
                peak.private = max(peak.private, memory["Anonymous"])
                peak.mapped_pixels = max(peak.mapped_pixels, pixels)
                peak.rss = max(peak.rss, memory["Rss"])
        self.node_pss[node] = max(self.node_pss.get(node, 0), pss)


def _search_config(folder: Path, trials_per_stage: int, parallel: int | None) -> dict[str, Any]:
    """The tiny SISR example with ``folder`` as its training data and the given trials."""
    config = yaml.safe_load(EXAMPLE.read_text())
    config["name"] = f"tiny-sisr-on-{folder.name}"
    config["data"] = {**(config.get("data") or {}), "train": str(folder)}
    config["budget"] = {**config["budget"], "trials_per_stage": trials_per_stage,
                        "parallel_trials": parallel if parallel else "auto"}
    return config


def _trial_figures(workdir: Path) -> list[dict[str, Any]]:
    """Each trial of the search in ``workdir``'s tracking store: its task, node, times and time to its first step."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pngrow")
    runs = client.search_runs([experiment.experiment_id], "tags.`pngrow.kind` = 'trial'")
    return [{"task": run.data.tags.get("pngrow.task"), "node": run.data.tags.get("pngrow.ray_node", "")[:8],
             **{key: run.data.metrics.get(key) for key in ("trial_seconds", "train_seconds", "first_step_seconds")}}
            for run in runs]


def _decode_seconds(cache: Path) -> list[float]:
    """How long each set in a node's cache took to decode (as its index records it)."""
    indexes = [json.loads(p.read_text()) for p in sorted(cache.glob("decoded/*/index.json"))]
    return [index["decode_seconds"] for index in indexes if "decode_seconds" in index]


@dataclass
class SearchRun:
    """One search on the set: what the search reported, its trials, and the memory sampled."""

    label: str
    nodes: int
    wall_seconds: float
    summary: dict[str, Any]
    trials: list[dict[str, Any]]
    memory: MemorySampler
    decode_seconds: dict[str, list[float]]

    def row(self) -> dict[str, Any]:
        """The run's figures per node, as the README table gives them."""
        by_task: dict[str, list[float]] = {}
        for trial in self.trials:
            by_task.setdefault(trial["task"], []).append(trial["trial_seconds"] or float("nan"))
        first_steps = sorted(t["first_step_seconds"] for t in self.trials if t["first_step_seconds"] is not None)
        workers = list(self.memory.workers.values())
        return {"run": self.label, "nodes": self.nodes, "wall_seconds": self.wall_seconds,
                "outside_training": self.summary.get("overhead"),
                "phase_seconds": self.summary.get("phase_seconds", {}),
                "trial_outside_training_seconds": statistics.mean(
                    (t["trial_seconds"] or 0) - (t["train_seconds"] or 0) for t in self.trials),
                "stage_trial_seconds": {task: statistics.mean(v) for task, v in by_task.items()},
                "first_step_seconds": first_steps,
                "decode_seconds": self.decode_seconds,
                "worker_private_bytes": max((w.private for w in workers), default=0),
                "worker_mapped_pixel_bytes": max((w.mapped_pixels for w in workers), default=0),
                "workers": [vars(w) for w in workers], "node_pss_bytes": dict(self.memory.node_pss),
                "machine_in_use_bytes": self.memory.peak_in_use}


def run_search(folder: Path, root: Path, label: str, nodes: int, caches: list[Path],
               extra_env: dict[str, str]) -> SearchRun:
    """The tiny example on ``folder``: Ray in-process (``nodes`` 0, two trials at a time), or a head that runs no
    trial and ``nodes`` worker nodes of 2 CPUs, each with its cache folder of ``caches``; ``extra_env`` is added to
    the environment of the search's driver and nodes."""
    from .local_services import RayHead, RayNode, cluster_nodes

    trials = 2 if nodes == 0 else 2 * nodes
    config, workdir = root / f"{label}.yaml", root / f"runs-{label}"
    config.write_text(yaml.safe_dump(_search_config(folder, trials, 2 if nodes == 0 else None)))
    command = [str(Path(sys.executable).parent / "pngrow"), "search", str(config), "--workdir", str(workdir),
               "--json", str(root / f"{label}.json"), "--quiet"]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **extra_env}
    head, workers, roots = None, [], {}
    try:
        if nodes:
            head = RayHead(root / f"ray-{label}", num_cpus=0)
            head.root.mkdir()
            head.start()
            workers = [RayNode(head, root / f"node{i + 1}-{label}.log", num_cpus=2,
                               env={**extra_env, "PNGROW_CACHE": str(cache)})
                       for i, cache in enumerate(caches[:nodes])]
            for node in workers:
                node.start()
            cluster_nodes(head, nodes + 1)
            command += ["--ray-address", head.address]
            env.update(head.env())
            roots = {f"node{i + 1}": node.process.pid for i, node in enumerate(workers)}
        else:
            env["PNGROW_CACHE"] = str(caches[0])
        start = time.monotonic()
        # cwd: Ray puts the driver's working directory on its workers' path, which must not shadow --env's
        driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=root)
        with MemorySampler({**roots, "driver" if nodes else "node": driver.pid}) as memory:
            out, err = driver.communicate()
        wall = time.monotonic() - start
        if driver.returncode:
            raise RuntimeError(f"pngrow search failed ({driver.returncode}): {err.strip()[-2000:]}")
    finally:
        for node in workers:
            node.stop()
        if head is not None:
            head.stop()
    summary = json.loads((root / f"{label}.json").read_text())
    names = [f"node{i + 1}" for i in range(nodes)] or ["node"]
    return SearchRun(label, nodes, wall, summary, _trial_figures(workdir), memory,
                     {name: _decode_seconds(cache) for name, cache in zip(names, caches)})


# --- feed: patches per second against what a step consumes ---------------------------------------------------------
def _drop_pages(path: Path) -> None:
    """Evict a file's pages from the page cache (they are clean: nothing is lost), so the next reads go to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _pixel_file(cache: Path, folder: Path) -> Path:
    from pngrow.workers.decoded import set_key

    return cache / "decoded" / set_key(folder) / "pixels.u8"


def _patches_per_second(sampler: Any, scale: int, seconds: float) -> float:
    """Batches of 16 HR patches with their bicubic LR, as the SISR loss makes them, for ``seconds``."""
    from pngrow.workers.models.sisr import bicubic_downscale

    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        bicubic_downscale(sampler.sample(16, sampler.patch), scale)
        count += 16
    return count / (time.perf_counter() - start)


def feed(folder: Path, cache: Path, seconds: float) -> dict[str, Any]:
    """Patches per second from the mapped set (pages resident, then read from disk) against an EDSR-baseline
    (width 64, depth 16) x2 training step's need on this machine (batch 16 of 48x48 LR patches, BasicSR's)."""
    import torch

    from pngrow.workers.data import PatchSampler, load_folder
    from pngrow.workers.models import get_family
    from pngrow.workers.training import Optimisers

    images = load_folder(folder, cache)
    family = get_family("sisr", ["x2"], width=64, depth=16, lr_patch=48, skip="none")
    sampler = PatchSampler(images, family.patch_size("x2"), seed=0)
    warm = _patches_per_second(sampler, 2, seconds)
    _drop_pages(_pixel_file(cache, folder))
    cold = _patches_per_second(sampler, 2, seconds)
    shared = family.build_shared()
    shared.train()
    shared.begin_task("x2", (8, 1024), "learned")
    optimisers = Optimisers.build([{"params": shared.trainable_parameters()["weights"], "lr": 1e-4}], [], (10,))
    steps = []
    for _ in range(4):
        batch = sampler.sample(16, sampler.patch)
        start = time.perf_counter()
        loss, _ = family.loss(shared, "x2", batch)
        optimisers.step(loss, lambda: None)
        steps.append(time.perf_counter() - start)
    step = statistics.median(steps[1:])
    return {"images": len(images), "patch": sampler.patch, "threads": torch.get_num_threads(),
            "sampler_patches_per_second_resident": warm, "sampler_patches_per_second_from_disk": cold,
            "edsr_baseline_step_seconds": step, "edsr_baseline_patches_per_second": 16 / step}


# --- paging: training when the set is larger than the memory -------------------------------------------------------
_TRAIN_FOR = """
import json, resource, sys, time
import torch
from pngrow.workers.data import PatchSampler, load_folder
from pngrow.workers.models import get_family
from pngrow.workers.training import Optimisers
folder, cache, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
torch.set_num_threads(1)
family = get_family("sisr", ["x2"], width=16, depth=2, lr_patch=16)  # the tiny example's model and patches
sampler = PatchSampler(load_folder(folder, cache), family.patch_size("x2"), seed=0)
shared = family.build_shared()
shared.train()
shared.begin_task("x2", (4, 4), "learned")
optimisers = Optimisers.build([{"params": shared.trainable_parameters()["weights"], "lr": 1e-3}], [], (10**6,))
faults, steps, start = resource.getrusage(resource.RUSAGE_SELF).ru_majflt, 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    loss, _ = family.loss(shared, "x2", sampler.sample(8, sampler.patch))
    optimisers.step(loss, lambda: None)
    steps += 1
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"steps_per_second": steps / (time.perf_counter() - start), "major_faults": usage.ru_majflt - faults,
                  "peak_rss_bytes": usage.ru_maxrss * 1024}))
"""


def _memory_cgroup(limit: int) -> Path:
    """A new memory cgroup (v1 or v2) capped at ``limit`` bytes, page cache included (needs root)."""
    v1 = Path("/sys/fs/cgroup/memory")
    group = (v1 if v1.is_dir() else Path("/sys/fs/cgroup")) / f"pngrow-bench-{os.getpid()}"
    group.mkdir()
    (group / ("memory.limit_in_bytes" if v1.is_dir() else "memory.max")).write_text(str(limit))
    return group


def _train_for(folder: Path, cache: Path, seconds: float, group: Path | None) -> dict[str, Any]:
    """Train the tiny example's model for ``seconds`` in a child process (in ``group`` when given)."""
    enter = None if group is None else (lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
    done = subprocess.run([sys.executable, "-c", _TRAIN_FOR, str(folder), str(cache), str(seconds)],
                          capture_output=True, text=True, preexec_fn=enter, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode:
        raise RuntimeError(f"training child failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def paging(folder: Path, cache: Path, limit: int, seconds: float) -> dict[str, Any]:
    """The tiny example's training step rate from the mapped set with its pages resident, and in a process whose
    memory (page cache included) is capped at ``limit`` bytes, under the set's size, its pages read from disk."""
    from pngrow.workers.data import load_folder

    size = sum(image.numel() for image in load_folder(folder, cache).images)
    pixels = _pixel_file(cache, folder)
    with open(pixels, "rb") as file:  # every page resident
        while file.read(1 << 24):
            pass
    resident = _train_for(folder, cache, seconds, None)
    _drop_pages(pixels)
    group = _memory_cgroup(limit)
    try:
        capped = _train_for(folder, cache, seconds, group)
    finally:
        group.rmdir()
    return {"set_bytes": size, "memory_limit_bytes": limit, "resident": resident, "capped": capped}


# --- eval: evaluation on many large images --------------------------------------------------------------------------
_EVALUATE = """
import json, resource, sys, time
import torch
from pngrow.workers.data import load_folder
from pngrow.workers.models import get_family
folder, cache, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(2)
family = get_family("sisr", ["x2"], width=16, depth=2, lr_patch=16)  # the tiny example's model
shared = family.build_shared().eval()
shared.begin_task("x2", (4, 4), "learned")
shared.prune(0.5)
shared.commit()
images = load_folder(folder, cache).limit(count)
start = time.perf_counter()
metrics = family.evaluate(shared, "x2", images)
seconds = time.perf_counter() - start
print(json.dumps({"images": len(images), "seconds": seconds, "seconds_per_image": seconds / len(images),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **metrics}))
"""


def evaluation(folder: Path, cache: Path, count: int) -> dict[str, Any]:
    """Evaluate the tiny example's model (x2) on the first ``count`` images of the set, in a child process: its time
    and its peak resident memory."""
    done = subprocess.run([sys.executable, "-c", _EVALUATE, str(folder), str(cache), str(count)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode:
        raise RuntimeError(f"evaluation child failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the command line ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make", help="make a DIV2K-size set of PNGs from ../shared's photos")
    make.add_argument("--images", type=int, default=800)
    make.add_argument("--source", type=Path, default=DATASETS / "train", help="photos to make it from")
    search = commands.add_parser("search", help="the tiny example on the set (cold, then warm caches)")
    search.add_argument("--nodes", type=int, default=0, help="worker nodes of 2 CPUs (0: Ray in the driver)")
    search.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="added to the driver's and nodes' environment, e.g. PYTHONPATH=OLD_CHECKOUT (with "
                             "pngrow/workers, pngrow/pipeline, pngrow/search_spaces linked to its folders) to measure "
                             "an older pngrow")
    feed_ = commands.add_parser("feed", help="patches per second against an EDSR-baseline step's need")
    feed_.add_argument("--seconds", type=float, default=10.0)
    page = commands.add_parser("paging", help="the step rate when the set is larger than the memory (root)")
    page.add_argument("--memory", type=float, default=2e9, help="the memory cap in bytes (default 2e9)")
    page.add_argument("--seconds", type=float, default=60.0)
    evaluate = commands.add_parser("eval", help="evaluation time and memory on the set's first images")
    evaluate.add_argument("--images", type=int, default=100)
    for sub in (make, search, feed_, page, evaluate):
        sub.add_argument("folder", type=Path, help="the set's folder")
        sub.add_argument("--out", type=Path, default=Path("bench-results"), help="where the JSON goes")
    for sub in (feed_, page, evaluate):
        sub.add_argument("--cache", type=Path, default=None, help="the node cache (default: PNGROW_CACHE, ...)")
    return parser


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from pngrow.workers.decoded import cache_folder

    if args.command == "make":
        return make_set(args.folder, args.images, args.source)
    if args.command == "search":
        root = Path(tempfile.mkdtemp(prefix="pngrow-bd-", dir="/tmp"))  # short: Ray's socket paths
        caches = [root / f"cache-node{i + 1}" for i in range(max(1, args.nodes))]
        extra = dict(pair.split("=", 1) for pair in args.env)
        runs = [run_search(args.folder, root, label, args.nodes, caches, extra) for label in ("cold", "warm")]
        return {"folder": str(args.folder), "root": str(root), "runs": [run.row() for run in runs]}
    cache = cache_folder(args.cache)
    if args.command == "feed":
        return feed(args.folder, cache, args.seconds)
    if args.command == "paging":
        return paging(args.folder, cache, int(args.memory), args.seconds)
    return evaluation(args.folder, cache, args.images)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one measurement, print its figures as JSON and write them to ``--out/data-<command>.json``."""
    parser = _parser()
    args = parser.parse_args(argv)
    require_at_least(parser, args, 1, *(name for name in ("images", "seconds", "memory") if name in vars(args)))
    if args.command != "make" and not args.folder.is_dir():
        parser.error(f"set folder {str(args.folder)!r} does not exist (make it with: python -m bench.data make DIR)")
    if getattr(args, "nodes", 0) < 0:
        parser.error(f"--nodes {args.nodes} must be at least 0")
    result = {"command": "python -m bench.data " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), **_run(args)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"data-{args.command}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
