"""The alignment-task samples of one epoch and their tokenization (used by :class:`datamodules.PromptDataModule`).

An epoch is a *plan*: parallel arrays ``task``, ``source`` (row of the task's source table), ``item`` (the
item the response names, or whose text it is) and ``template``. Only the plan is re-drawn each epoch (negative
items, task subsampling, templates, all from ``default_rng((seed, epoch))``); strings are rendered and
tokenized per batch with the fast tokenizer, which costs far less than one LLM step.

Each training sequence is ``prompt ids + response ids + [EOS]``. Item codes in a response are the code
tokens' ids directly (exactly what the constrained decoder emits after ``### Response:``); text responses
are tokenized without special tokens. Labels are ``-100`` on the prompt and on padding.

The source tables are read by :mod:`datamodules.task_sources`, packs are planned by :mod:`datamodules.pack_plan`,
and token lists become batch tensors in :mod:`datamodules.prompt_batches`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from datamodules.catalogue import Catalogue
from datamodules.cold_items import cold_items_of
from datamodules.errors import require
from datamodules.item_index import ItemIndex
from datamodules.negatives import interaction_keys, sample_negatives
from datamodules.pack_plan import pack_lengths, plan_packs
from datamodules.prompt_batches import left_padded, packed, right_padded, tokenize_samples
from datamodules.prompt_templates import (
    HISTORY_SEPARATOR,
    NEGATIVE,
    QUERY,
    SEQUENTIAL,
    TEMPLATE_DRAW,
    TEXT_KINDS,
    eval_prompt,
    frame,
)
from datamodules.split import LeaveLastOutSplit, SampleIndex
from datamodules.task_sources import text_pairs, training_queries

log = logging.getLogger(__name__)

TASKS = ("sequential", "negative", "text", "query")
SEQUENTIAL_TASK, NEGATIVE_TASK, TEXT_TASK, QUERY_TASK = range(len(TASKS))


@dataclass(frozen=True)
class TaskWeights:
    """How much of each alignment task an epoch holds.

    A weight scales the task's number of samples per epoch: ``round(w * n)`` of its ``n`` natural samples
    (``w < 1`` draws a fresh subset every epoch, ``w > 1`` repeats samples); ``0`` disables the task. The loss
    stays a plain mean over response tokens, so weights act through sampling only.

    Args:
        sequential: next-item samples (every training prefix, as in LC-Rec).
        negative: negative-behaviour samples (``negative_ratio`` per sequential sample).
        text: text alignment (codes -> title / description, title / description -> codes).
        query: query alignment (review text -> the reviewed item's codes).
    """

    sequential: float = 1.0
    negative: float = 1.0
    text: float = 1.0
    query: float = 1.0

    def __post_init__(self) -> None:
        for name in TASKS:
            if getattr(self, name) < 0:
                raise ValueError(f"task weight {name} must be >= 0, got {getattr(self, name)}")

    def as_tuple(self) -> tuple[float, ...]:
        return tuple(float(getattr(self, name)) for name in TASKS)


def _scaled(rows: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray:
    """``round(weight * len(rows))`` rows: whole repeats plus a random subset for the fractional part."""
    count = int(round(weight * len(rows)))
    if count == 0 or len(rows) == 0:
        return rows[:0]
    repeats, rest = divmod(count, len(rows))
    return np.concatenate([np.tile(rows, repeats), rng.choice(rows, rest, replace=False)])


def char_counts(texts: list[str]) -> np.ndarray:
    """``[len(texts)]`` character count of each text."""
    return np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))


class PromptTasks:
    """Sources of the four alignment tasks, the epoch plan, and batch rendering / tokenization.

    A task preset (e.g. :class:`datamodules.lcrec_tasks.LCRecTasks`) subclasses it with its own ``TASK_NAMES``,
    ``_build_sources``, ``_plan_parts``, ``_task_source_lengths`` and ``render``; the plan, the tokenization, the
    batches and the evaluation prompts are this class's.

    Args:
        catalogue: the dataset.
        split: its leave-last-out split (training prefixes feed the behaviour tasks).
        item_index: the items' code tuples.
        weights: task weights (see :class:`TaskWeights`).
        negative_ratio: negatives per sequential sample (0 = no negative task, the paper's "w/o NS").
        max_length: training sequences longer than this (prompt + response + EOS) are dropped and counted.
        seed: base seed; epoch ``e`` draws from ``default_rng((seed, e))``.
        pack: 0 keeps one sample per row; ``n >= 1`` makes the training unit a *pack*
            (:mod:`datamodules.packing`): up to ``n`` consecutive training prefixes of one user with their
            negatives share one row as a prefix tree (the history once; ``1`` = a sequential sample and its
            negatives); text and query samples are packed in random groups of the mean behaviour pack's size, so
            each task keeps its share of the optimiser steps (batches count packs). A pack draws one template for
            all its samples (negatives take the sequential template's negative twin when it has one, so each
            wording's marginal stays uniform), so they share the prompt up to the question. The loss of every
            sample is unchanged.
    """

    #: the preset's task names, indexed by the plan's task ids (``dropped`` counts per task in this order)
    TASK_NAMES: tuple[str, ...] = TASKS

    def __init__(
        self,
        catalogue: Catalogue,
        split: LeaveLastOutSplit,
        item_index: ItemIndex,
        weights: TaskWeights,
        negative_ratio: int,
        max_length: int,
        seed: int,
        pack: int = 0,
    ) -> None:
        require(negative_ratio >= 0, "data.init_args.negative_ratio", ">= 0", negative_ratio)
        require(pack >= 0, "data.init_args.pack_prompts", ">= 0 (0 = no packing)", pack)
        self.catalogue, self.split, self.item_index = catalogue, split, item_index
        self.weights, self.negative_ratio, self.max_length, self.seed = weights, negative_ratio, max_length, seed
        self.pack = pack
        self.code_text = ["".join(tokens) for tokens in item_index.tokens()]
        self.train_targets = catalogue.items[split.train.target_pos]
        # negatives exclude the training interactions only (no held-out target): see datamodules.negatives
        self.keys = interaction_keys(*split.train_interactions(), catalogue.num_items)
        # items coded by cold start (held out by the protocol, or added after training) train nothing: no text
        # sample and no negative names them
        cold = np.union1d(cold_items_of(catalogue), item_index.cold_start_items())
        self.cold_items = cold[cold < catalogue.num_items]
        self.negative_pool = np.setdiff1d(np.arange(catalogue.num_items), self.cold_items) if cold.size else None
        self._build_sources()
        self.tokenizer = None
        self._source_lengths: tuple[np.ndarray, ...] | None = None
        self.epoch = -1
        self.set_epoch(0)

    # ---------------------------------------------------------------------------------------- sources
    def _build_sources(self) -> None:
        """The tasks' source tables (text pairs, queries); negatives need a user who lacks some item."""
        catalogue = self.catalogue
        if (
            self.weights.negative > 0
            and self.negative_ratio > 0
            and (np.bincount(self.keys // catalogue.num_items) >= catalogue.num_items).any()
        ):
            raise ValueError(
                "a user interacted with every item in training, so no negative item exists; set negative_ratio: 0"
            )
        self._build_text_pairs()
        self._build_queries("the query-alignment task" if self.weights.query > 0 else None)

    def _build_text_pairs(self) -> None:
        self.texts, self.text_item, self.text_kind = text_pairs(self.catalogue, self.cold_items)
        if self.weights.text > 0 and not len(self.text_item):
            log.info("%s has no item text: the text-alignment task is skipped", self.catalogue.name)

    def _build_queries(self, task: str | None) -> None:
        """Reviews of training interactions only (``items[:-2]``, never a validation or test target); ``task``
        names the task that uses them in the log line of a dataset without reviews (None: not used, no line)."""
        self.query_item, self.query_text, reviews = training_queries(self.catalogue, self.split)
        if not reviews:
            if task is not None:
                log.info("%s has no reviews: %s is skipped", self.catalogue.name, task)
            return
        log.info("query alignment: %d of %d reviews are of training interactions", len(self.query_item), reviews)

    # ------------------------------------------------------------------------------------------ plan
    def set_epoch(self, epoch: int) -> None:
        """Draw the epoch's samples (negatives, subsets, templates); deterministic in ``(seed, epoch)``."""
        if epoch == self.epoch:
            return
        rng = np.random.default_rng((self.seed, epoch))
        parts = self._plan_parts(rng)
        self.task = np.concatenate([np.full(len(rows), task, dtype=np.int64) for task, rows, _ in parts])
        self.source = np.concatenate([rows for _, rows, _ in parts])
        self.item = np.concatenate([items for _, _, items in parts])
        self.template = rng.integers(0, TEMPLATE_DRAW, len(self.task))
        self.counts = {self.TASK_NAMES[task]: len(rows) for task, rows, _ in parts}
        if self.pack:
            self._plan_packs(rng)
        if self.epoch < 0:
            log.info("alignment tasks per epoch: %s (negative ratio 1:%d)", self.counts, self.negative_ratio)
        self.epoch = epoch

    def _plan_parts(self, rng: np.random.Generator) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``(task id, source rows, response items)`` of each task for one epoch, drawn from ``rng``."""
        weights = self.weights
        train_rows = np.arange(len(self.split.train))
        sequential = _scaled(train_rows, weights.sequential, rng)
        negative = _scaled(np.repeat(train_rows, self.negative_ratio), weights.negative, rng)
        negative_items = sample_negatives(
            self.keys, self.split.train.user[negative], self.catalogue.num_items, rng, allowed=self.negative_pool
        )
        text = _scaled(np.arange(len(self.text_item)), weights.text, rng)
        query = _scaled(np.arange(len(self.query_item)), weights.query, rng)
        return [
            (SEQUENTIAL_TASK, sequential, self.train_targets[sequential]),
            (NEGATIVE_TASK, negative, negative_items),
            (TEXT_TASK, text, self.text_item[text]),
            (QUERY_TASK, query, self.query_item[query]),
        ]

    def _plan_packs(self, rng: np.random.Generator) -> None:
        """Group the plan into packs (``self.pack`` training prefixes of one user each) and align templates."""
        behaviour = np.flatnonzero(self.task <= NEGATIVE_TASK)
        others = [np.flatnonzero(self.task == task) for task in (TEXT_TASK, QUERY_TASK)]
        is_negative = self.task == NEGATIVE_TASK
        plan = plan_packs(behaviour, is_negative, others, self.source, self.split.train.user, self.pack, rng)
        self.pack_rows, self.pack_offsets, self.pack_prefixes = plan.rows, plan.offsets, plan.prefixes
        self.template[plan.behaviour] = plan.templates

    def __len__(self) -> int:
        """Training units of the epoch: samples, or packs when packing."""
        return len(self.pack_offsets) - 1 if self.pack else len(self.task)

    def unit_rows(self, units: np.ndarray) -> list[np.ndarray]:
        """The plan rows of each training unit."""
        if not self.pack:
            return [np.array([unit]) for unit in units]
        return [self.pack_rows[self.pack_offsets[unit] : self.pack_offsets[unit + 1]] for unit in units]

    def approx_lengths(self) -> np.ndarray:
        """Rough token counts of the epoch's units, for length-grouped batching (no tokenizing).

        A pack counts as its longest sample, a response-sized branch per further sample and a question-sized
        branch (~30 tokens: the wording after the history) per further prefix.

        Behaviour samples: history items x (code tokens + separator); text and query samples: characters / 4
        (about a Llama-2 token). Only the order of the lengths matters.
        """
        if self._source_lengths is None:
            self._source_lengths = self._task_source_lengths()
        lengths = np.zeros(len(self.task), dtype=np.int64)
        for task, per_source in enumerate(self._source_lengths):
            rows = self.task == task
            lengths[rows] = per_source[self.source[rows]]
        if not self.pack:
            return lengths
        if len(self) == 0:
            return lengths[:0]
        tokens_per_item = self.item_index.tokens_per_item
        return pack_lengths(lengths, self.pack_rows, self.pack_offsets, self.pack_prefixes, tokens_per_item)

    def behaviour_lengths(self) -> np.ndarray:
        """Rough prompt tokens of every training prefix: its history's items x (code tokens + separator)."""
        train = self.split.train
        history = np.minimum(train.target_pos - self.catalogue.offsets[train.user], self.split.max_history)
        return history * (self.item_index.tokens_per_item + 2)

    def _task_source_lengths(self) -> tuple[np.ndarray, ...]:
        """Per task id, the rough token count of each of its source rows (see :meth:`approx_lengths`)."""
        behaviour = self.behaviour_lengths()
        chars = {name: char_counts(texts) for name, texts in self.texts.items()}
        field_chars = np.stack(
            [chars[prompt_field or response_field] for _, prompt_field, response_field in TEXT_KINDS]
        )
        text = field_chars[self.text_kind, self.text_item] // 4
        return behaviour, behaviour, text, char_counts(self.query_text) // 4

    # ------------------------------------------------------------------------------------- rendering
    def history_text(self, history: np.ndarray) -> str:
        """A left-padded history row as code strings, oldest first, joined by ", "."""
        return HISTORY_SEPARATOR.join(self.code_text[item] for item in history[history != self.catalogue.pad_item])

    def render(self, rows: np.ndarray) -> tuple[list[str], list[int | str]]:
        """Prompts and responses of plan rows; a response is an item id (its codes) or a text."""
        task, source, item, template = self.task[rows], self.source[rows], self.item[rows], self.template[rows]
        prompts: list[str] = [""] * len(rows)
        responses: list[int | str] = [int(value) for value in item]
        behaviour = np.flatnonzero(task <= NEGATIVE_TASK)
        histories = self.split.histories(self.split.train, source[behaviour]) if len(behaviour) else None
        for j, row in enumerate(behaviour):
            templates = SEQUENTIAL if task[row] == SEQUENTIAL_TASK else NEGATIVE
            prompts[row] = frame(
                templates[template[row] % len(templates)].format(history=self.history_text(histories[j]))
            )
        for row in np.flatnonzero(task == TEXT_TASK):
            templates, prompt_field, response_field = TEXT_KINDS[self.text_kind[source[row]]]
            text_of = self.texts[prompt_field or response_field][item[row]]
            fill = {prompt_field: text_of} if prompt_field else {"item": self.code_text[item[row]]}
            prompts[row] = frame(templates[template[row] % len(templates)].format(**fill))
            if response_field:
                responses[row] = text_of
        for row in np.flatnonzero(task == QUERY_TASK):
            prompts[row] = frame(QUERY[template[row] % len(QUERY)].format(query=self.query_text[source[row]]))
        return prompts, responses

    # ---------------------------------------------------------------------------------- tokenization
    def set_tokenizer(self, tokenizer) -> None:
        """Attach the model's tokenizer (with the code tokens and a pad token) and map codes to token ids."""
        vocab = tokenizer.get_vocab()
        missing = [token for token in self.item_index.vocabulary() if token not in vocab]
        if missing:
            raise ValueError(
                f"the tokenizer lacks {len(missing)} code tokens (e.g. {missing[:3]}); add the index's tokens first"
            )
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad and an EOS token")
        self.tokenizer = tokenizer
        self.code_ids = self.item_index.token_ids(vocab)

    def _tokenizer(self):
        if self.tokenizer is None:
            raise RuntimeError(
                "no tokenizer yet: the model hands it over with datamodule.set_tokenizer() in configure_model()"
            )
        return self.tokenizer

    def train_batch(self, units: np.ndarray) -> dict[str, torch.Tensor]:
        """The training batch of ``units`` (plan rows, or packs when packing); see :meth:`sample_batch`."""
        if not self.pack:
            return self.sample_batch(units)
        return self.packed_batch(self.unit_rows(units))

    def _tokenized(self, rows: np.ndarray) -> tuple[list[list[int]], list[list[int]], np.ndarray, np.ndarray]:
        """Prompt ids, response ids + EOS, the rows' tasks and which rows fit ``max_length``."""
        tokenizer = self._tokenizer()
        prompts, responses = self.render(rows)
        prompt_ids, response_ids, fits = tokenize_samples(tokenizer, prompts, responses, self.code_ids, self.max_length)
        return prompt_ids, response_ids, self.task[rows], fits

    def _dropped(self, tasks: np.ndarray, fits: np.ndarray) -> torch.Tensor:
        """Per task, how many of the samples did not fit ``max_length``."""
        return torch.from_numpy(np.bincount(tasks[~fits], minlength=len(self.TASK_NAMES)))

    def sample_batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``/``attention_mask``/``labels`` (-100 off the response), ``task`` and "
        "``dropped``."""
        prompt_ids, response_ids, tasks, fits = self._tokenized(rows)
        keep = np.flatnonzero(fits)
        batch = right_padded(prompt_ids, response_ids, keep, self.tokenizer.pad_token_id)
        return {**batch, "task": torch.from_numpy(tasks[keep]), "dropped": self._dropped(tasks, fits)}

    def packed_batch(self, packs: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Packs of plan rows as prefix-tree rows: ``input_ids``/``position_ids``/``labels [B, T]``, a boolean
        ``attention_mask [B, 1, T, T]``, ``task`` of the kept samples and ``dropped`` (:mod:`datamodules.packing`)."""
        rows = np.concatenate(packs) if packs else np.zeros(0, dtype=np.int64)
        prompt_ids, response_ids, tasks, fits = self._tokenized(rows)
        sizes = [len(pack) for pack in packs]
        batch = packed(prompt_ids, response_ids, fits, sizes, self.tokenizer.pad_token_id)
        batch.update(task=torch.from_numpy(tasks[fits]), dropped=self._dropped(tasks, fits))
        return batch

    def eval_batch(self, index: SampleIndex, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Left-padded LC-Rec evaluation prompts with ``target_item``, ``user`` (history = capped prefix) and the
        (row, item) pairs ``seen_rows``/``seen_items`` of the user's whole history before the target."""
        tokenizer = self._tokenizer()
        histories = self.split.histories(index, rows)
        prompt_ids = tokenizer([eval_prompt(self.history_text(row)) for row in histories], add_special_tokens=True)[
            "input_ids"
        ]
        input_ids, attention = left_padded(prompt_ids, tokenizer.pad_token_id)
        seen_rows, seen_items = self.split.seen_items(index, rows)  # the whole history, for `mask_history`
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "target_item": torch.from_numpy(self.catalogue.items[index.target_pos[rows]]),
            "user": torch.from_numpy(index.user[rows]),
            "seen_rows": torch.from_numpy(seen_rows),
            "seen_items": torch.from_numpy(seen_items),
        }
