"""The prompt view for stage 3 (Alignment Tasks): instruction-tuning samples for the LLM.

Training batches mix the paper's alignment tasks (see :mod:`datamodules.prompt_tasks` and
:mod:`datamodules.prompt_templates`):

* **sequential**: the last ``max_history`` items of every training prefix (codes joined by ", ") -> next item;
* **negative behaviour**: the same histories -> an item the user never interacted with (``negative_ratio``
  per sequential sample, re-drawn every epoch);
* **text alignment**: codes -> title / description and title / description -> codes (items with text);
* **query alignment**: a review of a *training* interaction -> the reviewed item's codes (datasets with reviews).

``task_preset: lcrec`` trains on LC-Rec's task set and wording instead (:mod:`datamodules.lcrec_tasks`: seqrec,
item2index, index2item, fusionseqrec, itemsearch); the batches and the evaluation prompts are the same.

Batch formats::

    train: input_ids [B, T] (right-padded), attention_mask, labels (-100 except response + EOS), task [B], dropped [4]
    train, packed: input_ids/position_ids/labels [B, T] (B packs), attention_mask [B, 1, T, T] bool, task [N],
    dropped [4]
    val/test: input_ids [B, T] (left-padded LC-Rec prompt), attention_mask, target_item [B], user [B],
              seen_rows/seen_items [P] (the user's whole history before the target, for ``mask_history``)

Validation predicts ``items[-2]`` from ``items[:-2][-20:]``, test ``items[-1]`` from ``items[:-1][-20:]``.
The DataModule has no tokenizer of its own: the model hands over its tokenizer (with the code tokens and a pad
token added) through :meth:`PromptDataModule.set_tokenizer` in ``configure_model``, so nothing is loaded twice.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.base import RecDataModule, Source, _identity_collate
from datamodules.errors import require
from datamodules.item_index import ItemIndex, load_item_index
from datamodules.lcrec_tasks import LCRecTasks, LCRecTaskWeights
from datamodules.predict_prompts import PredictPrompts, read_user_list
from datamodules.prompt_tasks import PromptTasks, TaskWeights
from datamodules.split import SampleIndex
from datamodules.synthetic import SyntheticSpec

log = logging.getLogger(__name__)

Preset = Literal["all", "behaviour_only"]
TaskPreset = Literal["paper", "lcrec"]
# The instruction templates alone take ~50 Llama tokens: a shorter limit would drop every training sample.
MIN_MAX_LENGTH = 64
PRESETS = {"all": TaskWeights(), "behaviour_only": TaskWeights(sequential=1.0, negative=1.0, text=0.0, query=0.0)}


class _TrainPrompts(Dataset):
    def __init__(self, tasks: PromptTasks) -> None:
        self.tasks = tasks

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitems__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return self.tasks.train_batch(np.asarray(rows, dtype=np.int64))


class LengthGroupedPlan(Sampler[int]):
    """Shuffled batches of similar length from the *current* epoch plan (re-read at every ``iter``).

    The grouping is transformers' ``get_length_grouped_indices`` (shuffle, then sort inside mega-batches of 50
    batches): one long description no longer pads 63 short behaviour prompts. The plan is re-drawn by
    ``set_epoch`` before each epoch's iterator is created, so the lengths are taken when iterating starts.
    """

    def __init__(self, tasks: PromptTasks, batch_size: int, seed: int) -> None:
        self.tasks, self.batch_size, self.seed, self.epoch = tasks, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from length_grouped_order(np.asarray(self.tasks.approx_lengths()), self.batch_size, generator).tolist()


def length_grouped_order(lengths: np.ndarray, batch_size: int, generator: torch.Generator) -> np.ndarray:
    """A shuffled order in which consecutive ``batch_size`` rows have similar lengths (the longest row first).

    The order of transformers' ``get_length_grouped_indices`` (a private Trainer helper, so not imported): shuffle
    with ``generator``, cut into mega-batches of ``min(N // (4 * batch_size), 50)`` batches (at least one), sort each
    by decreasing length (ties keep the shuffled order), then swap the longest row to the front so an
    out-of-memory error shows in the first step rather than hours later.

    Args:
        lengths: ``[N]`` row lengths.
        batch_size: rows per batch.
        generator: the epoch's torch generator (the shuffle).

    Returns:
        ``[N]`` int64 row indices.
    """
    lengths = np.asarray(lengths)
    mega_size = max(min(len(lengths) // (batch_size * 4), 50), 1) * batch_size
    order = torch.randperm(len(lengths), generator=generator).numpy()
    mega = np.arange(len(order)) // mega_size
    order = order[np.lexsort((-lengths[order], mega))]  # stable: by mega-batch, then decreasing length
    if len(order):
        starts = np.arange(0, len(order), mega_size)
        longest = starts[int(np.argmax(lengths[order[starts]]))]
        order[[0, longest]] = order[[longest, 0]]
    return order.astype(np.int64)


class _EvalPrompts(Dataset):
    def __init__(self, tasks: PromptTasks, index: SampleIndex, rows: np.ndarray) -> None:
        self.tasks, self.index, self.rows = tasks, index, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return self.tasks.eval_batch(self.index, self.rows[np.asarray(rows, dtype=np.int64)])


class PromptDataModule(RecDataModule):
    """Alignment-task prompts over the catalogue, the leave-last-out split and an item index.

    Args:
        data_dir: see :class:`datamodules.RecDataModule`.
        dataset: see :class:`datamodules.RecDataModule`.
        source: see :class:`datamodules.RecDataModule`.
        processed_dir: see :class:`datamodules.RecDataModule`.
        synthetic: see :class:`datamodules.RecDataModule`.
        max_history: items of history in a prompt (20, as in LC-Rec).
        batch_size: training prompts per batch (packs with ``pack_prompts``: ``pack_prompts`` training prefixes and
            their negatives, ~``pack_prompts x (1 + negative_ratio)`` prompts, make one pack).
        eval_batch_size: evaluation prompts per batch (each is expanded to ``num_beams`` beams).
        num_workers: DataLoader workers (tokenization runs in them).
        seed: seed of the per-epoch draws (negatives, task subsets, templates) and of the evaluation subset.
        cold_items: items held out of every fit (see :class:`datamodules.base.RecDataModule`).
        index: a stage-2 export directory (``index.json`` + ``manifest.json``, checked against this dataset) or
            an LC-Rec ``index.json``; None uses the dataset's own ``<Name>.index.json``.
        dedupe_collisions: accept an index whose items share code tuples by appending a disambiguating level
            (see :mod:`datamodules.item_index`); otherwise a colliding index is an error.
        tasks: per-task weights; they scale how many samples of each task an epoch holds (0 disables a task).
        negative_ratio: negative-behaviour samples per sequential sample (the paper's 1:N; 0 = "w/o NS").
        max_length: training samples with more tokens (prompt + response + EOS) are dropped; the count is
            logged as ``train/dropped_long``. Evaluation prompts are never dropped.
        preset: ``behaviour_only`` = sequential + negative (the paper's Table 8), ``all`` = every task at
            weight 1; a preset replaces ``tasks`` (set one or the other).
        eval_max_users: evaluate a fixed random subset of this many users (the same for val and test;
            for CPU runs); None evaluates every user.
        test_all_users: test every user even when ``eval_max_users`` subsets validation (which runs each
            epoch): test metrics then compare with baselines evaluated on all users.
        group_by_length: batch samples of similar length together (shuffled groups, see
            :class:`LengthGroupedPlan`): less padding, the same samples per epoch.
        pack_prompts: 0 = one sample per row; ``n >= 1`` lays up to ``n`` consecutive training prefixes of a user
            with their negatives out as one prefix tree (the shared history once; :mod:`datamodules.packing`):
            the same per-sample loss for ~2.6x (``1``) to ~4x (``8``) fewer token columns at 1:3 negatives;
            ``batch_size`` then counts packs. Needs an attention implementation that takes a 4-D mask (SDPA or
            eager, not flash-attention-2).
        predict_users: a file of original user ids (one a line) that ``lightning predict`` covers; None = every user.
        task_preset: the task set: ``paper`` (sequential, negative, text, query; weighted by ``tasks`` / ``preset``)
            or ``lcrec`` (LC-Rec's seqrec, item2index, index2item, fusionseqrec, itemsearch with its prompt wording,
            :mod:`datamodules.lcrec_tasks`; weighted by ``lcrec_tasks``; no negatives, no packing).
        lcrec_tasks: per-task weights of the ``lcrec`` preset (:class:`datamodules.lcrec_tasks.LCRecTaskWeights`);
            None = every task at weight 1.
    """

    def __init__(
        self,
        data_dir: str = "data/synthetic",
        dataset: str | None = None,
        source: Source = "auto",
        processed_dir: str | None = None,
        synthetic: SyntheticSpec | None = None,
        max_history: int = 20,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
        cold_items: str | None = None,
        index: str | None = None,
        dedupe_collisions: bool = False,
        tasks: TaskWeights | None = None,
        negative_ratio: int = 3,
        max_length: int = 2048,
        preset: Preset | None = None,
        eval_max_users: int | None = None,
        test_all_users: bool = False,
        group_by_length: bool = True,
        pack_prompts: int = 0,
        predict_users: str | None = None,
        task_preset: TaskPreset = "paper",
        lcrec_tasks: LCRecTaskWeights | None = None,
    ) -> None:
        super().__init__(
            data_dir,
            dataset,
            source,
            processed_dir,
            synthetic,
            max_history,
            batch_size,
            eval_batch_size,
            num_workers,
            seed,
            cold_items=cold_items,
        )
        field = "data.init_args."
        require(
            preset is None or tasks is None or tasks == PRESETS[preset],
            field + "tasks",
            f"unset when preset {preset!r} is set (the preset replaces `tasks`; set one or the other)",
            tasks,
        )
        require(negative_ratio >= 0, field + "negative_ratio", ">= 0 (0 = no negative task)", negative_ratio)
        require(max_length >= MIN_MAX_LENGTH, field + "max_length", f">= {MIN_MAX_LENGTH} tokens", max_length)
        require(pack_prompts >= 0, field + "pack_prompts", ">= 0 (0 = no packing)", pack_prompts)
        require(eval_max_users is None or eval_max_users >= 1, field + "eval_max_users", ">= 1 or null", eval_max_users)
        require(task_preset in ("paper", "lcrec"), field + "task_preset", "paper or lcrec", task_preset)
        if task_preset == "lcrec":
            # the paper preset's knobs have no meaning for LC-Rec's tasks: refuse them rather than ignore them
            paper_only = {"tasks": tasks, "preset": preset}
            for name, value in paper_only.items():
                require(value is None, field + name, "unset with task_preset: lcrec (weights: lcrec_tasks)", value)
            require(
                negative_ratio == 0,
                field + "negative_ratio",
                "0 with task_preset: lcrec (no negative task)",
                negative_ratio,
            )
            require(pack_prompts == 0, field + "pack_prompts", "0 with task_preset: lcrec", pack_prompts)
        else:
            require(lcrec_tasks is None, field + "lcrec_tasks", "unset unless task_preset: lcrec", lcrec_tasks)
        self.index = index
        self.dedupe_collisions = dedupe_collisions
        self.task_weights = PRESETS[preset] if preset is not None else (tasks or TaskWeights())
        self.negative_ratio = negative_ratio
        self.max_length = max_length
        self.eval_max_users = eval_max_users
        self.test_all_users = test_all_users
        self.group_by_length = group_by_length
        self.pack_prompts = pack_prompts
        self.predict_users = predict_users
        self.task_preset = task_preset
        self.lcrec_weights = lcrec_tasks or LCRecTaskWeights()
        self.item_index: ItemIndex | None = None
        self.prompts: PromptTasks | None = None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.prompts is None:
            # cold-start items (an index extended after training) are decoded and recommended, never trained on
            self.item_index = load_item_index(self.index, self.catalogue, self.dedupe_collisions, new_items=True)
            log.info(
                "item index %s: %d items x %d codes (L=%d, K=%d; %d cold-start items)",
                self.item_index.source,
                len(self.item_index.codes),
                self.item_index.tokens_per_item,
                self.item_index.num_levels,
                self.item_index.codebook_size,
                self.item_index.new_items,
            )
            if self.task_preset == "lcrec":
                self.prompts = LCRecTasks(
                    self.catalogue, self.split, self.item_index, self.lcrec_weights, self.max_length, self.seed
                )
            else:
                self.prompts = PromptTasks(
                    self.catalogue,
                    self.split,
                    self.item_index,
                    self.task_weights,
                    self.negative_ratio,
                    self.max_length,
                    self.seed,
                    pack=self.pack_prompts,
                )

    def set_tokenizer(self, tokenizer) -> None:
        """Called by the model once its tokenizer holds the code tokens (and a pad token)."""
        if self.prompts is None:
            raise RuntimeError("set_tokenizer() before setup(): the item index is not loaded yet")
        self.prompts.set_tokenizer(tokenizer)

    def set_epoch(self, epoch: int) -> None:
        """Re-draw negatives, task subsets and templates for ``epoch`` (the model calls it each epoch start)."""
        self.prompts.set_epoch(epoch)

    def eval_rows(self, stage: str = "valid") -> np.ndarray:
        """Users evaluated at ``stage``: all, or a fixed seeded subset of ``eval_max_users`` (sorted)."""
        num_users = self.catalogue.num_users
        if self.eval_max_users is None or self.eval_max_users >= num_users or (stage == "test" and self.test_all_users):
            return np.arange(num_users)
        return np.sort(np.random.default_rng(self.seed).choice(num_users, self.eval_max_users, replace=False))

    def train_dataloader(self) -> DataLoader:
        # Workers must not persist: each epoch's iterator has to see the plan re-drawn by set_epoch().
        sampler = LengthGroupedPlan(self.prompts, self.batch_size, self.seed) if self.group_by_length else None
        return DataLoader(
            _TrainPrompts(self.prompts),
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_identity_collate,
            persistent_workers=False,
        )

    def _eval_loader(self, stage: str) -> DataLoader:
        return self._loader(
            _EvalPrompts(self.prompts, self.split.samples(stage), self.eval_rows(stage)),
            self.eval_batch_size,
            shuffle=False,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Every user (or those of ``predict_users``) with their whole sequence's last ``max_history`` items."""
        rows = np.arange(self.catalogue.num_users)
        if self.predict_users is not None:
            rows = read_user_list(self.predict_users, self.catalogue.user_ids)
        return self._loader(PredictPrompts(self.prompts, rows), self.eval_batch_size, shuffle=False)
