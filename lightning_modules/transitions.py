"""Transition counts: first-order next-item ranking over items or over item-code prefixes (nothing is learned).

Two uses:

* an **item-level** baseline: how far plain "what followed the user's last items" goes on a split (on Industrial it
  beats every trained model here but SASRec);
* a **code-level** probe of an item index: counting transitions between the items' first ``code_depth`` codes
  instead of between items, and ranking an item by its prefix's count times its share of the prefix's training
  interactions, measures how much next-item signal the index's first levels carry. That is what a generative
  model reaches if it learns transitions between code prefixes and only popularity below them (the tiny
  Industrial Llama ranks like ``code_depth: 1``; see the README). It runs in seconds, so indices can be compared
  before any LLM is trained.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from datamodules.item_index import load_item_index
from lightning_modules.base import CountingRecommender


class TransitionCounts(CountingRecommender):
    """Ranks items by how often they followed the user's last items in the training sequences (``items[:-2]``).

    Every consecutive pair ``(a, b)`` of a user's training items counts once. A user's score for a group (an item,
    or a code prefix with ``index``) is the sum of the counts from the groups of their ``last_items`` most recent
    history items; an item scores its group's count times its share of the group's training interactions (1 for
    item groups). Training popularity, scaled far below one count, breaks ties and fills the ranks no history item
    leads to. Run it with ``lightning test --config configs/<dataset>/transitions.yaml`` (nothing to fit).

    Args:
        last_items: how many of the user's most recent history items vote (3 on Industrial).
        index: an item index to count between code prefixes instead of items: a stage-2 export directory or an
            LC-Rec ``index.json`` (checked against the dataset like stage 3 checks it). None counts items.
        code_depth: leading codes that form an item's group when ``index`` is set (1 = first-level codes).
        mask_history: exclude already-seen items at evaluation.
        top_k: length of predicted lists.
    """

    def __init__(
        self,
        last_items: int = 3,
        index: str | None = None,
        code_depth: int = 1,
        mask_history: bool = True,
        top_k: int = 20,
    ) -> None:
        super().__init__(mask_history=mask_history, top_k=top_k)
        if last_items < 1:
            raise ValueError(f"last_items must be >= 1, got {last_items}")
        if code_depth < 1:
            raise ValueError(f"code_depth must be >= 1, got {code_depth}")
        self.save_hyperparameters()
        self._tables: dict[str, np.ndarray] | None = None

    def attach_data(self, datamodule: Any) -> None:
        catalogue = datamodule.catalogue
        users, items = datamodule.split.train_interactions()  # chronological within each user
        popularity = np.bincount(items, minlength=catalogue.num_items).astype(np.float64)
        group, share = np.arange(catalogue.num_items), np.ones(catalogue.num_items)
        if self.hparams.index is not None:
            # prefixes shorter than a tuple are unaffected by collisions, so a colliding index (LC-Rec's) is fine here
            codes = load_item_index(self.hparams.index, catalogue, dedupe_collisions=True).codes
            if self.hparams.code_depth > codes.shape[1]:
                raise ValueError(
                    f"model.init_args.code_depth={self.hparams.code_depth} but the index {self.hparams.index} has "
                    f"{codes.shape[1]} codes per item: use a depth from 1 to {codes.shape[1]}"
                )
            _, group = np.unique(codes[:, : self.hparams.code_depth], axis=0, return_inverse=True)
            group = group.reshape(-1)
            group_popularity = np.bincount(group, weights=popularity)
            share = popularity / np.maximum(group_popularity[group], 1.0)
        num_groups = int(group.max()) + 1
        follows = users[1:] == users[:-1]
        keys, counts = np.unique(
            group[items[:-1][follows]] * num_groups + group[items[1:][follows]], return_counts=True
        )
        self._tables = {
            "group": group,
            "share": share,
            "popularity": popularity,
            "target": keys % num_groups,
            "count": counts,
            # keys are sorted, so each source group's pairs are one slice: CSR offsets [num_groups + 1]
            "source_offsets": np.searchsorted(keys // num_groups, np.arange(num_groups + 1)),
        }

    def build(self, num_items: int) -> None:
        tables = self._tables
        # one count outranks any popularity tie-break: popularity is scaled into [0, 1e-6]
        tie_break = tables["popularity"] / max(tables["popularity"].max(), 1.0) * 1e-6
        self.register_buffer("item_group", torch.from_numpy(tables["group"]).long(), persistent=False)
        self.register_buffer("item_share", torch.from_numpy(tables["share"]).float(), persistent=False)
        self.register_buffer("tie_break", torch.from_numpy(tie_break).float(), persistent=False)
        self.register_buffer("source_offsets", torch.from_numpy(tables["source_offsets"]).long(), persistent=False)
        self.register_buffer("pair_target", torch.from_numpy(tables["target"]).long(), persistent=False)
        self.register_buffer("pair_count", torch.from_numpy(tables["count"]).float(), persistent=False)

    @property
    def num_groups(self) -> int:
        return len(self.source_offsets) - 1

    def group_scores(self, history: torch.Tensor) -> torch.Tensor:
        """``[B, num_groups]`` summed transition counts from the groups of each row's last history items."""
        last = history[:, -self.hparams.last_items :]
        rows, cols = torch.nonzero(last != self.num_items, as_tuple=True)  # left padding = num_items
        source = self.item_group[last[rows, cols]]
        # CSR gather: each vote expands to its source group's slice of pairs, so the work is the number of pairs
        # touched, never a dense [num_groups, num_groups] table
        start, stop = self.source_offsets[source], self.source_offsets[source + 1]
        lengths = stop - start
        vote_of_pair = torch.repeat_interleave(torch.arange(len(source), device=history.device), lengths)
        first_of_vote = torch.cumsum(lengths, 0) - lengths
        pair = (
            start[vote_of_pair] + torch.arange(len(vote_of_pair), device=history.device) - first_of_vote[vote_of_pair]
        )
        scores = torch.zeros(len(history), self.num_groups, device=history.device)
        return scores.index_put_((rows[vote_of_pair], self.pair_target[pair]), self.pair_count[pair], accumulate=True)

    def score_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.group_scores(batch["history"])[:, self.item_group] * self.item_share + self.tie_break

    def item_embeddings(self) -> torch.Tensor:
        return self.item_share[:, None]
