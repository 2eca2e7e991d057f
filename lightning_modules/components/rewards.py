"""Rewards of rollout groups for stage 4 (GRPO), pure functions of item ids.

Every function takes ``items`` ``[B, G]`` (one group of rollout items per prompt, ``-1`` = no valid rollout) and
returns float ``[B, G]`` rewards (0 where the item is ``-1``); :func:`total_reward` weighs them.

* ``hit``: 1 when the rollout is the prompt's target item (MiniOneRec's rule-based reward);
* ``rank``: MiniOneRec's ranking-aware reward (``ndcg_rule_reward`` of its ``rl.py``): in a group that holds the
  target, every other rollout is penalised by ``-(1 / log2(p + 2)) / sum_k 1 / log2(k + 2)`` (``p`` its 0-based rank
  in the group by the policy's score, ``k`` over the group), so the wrong items ranked above the target lose most;
  the target and groups without it get 0. Alone it ranks within groups; with ``hit`` it is MiniOneRec's ``ranking``;
* ``negative``: -1 when the rollout is one of the user's sampled negatives (:func:`datamodules.negatives
  .sample_negatives`, training interactions excluded): the paper's negative-behaviour signal turned into a penalty;
* ``distance``: minus the cosine distance, in the stage-1 (DCCF) behaviour space, between the rollout's embedding and
  the mean embedding of the user's history: rollouts far from what the user did are penalised.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RewardWeights:
    """How much each reward counts in a rollout's total (0 switches a reward off).

    Args:
        hit: weight of the exact-hit reward (rollout == target).
        rank: weight of MiniOneRec's ranking penalty of wrong rollouts in groups that hold the target.
        negative: weight of the sampled-negative penalty (the reward is -1 per hit of a negative).
        distance: weight of the behaviour-space distance penalty (needs ``behaviour_embeddings``).
    """

    hit: float = 1.0
    rank: float = 0.0
    negative: float = 0.0
    distance: float = 0.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0:
                raise ValueError(f"model.init_args.rewards.{name} must be >= 0 (a weight; 0 = off), got {value}")
        if not any(asdict(self).values()):
            raise ValueError("model.init_args.rewards: every weight is 0, so every advantage would be 0; set hit: 1.0")

    def active(self) -> dict[str, float]:
        """The rewards with a non-zero weight."""
        return {name: value for name, value in asdict(self).items() if value}


def hit_reward(items: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 where a rollout is its prompt's ``target`` ``[B]``, else 0."""
    return ((items == target[:, None]) & (items >= 0)).float()


def rank_reward(items: torch.Tensor, target: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """MiniOneRec's NDCG-style penalty of the wrong rollouts in groups that hold the target (module docstring).

    Args:
        items: ``[B, G]`` rollout items.
        target: ``[B]`` target items.
        scores: ``[B, G]`` the policy's score of each rollout (its summed log-prob); ties keep the group's order.

    Returns:
        ``[B, G]`` in ``[-1, 0]``; each row with the target sums to ``-(1 - its target's share)``, other rows are 0.
    """
    valid = items >= 0
    scores = torch.where(valid, scores.float(), -float("inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.arange(items.shape[1], device=items.device).expand_as(order)
    position = torch.empty_like(order).scatter_(1, order, ranks)
    discount = 1.0 / torch.log2(position.float() + 2)
    share = discount / (1.0 / torch.log2(ranks[0].float() + 2)).sum()
    hit = hit_reward(items, target).bool()
    penalised = hit.any(dim=1, keepdim=True) & ~hit & valid
    return torch.where(penalised, -share, torch.zeros_like(share))


def negative_reward(items: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """-1 where a rollout is one of its prompt's sampled ``negatives`` ``[B, N]``, else 0."""
    return -((items[:, :, None] == negatives[:, None, :]).any(dim=2) & (items >= 0)).float()


def distance_reward(
    items: torch.Tensor, history_rows: torch.Tensor, history_items: torch.Tensor, embeddings: torch.Tensor
) -> torch.Tensor:
    """Minus the cosine distance between each rollout's embedding and the mean embedding of its prompt's history.

    Args:
        items: ``[B, G]`` rollout items.
        history_rows: ``[P]`` prompt row of each history entry (the batch's ``seen_rows``).
        history_items: ``[P]`` the history items (``seen_items``).
        embeddings: ``[num_items, D]`` behaviour embeddings (stage 1's DCCF export).

    Returns:
        ``[B, G]`` in ``[-2, 0]``; 0 for a missing rollout or an empty history.
    """
    embeddings = embeddings.float()
    batch = items.shape[0]
    centre = torch.zeros(batch, embeddings.shape[1], device=embeddings.device)
    centre.index_add_(0, history_rows.long(), embeddings[history_items.long()])
    has_history = torch.bincount(history_rows.long(), minlength=batch)[:batch] > 0
    similarity = F.cosine_similarity(embeddings[items.clamp(min=0)], centre[:, None, :], dim=-1)
    keep = (items >= 0) & has_history[:, None]
    return torch.where(keep, similarity - 1, torch.zeros_like(similarity))


def total_reward(terms: dict[str, torch.Tensor], weights: RewardWeights) -> torch.Tensor:
    """``sum_k weight_k * terms[k]`` over the active rewards (each ``[B, G]``)."""
    active = weights.active()
    missing = sorted(set(active) - set(terms))
    if missing:
        raise KeyError(f"no reward terms for {missing}")
    return sum(value * terms[name] for name, value in active.items())
