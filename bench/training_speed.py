"""Training steps per second on this machine under each precision and memory order, side by side, and the quality
each reaches after the same steps (the same initial weights, seed and batches for every setting).

    python -m bench.training_speed nic --steps 600        # N=64, M=96 at q3, batches of 8 crops of 128x128
    python -m bench.training_speed sisr --steps 600       # EDSR width 32, depth 4, x2, batches of 16

Every setting trains its own copy of the model; they take turns in blocks of ``--block`` steps so that machine
noise hits them alike, and the median seconds per step of each is reported with its evaluation after the last step
(PSNR, and for a codec bpp from real bitstreams) on the first images of the evaluation folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from pngrow.workers.data import PatchSampler, load_folder
from pngrow.workers.models import Codec, get_family
from pngrow.workers.settings import TaskSettings
from pngrow.workers.training import _task_optimisers, training_loss

from . import require_at_least
from .compare import DATASETS, machine

__all__ = ["SETTINGS", "main"]

# What is compared: today's default first.
SETTINGS = {
    "float32": {},
    "channels_last": {"channels_last": True},
    "bfloat16": {"precision": "bfloat16"},
    "bfloat16+channels_last": {"precision": "bfloat16", "channels_last": True},
}
_MODELS = {"nic": ("q3", {"N": 64, "M": 96}, 8), "sisr": ("x2", {"width": 32, "depth": 4}, 16)}


def measure(family_name: str, steps: int, block: int, eval_images: int, seed: int) -> dict[str, Any]:
    """Train one copy of the family's model per setting for ``steps`` steps in turns; seconds per step and quality."""
    task, arch, batch_size = _MODELS[family_name]
    family = get_family(family_name, [task], **arch)
    train = load_folder(DATASETS / "train")
    evaluation = load_folder(DATASETS / ("kodak" if isinstance(family, Codec) else "set5")).limit(eval_images)
    runs = {}
    for name, options in SETTINGS.items():
        settings = replace(TaskSettings(grow_steps=steps, prune_steps=0, finetune_steps=0, prune_ratio=0.0,
                                        reuse="none", batch_size=batch_size, seed=seed), **options)
        torch.manual_seed(seed)
        shared = family.build_shared()
        shared.train()
        shared.begin_task(task, settings.block_shape, settings.reuse)
        if settings.channels_last:
            shared.model.to(memory_format=torch.channels_last)
        sampler = PatchSampler(train, family.patch_size(task), seed=seed)  # the same batches for every setting
        runs[name] = (settings, shared, _task_optimisers(shared, family, settings), sampler, [])
    for start in range(0, steps, block):
        for settings, shared, optimisers, sampler, seconds in runs.values():
            for _ in range(min(block, steps - start)):
                begun = time.perf_counter()
                batch = sampler.sample(batch_size, family.patch_size(task))
                loss, _ = training_loss(shared, family, task, settings, batch)
                optimisers.step(loss, lambda shared=shared: family.aux_loss(shared))
                seconds.append(time.perf_counter() - begun)
    results = {}
    for name, (settings, shared, _, _, seconds) in runs.items():
        shared.prune(0.0)
        family.before_commit(shared, task)
        shared.commit()
        shared.eval()
        results[name] = {"seconds_per_step": statistics.median(seconds[1:]),
                         **family.evaluate(shared, task, evaluation)}
    baseline = results["float32"]["seconds_per_step"]
    for entry in results.values():
        entry["speedup"] = baseline / entry["seconds_per_step"]
    return {"family": family_name, "task": task, "arch": arch, "batch_size": batch_size, "steps": steps,
            "eval_images": len(evaluation), "threads": torch.get_num_threads(), "results": results}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.training_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=sorted(_MODELS))
    parser.add_argument("--steps", type=int, default=600, help="training steps per setting (default 600)")
    parser.add_argument("--block", type=int, default=20, help="steps a setting runs before the next takes its turn")
    parser.add_argument("--eval-images", type=int, default=6, help="evaluation images (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default bench-results)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print a Markdown table and write ``--out/training-speed-<family>.json``."""
    parser = _parser()
    args = parser.parse_args(argv)
    require_at_least(parser, args, 1, "steps", "block", "eval_images")
    figures = measure(args.family, args.steps, args.block, args.eval_images, args.seed)
    figures.update(machine=machine("cpu"), date=time.strftime("%Y-%m-%d"),
                   command="python -m bench.training_speed " + " ".join(argv if argv is not None else sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"training-speed-{args.family}.json").write_text(json.dumps(figures, indent=2) + "\n")
    quality = [k for k in ("psnr", "bpp", "ms_ssim", "rd_loss") if k in next(iter(figures["results"].values()))]
    print(f"| setting | s/step | speedup | {' | '.join(quality)} |\n|---" + "|---" * (2 + len(quality)) + "|")
    for name, entry in figures["results"].items():
        print(f"| {name} | {entry['seconds_per_step']:.3f} | {entry['speedup']:.2f}x | "
              + " | ".join(f"{entry[k]:.3f}" for k in quality) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
