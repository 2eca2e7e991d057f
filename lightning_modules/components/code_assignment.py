"""Deterministic collision resolution of code tuples (the model side of the code index).

Two items with the same tuple would be the same token sequence for the LLM, so the exported index must be
collision-free; :func:`make_unique` resolves raw collisions with the smallest change:

1. in each group of items sharing a tuple, the item closest to its own last-level code keeps the tuple (ties:
   lowest item id); tuples already held by a ``fixed`` item (an existing index being extended) keep none;
2. the other items of the group keep their first ``L-1`` codes (the prefix) and get the *free* last-level
   codes of that prefix by a balanced assignment minimising the summed cost (the Hungarian method,
   ``scipy.optimize.linear_sum_assignment``);
3. only when a prefix has no free last-level code left, the remaining items get an extra level (the next
   letter, numbered 1, 2, ... within the tuple; every other item gets 0), so all tuples keep the same length.
   When extending an existing index that has no extra level (cold start), existing tokens must not change,
   so such items instead re-choose their last *two* codes jointly among the free pairs (``pair_cost``).

The token format of the tuples (``<a_12>``, collision masks and rates) is data: :mod:`datamodules.code_index`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from datamodules.code_index import collision_rate, shared_mask
from lightning_modules.components.quantizer import Quantized, pairwise_distance


@dataclass
class Resolution:
    """Result of :func:`make_unique`: the unique codes and what it took to get there."""

    codes: torch.Tensor
    raw_collision_rate: float
    final_collision_rate: float
    reassigned: int
    extra_level: int


def _group_ids(codes: torch.Tensor) -> torch.Tensor:
    if codes.shape[1] == 0:  # one level: every item has the same (empty) prefix
        return torch.zeros(codes.shape[0], dtype=torch.long)
    return torch.unique(codes, dim=0, return_inverse=True)[1]


def make_unique(
    codes: torch.Tensor,
    last_cost: Callable[[torch.Tensor], torch.Tensor],
    codebook_size: int,
    fixed: torch.Tensor | None = None,
    fixed_extra: torch.Tensor | None = None,
    pair_cost: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Resolution:
    """Make every item's code tuple unique, moving as few items as possible (see the module docstring).

    Args:
        codes: ``[N, L]`` raw codes (nearest code per level).
        last_cost: ``item indices [m] -> [m, K]`` cost of every last-level code for those items, given their
            prefix (e.g. the distance between the last-level residual and each code).
        codebook_size: ``K``.
        fixed: ``[N]`` items whose codes may not change (an existing index); their tuples must be unique.
        fixed_extra: ``[N]`` extra-level codes of the fixed items when the existing index has an extra level.
        pair_cost: ``item indices [m] -> [m, K, K]`` cost of every (level L-1, level L) code pair given the first
            ``L-2`` codes; lets new items leave a full prefix when ``fixed`` items forbid an extra level.

    Returns:
        A :class:`Resolution` whose codes are ``[N, L]``, or ``[N, L + 1]`` when an extra level was needed.
    """
    n, num_levels = codes.shape
    codes = codes.clone().long()
    fixed = torch.zeros(n, dtype=torch.bool) if fixed is None else fixed.bool()
    raw_rate = collision_rate(codes)
    tuple_id = _group_ids(codes)
    shared = shared_mask(codes)
    # 1. who keeps a shared tuple: the closest non-fixed item, unless a fixed item already holds it
    candidates = torch.nonzero(shared & ~fixed).flatten()
    movers = candidates
    if len(candidates):
        own = last_cost(candidates).gather(1, codes[candidates, -1:]).squeeze(1).double().numpy()
        order = np.lexsort((candidates.numpy(), own, tuple_id[candidates].numpy()))
        sorted_tuples = tuple_id[candidates].numpy()[order]
        first = order[np.unique(sorted_tuples, return_index=True)[1]]
        held = torch.zeros(int(tuple_id.max()) + 1, dtype=torch.bool)
        held[tuple_id[fixed]] = True
        keep = torch.zeros(len(candidates), dtype=torch.bool)
        keep[torch.from_numpy(first)] = True
        keep &= ~held[tuple_id[candidates]]
        movers = candidates[~keep]
    overflow: list[int] = []
    if len(movers):
        # 2. free last-level codes of each movers' prefix, then a balanced assignment per prefix
        prefix_id = _group_ids(codes[:, :-1])
        mover_prefixes, mover_group = torch.unique(prefix_id[movers], return_inverse=True)
        row_of_prefix = torch.full((int(prefix_id.max()) + 1,), -1, dtype=torch.long)
        row_of_prefix[mover_prefixes] = torch.arange(len(mover_prefixes))
        stay = torch.ones(n, dtype=torch.bool)
        stay[movers] = False
        stay_rows = row_of_prefix[prefix_id[stay]]
        used = torch.zeros(len(mover_prefixes), codebook_size, dtype=torch.bool)
        used[stay_rows[stay_rows >= 0], codes[stay][stay_rows >= 0, -1]] = True
        cost = last_cost(movers).double().numpy()
        for group in range(len(mover_prefixes)):  # a loop over collision groups, not over the catalogue
            members = torch.nonzero(mover_group == group).flatten().numpy()
            free = torch.nonzero(~used[group]).flatten().numpy()
            rows, cols = np.zeros(0, int), np.zeros(0, int)
            if len(free):
                rows, cols = linear_sum_assignment(cost[np.ix_(members, free)])
            codes[movers[members[rows]], -1] = torch.from_numpy(free[cols]).long()
            overflow.extend(movers[np.setdiff1d(members, members[rows])].tolist())
    if overflow and fixed.any() and fixed_extra is None and pair_cost is not None and num_levels >= 2:
        overflow = _move_to_free_pairs(codes, sorted(overflow), pair_cost, codebook_size)
    extra_count = 0
    if overflow or fixed_extra is not None:
        # 3. last resort: an extra level numbering the items that still share a full tuple
        if overflow and fixed.any() and fixed_extra is None:
            raise ValueError(
                f"{len(overflow)} new item(s) fall under a prefix whose last level is full, and the existing index "
                "has no "
                "extra level to tell them apart without renaming existing items. Retrain the codebook with more levels "
                "or a larger codebook_size."
            )
        extra = torch.zeros(n, dtype=torch.long)
        if fixed_extra is not None:
            extra[fixed] = fixed_extra[fixed].long()
        if overflow:
            overflow_t = torch.tensor(sorted(overflow), dtype=torch.long)
            final_id = _group_ids(codes)
            for group in torch.unique(final_id[overflow_t]).tolist():
                members = overflow_t[final_id[overflow_t] == group]
                holders = (final_id == group) & ~torch.isin(torch.arange(n), members)
                start = int(extra[holders].max()) + 1 if holders.any() else 0
                extra[members] = torch.arange(start, start + len(members))
            extra_count = len(overflow)
        codes = torch.cat([codes, extra[:, None]], 1)
    final_rate = collision_rate(codes)
    if final_rate:
        raise RuntimeError(f"collision resolution left a collision rate of {final_rate}; this is a bug")
    return Resolution(codes, raw_rate, final_rate, len(movers) - extra_count, extra_count)


def _move_to_free_pairs(codes: torch.Tensor, items: list[int], pair_cost: Callable, k: int) -> list[int]:
    """Give each item (in id order) the cheapest free (level L-1, level L) pair under its first L-2 codes."""
    left = []
    costs = pair_cost(torch.tensor(items, dtype=torch.long))
    for item, cost in zip(items, costs, strict=False):  # only the few items whose prefix is full
        same = (codes[:, :-2] == codes[item, :-2]).all(1)
        same[item] = False
        taken = torch.zeros(k, k, dtype=torch.bool)
        taken[codes[same, -2], codes[same, -1]] = True
        if bool(taken.all()):
            left.append(item)
            continue
        flat = int(cost.masked_fill(taken, float("inf")).flatten().argmin())
        codes[item, -2], codes[item, -1] = flat // k, flat % k
    return left


def pair_costs(out: Quantized, books: torch.Tensor, distance: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``items -> [m, K, K]``: ``D(r_{L-1}, a) + D(r_{L-1} - a, b)`` for each code pair (a, b) of the last 2 levels."""

    @torch.no_grad()
    def cost(items: torch.Tensor) -> torch.Tensor:
        residual = out.inputs[items, -2]  # [m, d]
        first = pairwise_distance(residual, books[0], distance)  # [m, K]
        second = torch.stack([pairwise_distance(r[None] - books[0], books[1], distance) for r in residual])  # [m, K, K]
        return first[:, :, None] + second

    return cost


