"""HR@K and NDCG@K for one held-out target per user, as a torchmetrics ``Metric``.

The states are sums (hits, discounted gains) and a user count, reduced with ``sum`` across processes, so
the distributed result equals the single-process one exactly when every user is evaluated once.
Ranks are 0-based positions of the target in the ranking; ties in scores are broken deterministically by
item index (the order a stable sort by descending score gives), see :func:`rank_of_target`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


def rank_of_target(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of ``target`` in each row of ``scores`` ``[B, num_items]``.

    A tie with a lower item index ranks ahead of the target, so results never depend on sort stability.
    """
    target_score = scores.gather(1, target[:, None])
    ahead = scores > target_score
    tied_before = (scores == target_score) & (torch.arange(scores.shape[1], device=scores.device)[None, :] < target[:, None])
    return (ahead | tied_before).sum(dim=1)


def rank_in_list(ranked_items: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based position of ``target`` in each row of ``ranked_items`` ``[B, K]``; ``K`` (a miss) if absent."""
    match = ranked_items == target[:, None]
    position = match.int().argmax(dim=1)
    return torch.where(match.any(dim=1), position, torch.full_like(position, ranked_items.shape[1]))


class TopKMetrics(Metric):
    """Hit ratio and NDCG at several cut-offs for a single relevant item per query.

    ``HR@K = mean(rank < K)`` and ``NDCG@K = mean(1 / log2(rank + 2) if rank < K else 0)`` (the ideal DCG of
    one relevant item is 1).

    Args:
        hr_ks: cut-offs of the hit ratio.
        ndcg_ks: cut-offs of NDCG.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, hr_ks: Sequence[int] = (1, 5, 10), ndcg_ks: Sequence[int] = (5, 10)) -> None:
        super().__init__()
        self.hr_ks = tuple(hr_ks)
        self.ndcg_ks = tuple(ndcg_ks)
        self.add_state("hits", torch.zeros(len(self.hr_ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("gains", torch.zeros(len(self.ndcg_ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @property
    def max_k(self) -> int:
        return max(self.hr_ks + self.ndcg_ks)

    def update(self, ranks: torch.Tensor) -> None:  # type: ignore[override]
        ranks = ranks.reshape(-1).to(self.hits.device)
        hr_ks = torch.tensor(self.hr_ks, device=ranks.device)
        ndcg_ks = torch.tensor(self.ndcg_ks, device=ranks.device)
        self.hits += (ranks[:, None] < hr_ks[None, :]).sum(dim=0).to(torch.float64)
        discount = 1.0 / torch.log2(ranks.to(torch.float64) + 2.0)
        self.gains += torch.where(ranks[:, None] < ndcg_ks[None, :], discount[:, None], 0.0).sum(dim=0)
        self.count += ranks.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.clamp(min=1).to(torch.float64)
        result = {f"hr@{k}": self.hits[i] / count for i, k in enumerate(self.hr_ks)}
        result.update({f"ndcg@{k}": self.gains[i] / count for i, k in enumerate(self.ndcg_ks)})
        return result
