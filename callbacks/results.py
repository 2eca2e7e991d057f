"""Write each run's final metrics as JSON into its log directory and print them as a table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L

from datamodules.artifacts import atomic_write_json


def run_directory(trainer: L.Trainer) -> Path:
    """The run's log directory (the logger's versioned directory, else ``default_root_dir``).

    ``trainer.log_dir`` broadcasts rank 0's directory under a distributed strategy, so this must be called on every
    rank (never from inside a ``rank_zero_only`` hook): a rank that skips it leaves the others waiting forever.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


class MetricsWriter(L.Callback):
    """Writes ``val_metrics.json`` after every validation and ``test_metrics.json`` after testing.

    Each file holds the stage's metrics (``hr@K``/``ndcg@K``), the epoch, the global step and, when a
    checkpoint callback exists, the best checkpoint path and score, so every run leaves a
    machine-readable result. At test end the metrics are also printed as a table. Every rank runs the hooks
    (the run directory is agreed on by a collective); only rank 0 writes and prints.

    Args:
        print_table: print a rich table of the test metrics at the end of testing.
    """

    def __init__(self, print_table: bool = True) -> None:
        self.print_table = print_table

    @staticmethod
    def _collect(trainer: L.Trainer, prefix: str) -> dict[str, float]:
        return {
            key.split("/", 1)[1]: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith(prefix + "/") and value.numel() == 1
        }

    def _write(self, trainer: L.Trainer, prefix: str) -> tuple[Path, dict[str, Any]] | None:
        directory = run_directory(trainer)  # a collective: every rank must get here
        metrics = self._collect(trainer, prefix)
        if not metrics or not trainer.is_global_zero:
            return None
        record: dict[str, Any] = {
            "metrics": metrics,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
        }
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "best_model_path", ""):
            score = checkpoint.best_model_score
            record["best_checkpoint"] = checkpoint.best_model_path
            record["best_score"] = None if score is None or math.isnan(float(score)) else float(score)
            record["monitor"] = checkpoint.monitor
        datamodule = trainer.datamodule
        stats = getattr(datamodule, "statistics", None)
        if stats is not None:
            record["dataset"] = {"name": datamodule.catalogue.name, **stats.as_dict()}
        path = directory / f"{prefix}_metrics.json"
        atomic_write_json(path, record)
        return path, record

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        written = self._write(trainer, "test")
        if written is not None and self.print_table:
            path, record = written
            print_metrics_table(record["metrics"], title="test metrics")
            print(f"written to {path}")


def print_metrics_table(metrics: dict[str, float], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in metrics:
        table.add_column(name.upper(), justify="right")
    table.add_row(*(f"{value:.4f}" for value in metrics.values()))
    Console().print(table)


def load_metrics(path: str | Path) -> dict[str, float]:
    """Read the ``metrics`` of a ``*_metrics.json`` file."""
    return json.loads(Path(path).read_text())["metrics"]
