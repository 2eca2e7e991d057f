"""Cold-start items in ranked lists: retrieval by a shared code prefix (TIGER's cold-start recommendation).

A model trained before an item was coded never generated that item's code tuple: under the item's prefix its
last codes compete with siblings the model was trained to produce, so the beam search almost never reaches it. Its
codes still say where it belongs. As TIGER does for unseen items (Rajput et al. 2023, section 4.3: an unseen item is
retrieved when its semantic ID shares a prefix with a generated one), each ranked list gets up to ``slots`` cold
items, each placed right after the best-ranked returned item whose first ``prefix`` codes it shares, taking that
item's score. Among several candidates sharing the prefix, the one sharing the longest run of leading codes with
that item wins, then the lower id. Lists without such a match are unchanged.

Vectorised over the batch; only the returned ``[B, K]`` items are compared, never the catalogue.
"""

from __future__ import annotations

import torch


class ColdPrefixTable:
    """Cold items grouped by their first ``prefix`` codes.

    Args:
        codes: ``[N, T]`` code tuples of every item (row ``i`` = item ``i``).
        cold_items: ids of the items coded by cold start.
        prefix: how many leading codes a cold item must share with a returned item (>= 1).
    """

    def __init__(self, codes: torch.Tensor, cold_items: torch.Tensor, prefix: int) -> None:
        if not 1 <= prefix <= codes.shape[1]:
            raise ValueError(f"cold_start_prefix must be in [1, {codes.shape[1]}] (codes per item), got {prefix}")
        self.codes = codes.long()
        _, key = torch.unique(self.codes[:, :prefix], dim=0, return_inverse=True)
        self.key = key.reshape(-1)
        cold = torch.unique(cold_items.long())
        cold_keys = self.key[cold]
        order = torch.argsort(cold_keys * (len(codes) + 1) + cold)  # by key, then id
        cold, cold_keys = cold[order], cold_keys[order]
        counts = torch.bincount(cold_keys, minlength=int(self.key.max()) + 1)
        width = max(int(counts.max()) if len(cold) else 0, 1)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(cold)) - starts[cold_keys]
        self.table = torch.full((len(counts), width), -1, dtype=torch.long)
        self.table[cold_keys, slot] = cold

    def to(self, device: torch.device) -> ColdPrefixTable:
        self.codes, self.key, self.table = self.codes.to(device), self.key.to(device), self.table.to(device)
        return self

    def insert(self, items: torch.Tensor, scores: torch.Tensor, slots: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``items``/``scores`` ``[B, K]`` (best first, ``-1`` = empty) with up to ``slots`` cold items inserted."""
        for _ in range(slots):
            items, scores = self._insert_one(items, scores)
        return items, scores

    def _insert_one(self, items: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, k = items.shape
        valid = items >= 0
        safe = items.clamp(min=0)
        candidates = self.table[self.key[safe]]  # [B, K, C]
        listed = (candidates[..., None] == items[:, None, None, :]).any(-1)
        usable = (candidates >= 0) & ~listed & valid[..., None]
        usable[:, k - 1] = False  # nothing to insert after the last slot
        same = self.codes[candidates.clamp(min=0)] == self.codes[safe][:, :, None, :]  # [B, K, C, T]
        shared = same.int().cumprod(-1).sum(-1)
        choice = torch.where(usable, shared, -1).argmax(-1)  # [B, K]
        found = usable.any(-1)  # [B, K]
        hit = found.any(1)
        position = torch.where(hit, found.int().argmax(1), k)  # first returned item with a candidate
        arange = torch.arange(rows, device=items.device)
        cold = candidates[arange, position.clamp(max=k - 1), choice[arange, position.clamp(max=k - 1)]]
        columns = torch.arange(k, device=items.device)[None, :]
        source = torch.where(columns <= position[:, None], columns, columns - 1)
        new_items, new_scores = items.gather(1, source), scores.gather(1, source)
        at = (columns == position[:, None] + 1) & hit[:, None]
        new_items = torch.where(at, cold[:, None], new_items)
        new_scores = torch.where(at, scores.gather(1, position.clamp(max=k - 1)[:, None]), new_scores)
        keep = ~hit[:, None]
        return torch.where(keep, items, new_items), torch.where(keep, scores, new_scores)
