"""Log code collisions and codebook usage after every validation, and a summary table at the end of fit."""

from __future__ import annotations

import csv
import io
import logging
from typing import Any

import lightning as L
import torch

from callbacks.results import run_directory
from datamodules.artifacts import atomic_write, atomic_write_json
from datamodules.code_index import collision_rate, level_statistics

log = logging.getLogger(__name__)


def gather_codes(
    pl_module: L.LightningModule, items: torch.Tensor, codes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' (item, codes) pairs; evaluation shards differ in size, so pad to the largest before gathering."""
    if pl_module.trainer.world_size == 1:
        return items, codes
    size = torch.tensor(len(items), device=pl_module.device)
    largest = int(pl_module.all_gather(size).max())
    pad = largest - len(items)
    items = torch.cat([items, items.new_full((pad,), -1)]).to(pl_module.device)
    codes = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])]).to(pl_module.device)
    items, codes = pl_module.all_gather(items).flatten(0, 1).cpu(), pl_module.all_gather(codes).flatten(0, 1).cpu()
    keep = items >= 0
    return items[keep], codes[keep]


class CollisionLogger(L.Callback):
    """After each validation, log ``val/collision_rate`` and per-level ``usage``/``perplexity``/``dead_codes``.

    The collision rate is the share of items whose full code tuple is shared with at least one other item
    (raw, before the exporter's resolution). Per level: the share of the ``K`` codes in use, the perplexity
    ``exp(entropy)`` of the code distribution (``K`` when perfectly balanced) and the number of unused codes.
    At the end of fit the per-validation history is written to the run directory as ``collisions.csv`` and
    ``collisions.json`` (plus ``collisions.png`` when matplotlib is installed) and sent to the logger as a
    table when it is a ``WandbLogger``.

    The model's ``validation_step`` must return ``{"item": [B], "codes": [B, L]}`` for every item.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self._items: list[torch.Tensor] = []
        self._codes: list[torch.Tensor] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._items, self._codes = [], []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if isinstance(outputs, dict) and "codes" in outputs:
            self._items.append(outputs["item"].detach().cpu())
            self._codes.append(outputs["codes"].detach().cpu())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._codes:
            return  # the sanity check sees a few batches: a collision rate over part of the catalogue means nothing
        items, codes = gather_codes(pl_module, torch.cat(self._items), torch.cat(self._codes))
        codes = codes[torch.argsort(items)]
        k = pl_module.hparams.codebook_size
        row: dict[str, float] = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "collision_rate": collision_rate(codes),
        }
        for level, stats in enumerate(level_statistics(codes, k)):
            row.update({f"level{level + 1}/{name}": value for name, value in stats.items()})
        metrics = {
            f"val/{name}": float(value)
            for name, value in row.items()
            if name not in ("epoch", "step", "collision_rate")
        }
        pl_module.log_dict(metrics, prog_bar=False, sync_dist=False)
        pl_module.log("val/collision_rate", row["collision_rate"], prog_bar=True)
        self.history.append(row)
        self._items, self._codes = [], []

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:
            return
        directory = run_directory(trainer)  # trainer.log_dir broadcasts under DDP: read on every rank
        if trainer.is_global_zero:
            self._write_summary(trainer, directory)

    def _write_summary(self, trainer: L.Trainer, directory) -> None:
        columns = list(self.history[-1])
        rows = [[row.get(column) for column in columns] for row in self.history]
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        writer.writerows(rows)
        atomic_write(directory / "collisions.csv", lambda handle: handle.write(buffer.getvalue()))
        atomic_write_json(directory / "collisions.json", self.history)
        self._plot(directory)
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="codebook/collisions", columns=columns, data=rows)
        final = self.history[-1]
        log.info(
            "collision rate %.4f%% after %d validations (table: %s)",
            100 * final["collision_rate"],
            len(self.history),
            directory / "collisions.csv",
        )

    def _plot(self, directory) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return  # the plot is a convenience; CSV/JSON carry the numbers
        steps = [row["step"] for row in self.history]
        levels = sorted({key.split("/")[0] for key in self.history[-1] if key.startswith("level")})
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot(steps, [100 * row["collision_rate"] for row in self.history], marker="o")
        left.set(xlabel="step", ylabel="collision rate (%)", title="items sharing a code tuple")
        for level in levels:
            right.plot(steps, [row[f"{level}/perplexity"] for row in self.history], label=level)
        right.set(xlabel="step", ylabel="perplexity", title="code usage per level")
        right.legend()
        figure.tight_layout()
        atomic_write(directory / "collisions.png", lambda handle: figure.savefig(handle, format="png"), mode="wb")
        plt.close(figure)
