"""The prompt view for stage 4 (preference optimisation): training prefixes as next-item prompts for rollouts.

Training batches are the sequential task only: every prefix of the training split (``items[:-2]``, history capped at
``max_history``) as the LC-Rec next-item prompt that validation and test use, left-padded for generation, with its
``target_item``, ``user`` and the ``seen_rows``/``seen_items`` of the user's history before the target (for
``mask_history`` and the behaviour-distance reward)::

    train/val/test: input_ids [B, T] (left-padded), attention_mask, target_item [B], user [B], seen_rows/seen_items [P]

Validation, test and predict are exactly stage 3's (:class:`datamodules.PromptDataModule`), so RL and SFT rows of a
results table are measured on the same users with the same prompts. ``negative_keys`` are the training interactions
that negatives for the negative-behaviour reward must avoid (:mod:`datamodules.negatives`).
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import DataLoader

from datamodules.base import Source
from datamodules.prompt_tasks import TaskWeights
from datamodules.prompts import PromptDataModule, _EvalPrompts
from datamodules.synthetic import SyntheticSpec

#: The only task whose samples are rollout prompts; the other tasks' plans stay empty (nothing is drawn for them).
SEQUENTIAL_ONLY = TaskWeights(sequential=1.0, negative=0.0, text=0.0, query=0.0)


class RolloutPromptDataModule(PromptDataModule):
    """Next-item prompts of the training prefixes (stage 4's rollouts); evaluation as in stage 3.

    Args:
        data_dir: see :class:`datamodules.RecDataModule`.
        dataset: see :class:`datamodules.RecDataModule`.
        source: see :class:`datamodules.RecDataModule`.
        processed_dir: see :class:`datamodules.RecDataModule`.
        synthetic: see :class:`datamodules.RecDataModule`.
        max_history: items of history in a prompt (20, as in LC-Rec and stage 3).
        batch_size: training prompts per optimiser step (each expands to a group of rollouts).
        eval_batch_size: evaluation prompts per batch (each is expanded to ``num_beams`` beams).
        num_workers: DataLoader workers.
        seed: seed of the evaluation subset (and of stage 3's plan, unused here).
        cold_items: items held out of every fit (see :class:`datamodules.base.RecDataModule`).
        index: the stage-2 index the stage-3 model was trained on (see :class:`datamodules.PromptDataModule`).
        dedupe_collisions: see :class:`datamodules.PromptDataModule`.
        eval_max_users: evaluate a fixed random subset of this many users (the same as stage 3's for the same seed).
        test_all_users: test every user even when ``eval_max_users`` subsets validation.
        predict_users: a file of original user ids that ``lightning predict`` covers; None = every user.
    """

    def __init__(
        self,
        data_dir: str = "data/synthetic",
        dataset: str | None = None,
        source: Source = "auto",
        processed_dir: str | None = None,
        synthetic: SyntheticSpec | None = None,
        max_history: int = 20,
        batch_size: int = 4,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
        cold_items: str | None = None,
        index: str | None = None,
        dedupe_collisions: bool = False,
        eval_max_users: int | None = None,
        test_all_users: bool = False,
        predict_users: str | None = None,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            dataset=dataset,
            source=source,
            processed_dir=processed_dir,
            synthetic=synthetic,
            max_history=max_history,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
            cold_items=cold_items,
            index=index,
            dedupe_collisions=dedupe_collisions,
            tasks=SEQUENTIAL_ONLY,
            negative_ratio=0,
            group_by_length=False,
            eval_max_users=eval_max_users,
            test_all_users=test_all_users,
            predict_users=predict_users,
        )

    @property
    def negative_pool(self) -> np.ndarray | None:
        """Items a negative may be (None: every item): cold-start items are never drawn."""
        return self.prompts.negative_pool

    @property
    def negative_keys(self) -> np.ndarray:
        """Sorted ``user * num_items + item`` keys of the training interactions (what a negative must not be)."""
        return self.prompts.keys

    def train_dataloader(self) -> DataLoader:
        """Every training prefix once per epoch, shuffled (Lightning adds a distributed sampler under DDP)."""
        rows = np.arange(len(self.split.train))
        return self._loader(_EvalPrompts(self.prompts, self.split.train, rows), self.batch_size, shuffle=True)
