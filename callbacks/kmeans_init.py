"""Initialise the codebooks by k-means before the first training step (the paper's initial cluster centres)."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from lightning_modules.components.quantizer import kmeans

log = logging.getLogger(__name__)


class KMeansInit(L.Callback):
    """Set each level's codes to k-means centres of that level's inputs, level by level, once per model.

    Level 1 clusters the items' (latent) embeddings; level ``l`` clusters the residuals left after the
    already-initialised levels ``1..l-1`` quantised the same items. The points are the first training batch
    (as in the paper), or ``num_samples`` items drawn from the whole catalogue; a batch with fewer items than
    ``codebook_size`` falls back to the whole catalogue, since k-means cannot place K centres on fewer points.

    The quantiser's ``initialised`` buffer is set afterwards and travels with checkpoints, so a resumed run
    (``fit --ckpt_path``) skips the initialisation and never overwrites trained codes; the callback's own
    state (``runs``) is checkpointed too.

    Args:
        iters: Lloyd iterations per level.
        num_samples: cluster this many catalogue items instead of the first batch (None: the first batch;
            0 or more than the catalogue: every item).
        seed: seed of the k-means++ draws and of the catalogue sample.
    """

    def __init__(self, iters: int = 25, num_samples: int | None = None, seed: int = 0) -> None:
        self.iters = iters
        self.num_samples = num_samples
        self.seed = seed
        self.runs = 0
        self.source: str | None = None  # what the last initialisation clustered (for logs and tests)

    def _points(self, trainer: L.Trainer, batch: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, str]:
        if self.num_samples is None and len(batch["embedding"]) >= k:
            return batch["embedding"], f"the first batch ({len(batch['embedding'])} items)"
        embeddings = getattr(trainer.datamodule, "training_embeddings", None)
        if embeddings is None:
            raise RuntimeError(
                f"KMeansInit needs {k} points: the first batch has {len(batch['embedding'])} and there is no "
                "ItemDataModule "
                "catalogue to draw from. Increase the batch size or use datamodules.ItemDataModule."
            )
        n = embeddings.shape[0]
        size = n if not self.num_samples or self.num_samples >= n else max(self.num_samples, k)
        if size >= n:
            return embeddings, f"the whole catalogue ({n} items)"
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[:size]
        return embeddings[rows], f"{size} catalogue items"

    @torch.no_grad()
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        quantizer = pl_module.quantizer
        if bool(quantizer.initialised):
            return
        k = quantizer.codebook_size
        points, described = self._points(trainer, batch, k)
        points = points.to(pl_module.device)
        for level in range(quantizer.num_levels):
            residuals = quantizer.level_inputs(points, level)
            centres = kmeans(residuals, k, self.iters, seed=self.seed + level, distance=quantizer.distance)
            quantizer.codebooks.data[level] = centres.to(quantizer.codebooks.dtype)
        # DDP: every rank saw a different first batch; use rank 0's centres everywhere
        quantizer.codebooks.data = trainer.strategy.broadcast(quantizer.codebooks.data, src=0)
        quantizer.initialised.fill_(True)
        self.runs += 1
        self.source = described
        log.info("k-means initialised %d levels x %d codes from %s", quantizer.num_levels, k, described)

    def state_dict(self) -> dict[str, Any]:
        return {"runs": self.runs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the restored count is informative only; the model buffer decides whether to initialise
        self.restored_runs = state_dict.get("runs", 0)
