from __future__ import annotations

import pytest
import torch

from pngrow.workers.png import BlockGrid, parse_block_shape


@pytest.mark.parametrize("plane, block, grid", [((8, 8), (4, 4), (2, 2)), ((10, 6), (4, 4), (3, 2)), ((3, 1), (2, 4), (2, 1))])
def test_edge_blocks_cover_every_channel_pair_once(plane, block, grid) -> None:
    g = BlockGrid(plane, block)
    assert g.shape == grid
    ids = torch.arange(g.num_blocks).reshape(g.shape)
    owner = g.expand(ids)
    assert owner.shape == plane
    assert sorted(owner.unique().tolist()) == list(range(g.num_blocks))
    sizes = g.block_sum(torch.ones(plane))
    assert sizes.sum().item() == plane[0] * plane[1]
    assert sizes[-1, -1].item() == (plane[0] - (grid[0] - 1) * block[0]) * (plane[1] - (grid[1] - 1) * block[1])


def test_block_sum_and_any_agree_with_expand() -> None:
    g = BlockGrid((10, 6), (4, 4))
    values = torch.rand(10, 6)
    sums = g.block_sum(values)
    for r in range(3):
        for c in range(2):
            assert torch.isclose(sums[r, c], values[4 * r : 4 * r + 4, 4 * c : 4 * c + 4].sum())
    mask = torch.zeros(10, 6, dtype=torch.bool)
    mask[9, 5] = True
    assert g.block_any(mask).tolist() == [[False, False], [False, False], [False, True]]


@pytest.mark.parametrize("text", ["4", "0x4", "4x-1", "ax4", "4x4x4", ""])
def test_bad_block_shape_is_named(text: str) -> None:
    with pytest.raises(ValueError, match="block shape"):
        parse_block_shape(text)


def test_block_shape_forms() -> None:
    assert parse_block_shape("8X2") == (8, 2)
    assert parse_block_shape((1, 16)) == (1, 16)
