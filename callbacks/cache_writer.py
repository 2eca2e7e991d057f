"""Write every user's top-K into a serving store during ``lightning predict`` (the offline half of serving).

Contract with the model: each ``predict_step`` returns ``{"user": LongTensor[B] (catalogue user rows), "items":
LongTensor[B, K] (item rows, -1 = none), "scores": FloatTensor[B, K]}``, best first. The writer maps rows to the
dataset's original ids, writes each batch as it comes into a new, invisible version, and publishes that version once
every rank has written all its users:

    on_predict_start (every rank): rank 0 begins the version (meta, popular fallback, titles); broadcast its id
    each batch (every rank):       upsert the rank's users
    on_predict_end (every rank):   barrier, then rank 0 publishes (one transaction) and prunes old versions

Collectives (broadcast, barrier) are called on every rank; only the store calls are rank-dependent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from datamodules.artifacts import sha256_file
from datamodules.errors import ConfigError
from datamodules.recommendation_store import StoreError, VersionMeta, VersionWriter, artifact_hashes, open_store

log = logging.getLogger(__name__)


def original_ids(catalogue, num_items: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(user names [num_users], item names [num_items])`` as strings: the dataset's original ids.

    A converted raw Amazon dataset has ``<Name>.user2id``/``<Name>.item2id`` (``original_id<TAB>idx``) beside its
    LC-Rec files; without them the LC-Rec keys (users) and item indices are the ids.

    Args:
        catalogue: the dataset.
        num_items: item rows to name (default: the catalogue's); cold-start rows beyond it are named by their
            index id (the key ``assign_codes`` gave them).
    """
    num_items = catalogue.num_items if num_items is None else num_items
    users = catalogue.user_ids.astype(str)
    items = np.arange(num_items).astype(str)
    directory = Path(catalogue.source_dir or ".")
    for kind in ("user", "item"):
        path = directory / f"{catalogue.name}.{kind}2id"
        if path.is_file():
            names = {}
            for line in path.read_text(encoding="utf-8").splitlines():
                name, _, idx = line.rpartition("\t")
                names[int(idx)] = name
            if kind == "user":
                users = np.asarray([names.get(int(user), str(user)) for user in catalogue.user_ids])
            else:
                items = np.asarray([names.get(item, str(item)) for item in range(num_items)])
    return users, items


