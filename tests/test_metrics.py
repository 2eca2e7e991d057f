"""HR@K / NDCG@K against hand-computed values, tie handling, and state reduction."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.metrics import TopKMetrics, rank_in_list, rank_of_target


def test_hand_computed_values():
    metric = TopKMetrics()
    metric.update(torch.tensor([0, 3, 7, 50]))  # ranks: top-1 hit, 4th, 8th, miss
    result = {key: float(value) for key, value in metric.compute().items()}
    assert result["hr@1"] == pytest.approx(1 / 4)
    assert result["hr@5"] == pytest.approx(2 / 4)
    assert result["hr@10"] == pytest.approx(3 / 4)
    assert result["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 4)
    assert result["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(9)) / 4)


def test_rank_of_target_breaks_ties_by_item_index():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert rank_of_target(scores, torch.tensor([2, 0])).tolist() == [2, 0]  # 0.9 and item 0 (tie) ahead
    assert rank_of_target(scores, torch.tensor([3, 4])).tolist() == [3, 4]


def test_rank_of_masked_target_is_a_miss():
    scores = torch.tensor([[0.1, float("-inf"), 0.3] + [0.0] * 20])
    assert rank_of_target(scores, torch.tensor([1])).item() == 22


def test_rank_in_list():
    ranked = torch.tensor([[4, 2, 9], [1, 2, 3]])
    assert rank_in_list(ranked, torch.tensor([9, 7])).tolist() == [2, 3]


def test_split_states_merge_to_the_whole():
    ranks = torch.randint(0, 30, (101,), generator=torch.Generator().manual_seed(0))
    whole, first, second = TopKMetrics(), TopKMetrics(), TopKMetrics()
    whole.update(ranks)
    first.update(ranks[:40])
    second.update(ranks[40:])
    first.merge_state(second)  # the same sum reduction DDP applies
    merged, expected = first.compute(), whole.compute()
    assert all(torch.equal(merged[key], expected[key]) for key in expected)


def test_empty_metric_is_zero():
    assert all(float(value) == 0.0 for value in TopKMetrics().compute().values())
