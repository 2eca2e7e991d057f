"""Top-K recommendation files (the input of the online pre-cache): one writer, used by ``lightning predict`` of any
recommender (:class:`TopKWriter`) and by the LLM's final evaluation (:class:`callbacks.BeamSearchEvaluator`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from callbacks.results import run_directory
from datamodules.artifacts import atomic_write


def write_topk(
    path: Path, user_ids: Sequence[int], items: Sequence[Sequence[int]], scores: Sequence[Sequence[float]] | None = None
) -> Path:
    """Write one line ``{"user": id, "items": [...](, "scores": [...])}`` per user, atomically.

    Args:
        path: destination file.
        user_ids: the original user id of each row.
        items: each user's items, best first; ``-1`` (a slot no valid item filled, e.g. under ``mask_history``) is
            dropped with its score.
        scores: the items' scores (optional); an item scored ``-inf`` (masked history) is dropped too.
    """

    def write(handle) -> None:
        for row, (user, row_items) in enumerate(zip(user_ids, items, strict=False)):
            keep = [
                n for n, item in enumerate(row_items) if item >= 0 and (scores is None or math.isfinite(scores[row][n]))
            ]
            record: dict[str, Any] = {"user": int(user), "items": [int(row_items[n]) for n in keep]}
            if scores is not None:
                record["scores"] = [round(float(scores[row][n]), 6) for n in keep]
            handle.write(json.dumps(record) + "\n")

    return atomic_write(path, write)


class TopKWriter(BasePredictionWriter):
    """Writes ``top_k.rank<R>.jsonl`` during ``lightning predict``: one line per user (see :func:`write_topk`).

    The module's ``predict_step`` returns ``{"user": [B], "items": [B, K]}`` and optionally ``"scores"``. Each rank
    writes the users it predicted (evaluation samplers never repeat a user across ranks), so the shards together
    hold every user exactly once. The directory is resolved in ``setup`` on every rank, because
    ``trainer.log_dir`` is a collective under DDP.

    Args:
        output_dir: destination directory (default: the run's log directory).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.directory: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.directory = Path(self.output_dir) if self.output_dir else run_directory(trainer)

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        users = torch.cat([batch["user"] for batch in batches]).tolist()
        items = torch.cat([batch["items"] for batch in batches]).tolist()
        scores = torch.cat([batch["scores"] for batch in batches]).tolist() if "scores" in batches[0] else None
        user_ids = trainer.datamodule.catalogue.user_ids
        write_topk(
            self.directory / f"top_k.rank{trainer.global_rank}.jsonl", [user_ids[u] for u in users], items, scores
        )
