"""HR@K and NDCG@K for one held-out target per user, as a torchmetrics ``Metric``.

The states are integer counts (targets per rank position below the largest cut-off, and users), reduced with
``sum`` across processes, so the distributed result equals the single-process one exactly, bit for bit,
when every user is evaluated once.
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
    tied_before = (scores == target_score) & (
        torch.arange(scores.shape[1], device=scores.device)[None, :] < target[:, None]
    )
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
        # Integer counts of targets at each rank < max_k: sums of integers are exact in any order, so the
        # distributed result equals the single-process one bit for bit (float partial sums would not).
        self.add_state("rank_counts", torch.zeros(self.max_k, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @property
    def max_k(self) -> int:
        return max(self.hr_ks + self.ndcg_ks)

    def update(self, ranks: torch.Tensor) -> None:  # type: ignore[override]
        if self.rank_counts.device != ranks.device:
            # The states follow the ranks (never the reverse, a device->host copy per batch): under DeepSpeed ZeRO-3
            # the module is never moved with .to(), and states left on the CPU cannot be gathered over NCCL.
            self.to(ranks.device)
        ranks = ranks.reshape(-1)
        self.rank_counts += torch.bincount(ranks[ranks < self.max_k], minlength=self.max_k)
        self.count += ranks.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.clamp(min=1).to(torch.float64)
        counts = self.rank_counts.to(torch.float64)
        cumulative_hits = counts.cumsum(0)
        discount = 1.0 / torch.log2(torch.arange(self.max_k, dtype=torch.float64, device=counts.device) + 2.0)
        cumulative_gain = (counts * discount).cumsum(0)
        result = {f"hr@{k}": cumulative_hits[k - 1] / count for k in self.hr_ks}
        result.update({f"ndcg@{k}": cumulative_gain[k - 1] / count for k in self.ndcg_ks})
        return result
