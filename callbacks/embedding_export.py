"""Export the best checkpoint's item embeddings for the tokenizer stage (the paper's "Recsys emb").

After ``fit``, :class:`ItemEmbeddingExporter` writes the artifact ``item_embeddings`` into ``output_dir`` through
:class:`datamodules.artifacts.ArtifactWriter` (staged, then swapped in whole): ``item_embeddings.pt``
(``[num_items, dim]`` float32, row i = item i) and a manifest naming the dataset fingerprint, the shape, the model
class and config, the checkpoint and its validation metrics. :func:`datamodules.load_item_embeddings` reads it.
Works with any :class:`lightning_modules.IDRecommender`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from datamodules.artifacts import MANIFEST_NAME, ArtifactWriter, jsonable, read_artifact
from datamodules.errors import ArtifactError

log = logging.getLogger(__name__)

EMBEDDINGS_NAME = "item_embeddings.pt"
KIND = "item_embeddings"


class ItemEmbeddingExporter(L.Callback):
    """Writes the best checkpoint's item embeddings and a manifest into ``output_dir`` when ``fit`` ends.

    The best checkpoint is ``trainer.checkpoint_callback.best_model_path`` (the current weights when there is
    none); the module's weights are restored afterwards. An existing artifact of the same dataset is replaced
    once the new one is complete; one of another dataset is refused at ``setup``, before training starts.

    Args:
        output_dir: artifact directory, e.g. ``artifacts/games/dccf_embeddings``.
        overwrite_other_dataset: replace an artifact that was written for a different dataset.
    """

    def __init__(self, output_dir: str, overwrite_other_dataset: bool = False) -> None:
        self.output_dir = output_dir
        self.overwrite_other_dataset = overwrite_other_dataset
        self._val_by_step: dict[int, dict[str, float]] = {}

    # ------------------------------------------------------------------------------------------ checks
    def check_target(self, fingerprint: dict[str, Any]) -> None:
        """Refuse to replace another dataset's artifact unless ``overwrite_other_dataset``."""
        if not (Path(self.output_dir) / MANIFEST_NAME).is_file() or self.overwrite_other_dataset:
            return
        try:
            read_artifact(
                self.output_dir,
                KIND,
                {"dataset": fingerprint},
                fix=(
                    f"this run trains on {fingerprint['name']}. Point ItemEmbeddingExporter's `output_dir` at another "
                    "directory, or set `overwrite_other_dataset: true` to replace it"
                ),
            )
        except ArtifactError as err:
            raise ArtifactError(f"ItemEmbeddingExporter will not replace {self.output_dir}: {err}") from None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.check_target(_catalogue(trainer).fingerprint())  # fail before hours of training, not after

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # remember every validation's metrics, to report those of the epoch whose checkpoint is exported
        if not trainer.sanity_checking:
            self._val_by_step[trainer.global_step] = _val_metrics(trainer)

    # ------------------------------------------------------------------------------------------ export
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.log_dir broadcasts under DDP: every rank reads it before the rank-zero export
        config = Path(trainer.log_dir or trainer.default_root_dir) / "config.yaml"
        if trainer.is_global_zero:
            self._export_best(trainer, pl_module, config)
        trainer.strategy.barrier("item_embedding_export")

    def _export_best(self, trainer: L.Trainer, pl_module: L.LightningModule, config: Path) -> None:
        checkpoint = trainer.checkpoint_callback
        best_path = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        original = {key: value.detach().clone() for key, value in pl_module.state_dict().items()}
        step, epoch = trainer.global_step, trainer.current_epoch
        if best_path:
            saved = torch.load(best_path, map_location=pl_module.device, weights_only=False)
            pl_module.on_load_checkpoint(saved)  # the dataset-fingerprint check of IDRecommender
            pl_module.load_state_dict(saved["state_dict"])
            step, epoch = saved.get("global_step", step), saved.get("epoch", epoch)
        else:
            log.warning("no best checkpoint (checkpointing off or no validation): exporting the current weights")
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                embeddings = pl_module.item_embeddings().detach().float().cpu().contiguous()
        finally:
            pl_module.load_state_dict(original)
            pl_module.train(was_training)
        val_metrics = self._val_by_step.get(step) or _val_metrics(trainer)
        score = getattr(checkpoint, "best_model_score", None) if best_path else None
        self.export(
            trainer,
            pl_module,
            embeddings,
            {
                "checkpoint": best_path or None,
                "checkpoint_epoch": epoch,
                "checkpoint_global_step": step,
                "monitor": getattr(checkpoint, "monitor", None) if best_path else None,
                "best_score": None if score is None or math.isnan(float(score)) else float(score),
                "val_metrics": val_metrics,
                "config_file": str(config) if config.is_file() else None,
            },
        )

    def export(
        self, trainer: L.Trainer, pl_module: L.LightningModule, embeddings: torch.Tensor, extra: dict[str, Any]
    ) -> Path:
        """Write the artifact (tensor and manifest) through one :class:`ArtifactWriter`."""
        catalogue = _catalogue(trainer)
        self.check_target(catalogue.fingerprint())
        if embeddings.dim() != 2 or embeddings.shape[0] != catalogue.num_items:
            raise ValueError(
                f"{type(pl_module).__name__}.item_embeddings() has shape {tuple(embeddings.shape)}, "
                f"expected [{catalogue.num_items}, dim]"
            )
        if not torch.isfinite(embeddings).all():
            raise ValueError(f"{type(pl_module).__name__}.item_embeddings() contains NaN/inf; not exporting them")
        datamodule = trainer.datamodule
        with ArtifactWriter(self.output_dir, KIND) as writer:
            writer.save_torch(EMBEDDINGS_NAME, embeddings)
            writer.commit(
                {
                    "dataset": catalogue.fingerprint(),
                    "num_items": catalogue.num_items,
                    "dim": int(embeddings.shape[1]),
                    "file": EMBEDDINGS_NAME,
                    "model_class": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
                    "model_hparams": jsonable(dict(pl_module.hparams)),
                    "datamodule_class": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
                    "datamodule_hparams": jsonable(dict(getattr(datamodule, "hparams", {}))),
                    **extra,
                }
            )
        log.info("item embeddings %s of %s written to %s", tuple(embeddings.shape), catalogue.name, self.output_dir)
        return Path(self.output_dir)


def _catalogue(trainer: L.Trainer):
    catalogue = getattr(trainer.datamodule, "catalogue", None)
    if catalogue is None:
        raise RuntimeError("ItemEmbeddingExporter needs a datamodule with a catalogue (datamodules.RecDataModule).")
    return catalogue


def _val_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {
        key.split("/", 1)[1]: float(value)
        for key, value in trainer.callback_metrics.items()
        if key.startswith("val/") and value.numel() == 1
    }
