"""Micro-structured blocks: a partition of a weight's (output x input) channel plane."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BlockGrid", "parse_block_shape"]


def parse_block_shape(text: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Read a block shape written ``"4x4"`` (or given as a pair) and check it.

    >>> parse_block_shape("8x2")
    (8, 2)
    """
    if isinstance(text, str):
        parts = text.lower().replace("*", "x").split("x")
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"block shape {text!r} is not of the form OUTxIN, e.g. 4x4") from None
    else:
        shape = tuple(int(p) for p in text)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"block shape {text!r} must be two positive channel counts OUTxIN, e.g. 4x4")
    return shape  # type: ignore[return-value]


@dataclass(frozen=True)
class BlockGrid:
    """Blocks of ``block_shape`` output x input channels over a channel plane of ``plane`` channels.

    Each block spans the whole kernel. Where a block shape does not divide the plane, the last row
    and column of blocks are smaller (edge blocks), so every channel pair is in exactly one block.
    A block side at least the plane's spans it whole: ``8x1024`` blocks are groups of 8 output channels.

    >>> grid = BlockGrid(plane=(10, 6), block_shape=(4, 4))
    >>> grid.shape
    (3, 2)
    >>> grid.expand(torch.tensor([[True, False], [False, False], [False, True]])).sum().item()
    20
    """

    plane: tuple[int, int]
    block_shape: tuple[int, int]

    @property
    def step(self) -> tuple[int, int]:
        """The block shape clipped to the plane."""
        (rows, cols), (bo, bi) = self.plane, self.block_shape
        return (min(rows, bo), min(cols, bi))

    @property
    def shape(self) -> tuple[int, int]:
        """Blocks along the output and the input channels."""
        (rows, cols), (bo, bi) = self.plane, self.step
        return (-(-rows // bo), -(-cols // bi))

    @property
    def num_blocks(self) -> int:
        """How many blocks the plane has."""
        return self.shape[0] * self.shape[1]

    def expand(self, block_values: torch.Tensor) -> torch.Tensor:
        """Per-block values (grid shaped) spread over the channel plane; differentiable."""
        (rows, cols), (bo, bi) = self.plane, self.step
        full = block_values.repeat_interleave(bo, dim=0).repeat_interleave(bi, dim=1)
        return full[:rows, :cols]

    def block_sum(self, plane_values: torch.Tensor) -> torch.Tensor:
        """Sum of plane values inside each block (grid shaped)."""
        (rows, cols), (bo, bi) = self.plane, self.step
        gr, gc = self.shape
        padded = plane_values.new_zeros((gr * bo, gc * bi))
        padded[:rows, :cols] = plane_values
        return padded.reshape(gr, bo, gc, bi).sum(dim=(1, 3))

    def block_any(self, plane_mask: torch.Tensor) -> torch.Tensor:
        """Whether any channel pair inside each block is set."""
        return self.block_sum(plane_mask.to(torch.float32)) > 0
