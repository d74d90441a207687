"""init_weights' values are a function of (seed, name, element index) alone: any box of a parameter a rank holds
(FSDP's dim-0 shards, tensor parallelism's Shard(0) and Shard(1) columns, uneven and empty shards) is drawn as
exactly that box of the whole tensor, from the row blocks it overlaps only. tests/distributed checks the layouts
themselves against one process."""

import pytest
import torch

from trainers.model import INIT_ROWS, draw_normal


@pytest.mark.parametrize("offset, size", [
    ((0, 0), (50, 7)),    # the whole tensor
    ((13, 0), (20, 7)),   # rows starting and ending mid-block (an uneven FSDP shard)
    ((16, 0), (16, 7)),   # exactly one block
    ((0, 3), (50, 4)),    # a Shard(1) rank's columns
    ((17, 2), (30, 3)),   # both (FSDP over rowwise tensor parallelism)
    ((50, 0), (0, 7)),    # an empty trailing shard (torch.chunk gives the last ranks none)
])
def test_a_box_is_that_box_of_the_whole_tensor(offset, size):
    whole = draw_normal(3, "layers.0.attention.wq.weight", (50, 7), (0, 0), (50, 7), 0.02)
    box = draw_normal(3, "layers.0.attention.wq.weight", (50, 7), offset, size, 0.02)
    assert torch.equal(box, whole[offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]])


def test_values_depend_on_seed_name_and_block_only():
    whole = draw_normal(0, "w", (3 * INIT_ROWS, 5), (0, 0), (3 * INIT_ROWS, 5), 1.0)
    # a taller tensor of the same name shares its first blocks: rows are drawn block by block, not as one stream
    taller = draw_normal(0, "w", (5 * INIT_ROWS, 5), (0, 0), (3 * INIT_ROWS, 5), 1.0)
    assert torch.equal(whole, taller)
    assert not torch.equal(whole, draw_normal(1, "w", (3 * INIT_ROWS, 5), (0, 0), (3 * INIT_ROWS, 5), 1.0))
    assert not torch.equal(whole, draw_normal(0, "v", (3 * INIT_ROWS, 5), (0, 0), (3 * INIT_ROWS, 5), 1.0))
    blocks = whole.view(3, INIT_ROWS, 5)
    assert not torch.equal(blocks[0], blocks[1])  # each block its own generator, not one seed for all
    large = draw_normal(0, "w", (1024, 64), (0, 0), (1024, 64), 0.02)  # 65,536 draws: std error of the mean 8e-5
    assert abs(large.std().item() - 0.02) < 4e-4 and abs(large.mean().item()) < 4e-4
    vector = draw_normal(0, "b", (40,), (0,), (40,), 1.0)
    assert torch.equal(draw_normal(0, "b", (40,), (10,), (25,), 1.0), vector[10:35])