def training_popularity(datamodule, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` items with the most training interactions (ties: lower item row first) and their counts."""
    _, items = datamodule.split.train_interactions()
    counts = np.bincount(items, minlength=datamodule.catalogue.num_items)
    order = np.lexsort((np.arange(len(counts)), -counts))[:k]
    return order, counts[order].astype(np.float64)


class RecommendationCacheWriter(BasePredictionWriter):
    """Fills a new store version with every predicted user's top-K and publishes it when all ranks are done.

    Args:
        store: store URL, ``sqlite:///path/recommendations.sqlite`` or ``redis://host:port/db``.
        keep_versions: published versions kept after the publish.
        exclude_seen: drop items the user already has (sets the model's ``mask_history`` so the beam search fills
            K unseen items, and filters the lists again); false keeps them.
        k: items cached per user; None reads the model's ``eval_top_k``.
        model_dir: exported stage-3 directory whose manifest hash identifies the model; None hashes the
            ``--ckpt_path`` file.
    """

    def __init__(
        self,
        store: str,
        keep_versions: int = 2,
        exclude_seen: bool = True,
        k: int | None = None,
        model_dir: str | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        if keep_versions < 1:
            raise ConfigError(f"RecommendationCacheWriter.keep_versions must be >= 1, got {keep_versions}")
        self.store_url, self.keep_versions, self.exclude_seen, self.k, self.model_dir = (
            store,
            keep_versions,
            exclude_seen,
            k,
            model_dir,
        )
        self.writer: VersionWriter | None = None
        self.written = 0

    @staticmethod
    def _num_items(trainer: L.Trainer) -> int:
        """Items that can be recommended: the index's (cold-start items included), else the catalogue's."""
        index = getattr(trainer.datamodule, "item_index", None)
        return trainer.datamodule.catalogue.num_items if index is None else len(index.codes)

    def _meta(self, trainer: L.Trainer, pl_module: L.LightningModule) -> VersionMeta:
        catalogue = trainer.datamodule.catalogue
        k = self.k or getattr(pl_module, "eval_top_k", None) or pl_module.hparams.get("eval_top_k")
        if not k:
            raise ConfigError("RecommendationCacheWriter: set `k` (items cached per user); the model has no eval_top_k")
        if self.model_dir:
            model_hash = artifact_hashes(self.model_dir)[0]
        elif trainer.ckpt_path:
            model_hash = sha256_file(trainer.ckpt_path)
        else:
            model_hash = f"untracked:{type(pl_module).__name__}"
        return VersionMeta(
            model_hash=model_hash,
            dataset_hash=catalogue.content_hash,
            k=int(k),
            num_items=self._num_items(trainer),
            dataset=catalogue.name,
        )

    def _begin(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """Rank 0: open the store, begin the version, store the fallback list and the titles."""
        datamodule = trainer.datamodule
        meta = self._meta(trainer, pl_module)
        self.writer = open_store(self.store_url, self.keep_versions).begin_version(meta)
        items, counts = training_popularity(datamodule, meta.k)
        self.writer.set_popular(self.item_names[items].tolist(), counts.tolist())
        text = datamodule.catalogue.item_text or {}
        self.writer.set_titles({self.item_names[item]: t["title"] for item, t in text.items() if t.get("title")})
        return self.writer.version

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if hasattr(pl_module, "mask_history"):
            pl_module.mask_history = self.exclude_seen
        datamodule = trainer.datamodule
        self.user_names, self.item_names = original_ids(datamodule.catalogue, self._num_items(trainer))
        version, error = None, None
        if trainer.global_rank == 0:
            try:
                version = self._begin(trainer, pl_module)
            except Exception as err:  # noqa: BLE001 - re-raised on every rank after the broadcast
                error = err
        # every rank: a collective. Rank 0 creates the store's schema before the others open it, and a failure
        # there is raised on every rank instead of leaving them waiting
        version, message = trainer.strategy.broadcast((version, None if error is None else str(error)), src=0)
        if error is not None:
            raise error
        if message is not None:
            raise StoreError(f"rank 0 could not begin the cache version: {message}")
        if trainer.global_rank != 0:
            self.writer = open_store(self.store_url, self.keep_versions).attach_version(version)
        self.written = 0

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        users = prediction["user"].cpu().numpy()
        items = prediction["items"].cpu().numpy()
        scores = prediction["scores"].float().cpu().numpy()
        keep = items >= 0
        if self.exclude_seen:
            catalogue = trainer.datamodule.catalogue
            for row, user in enumerate(users):
                keep[row] &= ~np.isin(items[row], catalogue.sequence(int(user)))
        names, lists, list_scores = [], [], []
        for row, user in enumerate(users):
            if keep[row].any():  # a user left with nothing is served the fallback
                names.append(self.user_names[user])
                lists.append(self.item_names[items[row][keep[row]]].tolist())
                list_scores.append(scores[row][keep[row]].tolist())
        self.writer.write(names, lists, list_scores)
        self.written += len(names)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log.info("rank %d wrote %d users into version %d", trainer.global_rank, self.written, self.writer.version)
        trainer.strategy.barrier("recommendation_cache_written")  # every rank: every user is in before the publish
        if trainer.global_rank == 0:
            record = self.writer.publish()
            log.info(
                "published version %d (%d users, K=%d) to %s",
                record.version,
                record.num_users,
                record.k,
                self.store_url,
            )

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.global_rank == 0 and self.writer is not None:
            self.writer.abort()  # the served version stays current; the partial one is dropped