def last_level_costs(
    out: Quantized,
    book: torch.Tensor,
    distance: str,
    behaviour_weight: float = 1.0,
    projection: torch.Tensor | None = None,
    llm_target: torch.Tensor | None = None,
    has_text: torch.Tensor | None = None,
    llm_weight: float = 0.0,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training objective restricted to the last-level choice, as ``item indices [m] -> [m, K]`` costs.

    ``behaviour_weight * D(r_L, c)`` for every last-level code ``c``, plus, for items with text when a
    projection ``W`` ``[D, d]`` is given, ``llm_weight * (1 - cos(W (s_{L-1} + c), t))`` with ``t`` the centred
    LLM embedding. Only the full prefix sum is rescored: the earlier prefixes do not depend on ``c``.
    """

    @torch.no_grad()
    def cost(items: torch.Tensor) -> torch.Tensor:
        value = behaviour_weight * pairwise_distance(out.inputs[items, -1], book, distance)
        if projection is None or llm_target is None:
            return value
        # W(a + c) = Wa + Wc: cosines from [m, K] dot products instead of an [m, K, D] tensor
        wa = out.chosen[items, :-1].sum(1) @ projection.T  # [m, D]
        wc = book @ projection.T  # [K, D]
        t = F.normalize(llm_target[items], dim=-1)
        norm = (wa.pow(2).sum(-1, keepdim=True) + wc.pow(2).sum(-1) + 2 * wa @ wc.T).clamp_min(1e-16).sqrt()
        cosine = ((wa * t).sum(-1, keepdim=True) + t @ wc.T) / norm
        text = torch.ones(len(items), dtype=torch.bool) if has_text is None else has_text[items]
        return value + llm_weight * (1 - cosine) * text[:, None]

    return cost
