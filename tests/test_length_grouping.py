"""The length-grouped training order of the LLM prompts (datamodules.prompts.length_grouped_order)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.prompts import length_grouped_order


def test_hand_made_order():
    # 8 rows, batch 2: one mega-batch of 2 rows (8 // 8 = 1), so every batch is sorted by decreasing length
    lengths = np.array([5, 1, 7, 3, 3, 9, 2, 4])
    order = length_grouped_order(lengths, 2, torch.Generator().manual_seed(0))
    shuffled = torch.randperm(8, generator=torch.Generator().manual_seed(0)).numpy()
    pairs = [sorted(shuffled[i : i + 2].tolist(), key=lambda row: -lengths[row]) for i in range(0, 8, 2)]
    longest = max(range(4), key=lambda pair: lengths[pairs[pair][0]])
    pairs[0][0], pairs[longest][0] = pairs[longest][0], pairs[0][0]
    assert order.tolist() == [row for pair in pairs for row in pair]
    assert order[0] == 5 and sorted(order.tolist()) == list(range(8))


@pytest.mark.parametrize(("size", "batch_size"), [(0, 4), (1, 4), (37, 4), (1000, 8), (5000, 3)])
def test_same_order_as_the_transformers_helper_it_replaces(size, batch_size):
    helpers = pytest.importorskip("transformers.trainer_pt_utils")
    lengths = np.random.default_rng(size).integers(1, 30, size)  # many ties: their order must match as well
    ours = length_grouped_order(lengths, batch_size, torch.Generator().manual_seed(3))
    if size == 0:
        assert ours.tolist() == []
        return
    theirs = helpers.get_length_grouped_indices(
        lengths.tolist(), batch_size, generator=torch.Generator().manual_seed(3)
    )
    assert ours.tolist() == theirs
