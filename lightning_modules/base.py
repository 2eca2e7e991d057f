"""Base class of the ID-based recommenders (SASRec now; DCCF, BERT4Rec, FMLP-Rec share it).

It owns what every ID model has in common: building layers once the catalogue size is known
(``configure_model``), full-catalogue ranking at evaluation with the user's history masked out,
HR/NDCG logging under ``val/...`` and ``test/...``, item-embedding access for the export to the tokenizer,
the optimiser, and a dataset fingerprint in checkpoints so a checkpoint is never evaluated on another dataset.
A new baseline implements :meth:`build`, :meth:`training_loss`, :meth:`score_items` and :meth:`item_embeddings`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import torch

from datamodules.errors import ConfigError, SemConvError, require
from lightning_modules.metrics import TopKMetrics, rank_of_target
from lightning_modules.optimizers import adamw


class CheckpointMismatchError(SemConvError):
    """A checkpoint trained on a different dataset (or catalogue size) than the one configured."""


def check_dataset_fingerprint(
    saved: dict[str, Any] | None, current: dict[str, Any] | None, what: str = "checkpoint"
) -> None:
    """Refuse a checkpoint whose dataset fingerprint (name, content hash, sizes) differs from the configured data."""
    if saved is None or current is None or saved == current:
        return
    differing = ", ".join(
        f"{key}: {saved.get(key)!r} vs {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    )
    raise CheckpointMismatchError(
        f"{what} was trained on dataset {saved.get('name')} but the configured data is {current.get('name')} "
        f"({differing}). "
        "Use the checkpoint of this dataset or change `data`."
    )


def log_topk_metrics(module: L.LightningModule, metric: TopKMetrics, prefix: str) -> None:
    """Log a :class:`TopKMetrics` as ``<prefix>/hr@K`` ... (already synced across processes) and reset it."""
    values = metric.compute()
    # The values are already global; sync_dist=True averages identical numbers (one tiny all-reduce per epoch)
    # and keeps Lightning from warning that epoch-level values were logged unsynced under DDP / DeepSpeed.
    module.log_dict(
        {f"{prefix}/{name}": value.float() for name, value in values.items()}, prog_bar=prefix == "val", sync_dist=True
    )
    metric.reset()


class BeamRanker:
    """Evaluation of a model that ranks items with :meth:`rank_items` (a constrained beam search).

    A mixin for the generative LightningModules (listed before ``L.LightningModule`` in the bases): validation
    updates ``val_metrics`` from the ranks, the test returns each batch's ranking for
    :class:`callbacks.BeamSearchEvaluator` (which computes the metrics and the top-K files), and predict returns the
    top-K lists for serving. The class needs ``rank_items(batch) -> BeamBatchResult``, ``decoding``
    (a ``DecodingConfig``) and ``val_metrics``.
    """

    #: the configs that carry the evaluation callback, named in the error when it is missing
    configs_with_evaluator = "configs/*/llm.yaml"

    @property
    def mask_history(self) -> bool:
        """Whether the beam search excludes the batch's seen items (the cache writer sets it from ``exclude_seen``)."""
        return self.decoding.mask_history

    @mask_history.setter
    def mask_history(self, value: bool) -> None:
        self.decoding = dataclasses.replace(self.decoding, mask_history=bool(value))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_metrics.update(self.rank_items(batch).ranks)

    def on_validation_epoch_end(self) -> None:
        log_topk_metrics(self, self.val_metrics, "val")

    def on_test_start(self) -> None:
        if not any(getattr(callback, "evaluates_test_batches", False) for callback in self.trainer.callbacks):
            raise ConfigError(
                f"testing {type(self).__name__} needs the beam-search evaluation callback: add "
                f"`- class_path: callbacks.BeamSearchEvaluator` to trainer.callbacks ({self.configs_with_evaluator} "
                "have it)"
            )

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        """Ranks a test batch; :class:`callbacks.BeamSearchEvaluator` turns the results into metrics and top-K lists."""
        return self.rank_items(batch)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Serving: ``user`` ``[B]`` catalogue rows, their top ``items`` ``[B, eval_top_k]`` and beam log-``scores``.

        The user's history is excluded under ``mask_history``; slots without a valid item hold ``-1`` / ``-inf``.
        """
        result = self.rank_items(batch)
        return {"user": batch["user"], "items": result.items, "scores": result.scores}


class IDRecommender(L.LightningModule):
    """Common training/evaluation logic of ID-based recommenders.

    Args:
        lr: Adam learning rate.
        weight_decay: Adam(W) weight decay.
        mask_history: at evaluation, exclude the items the user already interacted with from the ranking.
        top_k: length of the ranked lists returned by ``predict``.
    """

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0, mask_history: bool = True, top_k: int = 20) -> None:
        super().__init__()
        require(lr > 0, "model.init_args.lr", "> 0", lr)
        require(weight_decay >= 0, "model.init_args.weight_decay", ">= 0", weight_decay)
        require(top_k >= 1, "model.init_args.top_k", ">= 1", top_k)
        self.lr = lr
        self.weight_decay = weight_decay
        self.mask_history = mask_history
        self.top_k = top_k
        self.num_items: int | None = None
        self.dataset_fingerprint: dict[str, Any] | None = None
        self.val_metrics = TopKMetrics()
        self.test_metrics = TopKMetrics()
        self._built = False

    # ------------------------------------------------------------------------------------------ building
    def build(self, num_items: int) -> None:
        """Create the layers for a catalogue of ``num_items`` items (ids ``0..num_items-1``, pad = ``num_items``)."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        catalogue = getattr(datamodule, "catalogue", None)
        if catalogue is None:
            raise RuntimeError(
                f"{type(self).__name__} needs a datamodule with a catalogue (datamodules.RecDataModule)."
            )
        self.num_items = catalogue.num_items
        self.dataset_fingerprint = catalogue.fingerprint()
        self.attach_data(datamodule)

    def attach_data(self, datamodule: Any) -> None:
        """Hook for models that need more than the catalogue size (e.g. DCCF's training graph)."""

    def configure_model(self) -> None:
        if not self._built:
            if self.num_items is None:
                raise RuntimeError("configure_model() before setup(): the catalogue size is unknown.")
            self.build(self.num_items)
            self._built = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dataset_fingerprint"] = self.dataset_fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_dataset_fingerprint(checkpoint.get("dataset_fingerprint"), self.dataset_fingerprint)

    # ------------------------------------------------------------------------------------ model contract
    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def score_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores ``[B, num_items]`` of every catalogue item for each sample of an evaluation batch."""
        raise NotImplementedError

    def item_embeddings(self) -> torch.Tensor:
        """``[num_items, dim]`` item representations (row i = item i) for the tokenizer stage."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------- loop hooks
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["target"]))
        return loss

    def _masked_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = self.score_items(batch).float()
        if self.mask_history and "seen_rows" in batch:
            scores[batch["seen_rows"], batch["seen_items"]] = float("-inf")
        return scores

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_metrics.update(rank_of_target(self._masked_scores(batch), batch["target"]))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.test_metrics.update(rank_of_target(self._masked_scores(batch), batch["target"]))

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        scores = self._masked_scores(batch)
        top = scores.topk(self.top_k, dim=1)
        return {"user": batch["user"], "items": top.indices, "scores": top.values}

    def on_validation_epoch_end(self) -> None:
        log_topk_metrics(self, self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        log_topk_metrics(self, self.test_metrics, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adamw(self._trainer, self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class CountingRecommender(IDRecommender):
    """An ID recommender computed from counts over the training interactions: nothing to fit, run ``lightning test``.

    Args:
        mask_history: at evaluation, exclude the items the user already interacted with from the ranking.
        top_k: length of the ranked lists returned by ``predict``.
    """

    def __init__(self, mask_history: bool = True, top_k: int = 20) -> None:
        super().__init__(mask_history=mask_history, top_k=top_k)  # the optimiser settings go unused

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise RuntimeError(
            f"{type(self).__name__} has nothing to train: run `lightning test` with its config instead of `fit`."
        )

    def configure_optimizers(self) -> None:
        return None
