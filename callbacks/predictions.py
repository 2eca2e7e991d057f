"""Write every user's top-K recommendations (the input of the online pre-cache) during ``lightning predict``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from callbacks.results import run_directory
from datamodules.artifacts import atomic_write


class TopKWriter(BasePredictionWriter):
    """Writes ``top_k.rank<R>.jsonl``: one line ``{"user": <original user id>, "items": [item, ...]}`` per user.

    Each rank writes the users it predicted (evaluation samplers never repeat a user across ranks), so the
    shards together hold every user exactly once.

    Args:
        output_dir: destination directory (default: the run's log directory).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        users = torch.cat([batch["user"] for batch in batches]).tolist()
        top_items = torch.cat([batch["top_items"] for batch in batches]).tolist()
        user_ids = trainer.datamodule.catalogue.user_ids
        directory = Path(self.output_dir) if self.output_dir else run_directory(trainer)
        path = directory / f"top_k.rank{trainer.global_rank}.jsonl"

        def write(handle) -> None:
            for user, items in zip(users, top_items):
                # -1 pads a list whose seen items were dropped (a generative model's `mask_history`)
                handle.write(json.dumps({"user": int(user_ids[user]), "items": [item for item in items if item >= 0]}) + "\n")

        atomic_write(path, write)
