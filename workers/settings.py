"""How one task is trained, as plain data: :class:`TaskSettings`, which a search space varies and a Ray worker
receives. Reading or sending settings needs no PyTorch; making them checks the block shape with the PnG core's
parser, imported then."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PRECISIONS", "TaskSettings", "native_precision"]

# How a task's forward passes compute: float32, or autocast to bfloat16 (weights and optimiser stay float32), which
# CPUs with AVX-512 BF16 or AMX and recent GPUs run about twice as fast.
PRECISIONS = ("float32", "bfloat16")
# The CPU features that compute bfloat16 in hardware (/proc/cpuinfo); elsewhere autocast emulates it, slower.
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def native_precision(device: str = "cpu") -> str:
    """``"bfloat16"`` where ``device`` computes it in hardware (a CPU with AVX-512 BF16 or AMX, a CUDA GPU that
    supports it), else ``"float32"``.

    >>> native_precision("cpu") in PRECISIONS
    True
    """
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return "float32"
    return "bfloat16" if any(flag in flags for flag in _BF16_CPU_FLAGS) else "float32"


@dataclass(frozen=True)
class TaskSettings:
    """How one task is grown, pruned and fine-tuned.

    ``grow_steps`` train the free blocks (and learn the selection of earlier ones); ``prune_steps`` keep training
    while the task's blocks are released on CPG's cubic schedule up to ``prune_ratio`` in ``prune_events`` evenly
    spaced steps (the first of 10 events releases 27% of what is released, the first of 100 3%);
    ``finetune_steps`` train the kept blocks with every mask fixed. ``reuse_penalty`` weighs the fraction of earlier
    blocks selected.
    ``prune_scope`` says which blocks pruning releases: ``own`` (the task's new blocks; PackNet and CPG) or ``active``
    (its reused earlier blocks compete too, so every task computes with at most ``1 - prune_ratio`` of the blocks it
    could use and frees whole channels when blocks span a layer's inputs: the compacted task is faster).
    ``paired`` prunes only the channel pairs the family declares (SISR: the two convolutions of each residual block),
    and the task's head in the active scope: an inner channel is released from both layers at once, so the compacted
    task neither computes nor reads it, and the residual stream keeps every channel. Pairs are pruned by as many
    channels as ``block_shape`` has outputs.

    ``grow_from`` (one of the core's :data:`~.png.GROWTHS`) says where a later task's free blocks start (the first task
    grows from the model as built, or from the initial weights it is given). ``precision`` is one of :data:`PRECISIONS`;
    ``channels_last`` keeps images and activations in NHWC memory order, which oneDNN's CPU convolutions (and GPU
    tensor cores) run faster. Neither changes what is learned per step
    beyond float rounding (measured: docs/benchmark.md).

    >>> TaskSettings(block_shape="8x2", grow_steps=10).block_shape, TaskSettings(grow_steps=10).total_steps
    ((8, 2), 210)
    """

    block_shape: tuple[int, int] = (4, 4)
    prune_ratio: float = 0.5
    reuse: str = "learned"
    grow_steps: int = 300
    prune_steps: int = 100
    prune_events: int = 10
    finetune_steps: int = 100
    batch_size: int = 8
    lr: float = 5e-4
    selection_lr: float = 1e-3
    reuse_penalty: float = 0.0
    prune_scope: str = "own"
    paired: bool = False
    seed: int = 0
    grow_from: str = "fresh"
    precision: str = "float32"
    channels_last: bool = False

    def __post_init__(self) -> None:
        from .png import GROWTHS, PRUNE_SCOPES, parse_block_shape  # the core's vocabulary: PyTorch, once made

        object.__setattr__(self, "block_shape", parse_block_shape(self.block_shape))
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(f"prune ratio {self.prune_ratio!r} is outside [0, 1)")
        for name in ("grow_steps", "prune_steps", "finetune_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)!r} is negative")
        if isinstance(self.prune_events, bool) or not isinstance(self.prune_events, int) or self.prune_events < 1:
            raise ValueError(f"prune_events {self.prune_events!r} must be a whole number, at least 1")
        if self.batch_size < 1:
            raise ValueError(f"batch size {self.batch_size!r} must be at least 1")
        if self.prune_scope not in PRUNE_SCOPES:
            raise ValueError(f"prune scope {self.prune_scope!r} is not one of {', '.join(PRUNE_SCOPES)}")
        for name in ("paired", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} {getattr(self, name)!r} is not true or false")
        if self.grow_from not in GROWTHS:
            raise ValueError(f"grow_from {self.grow_from!r} is not one of {', '.join(GROWTHS)}")
        if self.grow_from == "zero" and self.paired:
            raise ValueError("grow_from 'zero' does not go with paired: a released channel pair would never learn")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not (self.lr > 0 and self.selection_lr > 0):
            raise ValueError(f"learning rates must be positive (lr {self.lr!r}, selection_lr {self.selection_lr!r})")

    @property
    def total_steps(self) -> int:
        """Steps of the whole task's training: grow, prune and fine-tune."""
        return self.grow_steps + self.prune_steps + self.finetune_steps
