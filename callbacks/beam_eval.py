"""The final evaluation of the LLM recommender: trie-constrained beam search over every test user.

The module ranks each test batch (``test_step`` -> :meth:`GenerativeRecommender.rank_items`, the same method its
per-epoch validation uses); this callback turns the results into the ``test/hr@10``-style metrics and the top-K
lists, on ``fit`` with ``test_after_fit`` and on ``lightning test --ckpt_path`` alike.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from callbacks.predictions import write_topk
from callbacks.results import run_directory
from datamodules.artifacts import atomic_write_json
from lightning_modules.base import log_topk_metrics
from lightning_modules.components.decoding import BeamBatchResult
from lightning_modules.metrics import TopKMetrics

log = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class BeamSearchEvaluator(L.Callback):
    """Collects the test batches' beam-search rankings into metrics and top-K files.

    Logs ``test/hr@1`` ... ``test/ndcg@10`` over all users of all processes (TopKMetrics' integer counts are
    summed across ranks, so the numbers equal a single-process run's) and writes, into ``output_dir``:

    * ``beam_test_metrics.json`` (rank 0): the metrics, the number of users evaluated and the dataset size;
    * ``topk_test.rank{R}.jsonl`` (every rank): the users that rank evaluated, their top-K items and scores, the
      pre-cache input. The eval loaders use an unrepeated sampler under DDP, so the shards hold every user once
      (a summed user count other than the dataset size is logged).

    Args:
        output_dir: destination directory (default: the run directory, resolved in ``setup`` on every rank since
            ``trainer.log_dir`` is a collective under DDP).
        write_topk: also write the top-K lists.
    """

    #: Read by GenerativeRecommender.on_test_start: testing without a consumer of its test_step results is refused.
    evaluates_test_batches = True

    def __init__(self, output_dir: str | None = None, write_topk: bool = True) -> None:
        self.output_dir = output_dir
        self.write_topk = write_topk
        self.directory: Path | None = None
        self.metric = TopKMetrics()
        self.users: list[int] = []
        self.items: list[list[int]] = []
        self.scores: list[list[float]] = []
        self.results: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.directory = Path(self.output_dir) if self.output_dir else run_directory(trainer)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.metric = TopKMetrics().to(pl_module.device)
        self.users, self.items, self.scores = [], [], []

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, BeamBatchResult) or outputs.ranks is None:
            raise TypeError(
                f"BeamSearchEvaluator needs test_step to return a ranked BeamBatchResult, got {type(outputs).__name__}"
            )
        self.metric.update(outputs.ranks)
        # one host copy per batch, after generation has already synchronised
        self.users += batch["user"].tolist()
        self.items += outputs.items.tolist()
        self.scores += outputs.scores.tolist()

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.results = {name: float(value) for name, value in self.metric.compute().items()}  # synced across ranks
        count = torch.tensor(len(self.users), device=pl_module.device)
        if _distributed():
            dist.all_reduce(count)
        expected = sum(len(loader.dataset) for loader in _loaders(trainer.test_dataloaders))
        if int(count) != expected:  # limit_test_batches, or a sampler that repeats or drops users
            log.warning("evaluated %d test users but the dataset has %d", int(count), expected)
        log_topk_metrics(pl_module, self.metric, "test")
        if self.write_topk:
            catalogue = getattr(trainer.datamodule, "catalogue", None)
            user_ids = [int(catalogue.user_ids[user]) for user in self.users] if catalogue is not None else self.users
            write_topk(self.directory / f"topk_test.rank{trainer.global_rank}.jsonl", user_ids, self.items, self.scores)
        if trainer.is_global_zero:
            atomic_write_json(
                self.directory / "beam_test_metrics.json",
                {
                    "metrics": self.results,
                    "users": int(count),
                    "dataset_size": expected,
                    "world_size": trainer.world_size,
                    "global_step": trainer.global_step,
                },
            )
        if _distributed():
            dist.barrier()  # every shard is on disk when any rank returns


def _loaders(loaders: Any) -> list[Any]:
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
