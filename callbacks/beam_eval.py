"""Final evaluation of the LLM recommender by trie-constrained beam search, plus the pre-cache top-K lists.

The same per-batch code (:func:`lightning_modules.components.decoding.beam_eval_batch`) serves the LLM
module's ``validation_step``/``test_step`` (``lightning test --ckpt_path best``); this callback runs it once over
the datamodule's validation and test loaders when fitting ends, on the weights training ended with.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from callbacks.results import run_directory
from datamodules.artifacts import atomic_write, atomic_write_json
from lightning_modules.components.decoding import beam_eval_batch
from lightning_modules.metrics import TopKMetrics

log = logging.getLogger(__name__)

#: Stage name -> the metric-key prefix the rest of the framework uses (``val/hr@10``, ``test/ndcg@5``).
STAGE_PREFIX = {"valid": "val", "test": "test"}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def evaluate_loader(
    module: Any, loader: Iterable[dict[str, torch.Tensor]], metric: TopKMetrics, num_beams: int, top_k: int, device: torch.device
) -> tuple[list[int], list[list[int]], list[list[float]]]:
    """Beam-search every batch of ``loader``, update ``metric`` and return this process's top-K lists.

    Args:
        module: exposes ``.model`` (HF causal LM), ``.tokenizer`` and ``.code_trie``.
        loader: eval batches with ``input_ids``/``attention_mask`` (left-padded), ``target_item`` and ``user``.
        metric: updated with the target ranks (its states are sums, so ranks can be synced later).
        num_beams: beam width.
        top_k: items per user.
        device: where generation runs.

    Returns:
        user rows, item lists and score lists (padding items ``-1`` dropped), in loader order.
    """
    users: list[int] = []
    items: list[list[int]] = []
    scores: list[list[float]] = []
    for batch in loader:
        batch = _to_device(batch, device)
        result = beam_eval_batch(module, batch, num_beams=num_beams, top_k=top_k)  # the module's mask_history
        metric.update(result.ranks)
        # One host copy per batch (after generation has already synchronised), not per step.
        for user, row_items, row_scores in zip(batch["user"].tolist(), result.items.tolist(), result.scores.tolist()):
            users.append(int(user))
            items.append([item for item in row_items if item >= 0])
            scores.append(row_scores[: len(items[-1])])
    return users, items, scores


def write_topk(path: Path, user_ids: Sequence[int], items: list[list[int]], scores: list[list[float]]) -> Path:
    """Write ``{"user": id, "items": [...], "scores": [...]}`` lines atomically."""

    def write(handle) -> None:
        for user, row_items, row_scores in zip(user_ids, items, scores):
            handle.write(json.dumps({"user": int(user), "items": row_items, "scores": [round(s, 6) for s in row_scores]}) + "\n")

    return atomic_write(path, write)


class BeamSearchEvaluator(L.Callback):
    """At the end of ``fit``, rank every validation/test user's items by constrained beam search.

    Writes, into ``output_dir`` (default: the run directory):

    * ``beam_{stage}_metrics.json`` (rank 0): HR@1/5/10 and NDCG@5/10 over all users of all processes;
    * ``topk_{stage}.rank{R}.jsonl`` (every rank): the users that rank evaluated with their top-K items — the
      pre-cache input. The datamodule's eval loaders use an unrepeated sampler under DDP, so the shards together
      hold every user exactly once (checked: the synced user count must equal the dataset size).

    The metrics are also logged to the trainer's loggers as ``{log_prefix}val/hr@10``-style keys. The module
    must expose ``.model``, ``.tokenizer`` and ``.code_trie``; the model is evaluated on
    ``trainer.strategy.root_device`` unsharded (not for FSDP/DeepSpeed-sharded models).

    Args:
        num_beams: beam width.
        top_k: items returned per user (at least the largest metric cut-off, 10).
        stages: any of ``"valid"``, ``"test"``.
        output_dir: destination directory.
        log_prefix: prepended to the logged keys (e.g. ``"beam_"`` to keep teacher-forced ``val/*`` apart).
    """

    def __init__(
        self,
        num_beams: int = 20,
        top_k: int = 20,
        stages: list[str] | None = None,
        output_dir: str | None = None,
        log_prefix: str = "",
    ) -> None:
        stages = ["valid", "test"] if stages is None else list(stages)
        unknown = [stage for stage in stages if stage not in STAGE_PREFIX]
        if unknown:
            raise ValueError(f"unknown stages {unknown}; choose from {sorted(STAGE_PREFIX)}")
        if top_k > num_beams:
            raise ValueError(f"top_k ({top_k}) cannot exceed num_beams ({num_beams})")
        if top_k < TopKMetrics().max_k:
            raise ValueError(f"top_k ({top_k}) must be at least {TopKMetrics().max_k} for HR@10/NDCG@10")
        self.num_beams = num_beams
        self.top_k = top_k
        self.stages = stages
        self.output_dir = output_dir
        self.log_prefix = log_prefix
        self.results: dict[str, dict[str, float]] = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, dict[str, float]]:
        """Run every stage; callable on all ranks at any point after ``setup`` (e.g. from ``on_fit_end``)."""
        for name in ("model", "tokenizer", "code_trie"):
            if getattr(pl_module, name, None) is None:
                raise AttributeError(f"{type(pl_module).__name__} has no `{name}`; BeamSearchEvaluator needs .model, .tokenizer, .code_trie")
        directory = Path(self.output_dir) if self.output_dir else run_directory(trainer)  # collective: all ranks
        device = trainer.strategy.root_device
        home, was_training = pl_module.device, pl_module.training
        # Lightning's teardown moved the module to CPU before on_fit_end; evaluate on the training device.
        pl_module.to(device).eval()
        try:
            for stage in self.stages:
                self.results[stage] = self._evaluate_stage(trainer, pl_module, stage, directory, device)
        finally:
            pl_module.to(home).train(was_training)
        if _distributed():
            dist.barrier()  # every shard is on disk when any rank returns
        return self.results

    def _evaluate_stage(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, directory: Path, device: torch.device
    ) -> dict[str, float]:
        datamodule = trainer.datamodule
        loader = datamodule.val_dataloader() if stage == "valid" else datamodule.test_dataloader()
        metric = TopKMetrics().to(device)
        users, items, scores = evaluate_loader(pl_module, loader, metric, self.num_beams, self.top_k, device)
        values = {name: float(value) for name, value in metric.compute().items()}  # syncs the sums across ranks
        count = torch.tensor(len(users), device=device)
        if _distributed():
            dist.all_reduce(count)
        expected = len(loader.dataset)
        if int(count) != expected:
            log.warning("%s: evaluated %d users but the dataset has %d; the eval sampler repeats or drops users", stage, int(count), expected)
        catalogue = getattr(datamodule, "catalogue", None)
        user_ids = [int(catalogue.user_ids[user]) for user in users] if catalogue is not None else users
        write_topk(directory / f"topk_{stage}.rank{trainer.global_rank}.jsonl", user_ids, items, scores)
        prefix = f"{self.log_prefix}{STAGE_PREFIX[stage]}/"
        if trainer.is_global_zero:
            record = {
                "metrics": values,
                "users": int(count),
                "dataset_size": expected,
                "num_beams": self.num_beams,
                "top_k": self.top_k,
                "world_size": trainer.world_size,
                "global_step": trainer.global_step,
            }
            atomic_write_json(directory / f"beam_{stage}_metrics.json", record)
        for logger in trainer.loggers:  # loggers write on rank 0 only
            logger.log_metrics({prefix + name: value for name, value in values.items()}, step=trainer.global_step)
        return values
