"""Most-popular ranking: every user gets the items with the most training interactions (a sanity floor)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lightning_modules.base import CountingRecommender


class MostPopular(CountingRecommender):
    """Ranks items by their number of training interactions (``items[:-2]`` of every user); nothing is learned.

    Run it with ``lightning test --config configs/<dataset>/most_popular.yaml`` (``fit`` has nothing to train).

    Args:
        mask_history: exclude already-seen items at evaluation.
        top_k: length of predicted lists.
    """

    def __init__(self, mask_history: bool = True, top_k: int = 20) -> None:
        super().__init__(mask_history=mask_history, top_k=top_k)
        self.save_hyperparameters()
        self._counts: np.ndarray | None = None

    def attach_data(self, datamodule: Any) -> None:
        _, items = datamodule.split.train_interactions()
        self._counts = np.bincount(items, minlength=datamodule.catalogue.num_items).astype(np.float32)

    def build(self, num_items: int) -> None:
        self.register_buffer("popularity", torch.from_numpy(self._counts), persistent=False)

    def score_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.popularity.expand(len(batch["target"]), -1).clone()

    def item_embeddings(self) -> torch.Tensor:
        return self.popularity[:, None]
