"""How long one convolution takes at each number of computed output channels, on this machine: a compacted layer is
only faster when its channel count is one the device's kernels compute faster, which is not proportional to the
count (oneDNN on AVX-512, for one: 56 of 64 outputs cost as much as 64, and 24 as much as 32).

    python -m bench.channels --channels 64 --size 96
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from pngrow.errors import failure_line
from pngrow.workers.latency import median_latencies

from . import require_at_least

__all__ = ["conv_times", "main"]


def conv_times(channels: int, size: int, step: int = 8, kernel: int = 3, rounds: int = 60,
               device: str = "cpu") -> dict[int, float]:
    """Median milliseconds of a ``kernel`` x ``kernel`` convolution from ``channels`` inputs to each output count
    ``channels, channels - step, ..., step`` on a ``size`` x ``size`` input, all counts taking turns round after
    round.

    >>> sorted(conv_times(16, 8, step=8, rounds=2))
    [8, 16]
    """
    x = torch.randn(1, channels, size, size, device=device)
    convs = {n: nn.Conv2d(channels, n, kernel, padding=kernel // 2).to(device) for n in range(channels, 0, -step)}
    ms = median_latencies({str(n): (lambda conv=conv: conv(x)) for n, conv in convs.items()}, rounds, x.device)
    return {n: ms[str(n)] for n in convs}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.channels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=64, help="the layer's input and full output channels")
    parser.add_argument("--size", type=int, default=96, help="side of the square input")
    parser.add_argument("--step", type=int, default=8, help="output counts from --channels down by this")
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write {count: ms} here as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Print each output count's median time and its share of the full layer's."""
    parser = _parser()
    args = parser.parse_args(argv)
    require_at_least(parser, args, 1, "channels", "size", "step", "kernel", "rounds")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as error:  # a CPU-only torch asserts on cuda
        parser.error(f"--device {args.device!r}: {failure_line(error)}")
    times = conv_times(args.channels, args.size, args.step, args.kernel, args.rounds, args.device)
    print(f"{args.kernel}x{args.kernel} conv, {args.channels} inputs, {args.size}x{args.size}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    for n, ms in times.items():
        print(f"{n:5d} outputs ({n / args.channels:.2f} of them): {ms:8.3f} ms, {ms / times[args.channels]:.2f} of "
              f"the full layer's time")
    if args.out is not None:
        args.out.write_text(json.dumps(times, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
