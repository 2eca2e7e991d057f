"""The alignment-task samples of one epoch and their tokenization (used by :class:`datamodules.PromptDataModule`).

An epoch is a *plan*: parallel arrays ``task``, ``source`` (row of the task's source table), ``item`` (the
item the response names, or whose text it is) and ``template``. Only the plan is re-drawn each epoch (negative
items, task subsampling, templates, all from ``default_rng((seed, epoch))``); strings are rendered and
tokenized per batch with the fast tokenizer, which costs far less than one LLM step.

Each training sequence is ``prompt ids + response ids + [EOS]``. Item codes in a response are the code
tokens' ids directly (exactly what the constrained decoder emits after ``### Response:``); text responses
are tokenized without special tokens. Labels are ``-100`` on the prompt and on padding.
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
from datamodules.packing import collate_packs, pack_tree
from datamodules.prompt_templates import (
    HISTORY_SEPARATOR,
    NEGATIVE,
    QUERY,
    SEQUENTIAL,
    TEXT_KINDS,
    clean_text,
    eval_prompt,
    frame,
)
from datamodules.split import LeaveLastOutSplit, SampleIndex

log = logging.getLogger(__name__)

TASKS = ("sequential", "negative", "text", "query")
SEQUENTIAL_TASK, NEGATIVE_TASK, TEXT_TASK, QUERY_TASK = range(len(TASKS))
#: Templates are drawn as ``rng.integers(TEMPLATE_DRAW) % len(templates)``: 12 is divisible by every set size (2, 3, 4).
TEMPLATE_DRAW = 12


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


def left_padded(prompt_ids: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, T]`` of prompts left-padded to the longest (generation layout)."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for out, ids in enumerate(prompt_ids):
        input_ids[out, width - len(ids) :] = torch.tensor(ids)
        attention[out, width - len(ids) :] = 1
    return input_ids, attention


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
        self.texts: dict[str, list[str]] = {
            "title": [""] * self.catalogue.num_items,
            "description": [""] * self.catalogue.num_items,
        }
        items, kinds = [], []
        cold = set(self.cold_items.tolist())
        for item, fields in (self.catalogue.item_text or {}).items():
            if item in cold:
                continue
            for kind, (_, prompt_field, response_field) in enumerate(TEXT_KINDS):
                name = prompt_field or response_field
                if not self.texts[name][item]:
                    self.texts[name][item] = clean_text(fields.get(name, ""))
                if self.texts[name][item]:
                    items.append(item)
                    kinds.append(kind)
        self.text_item, self.text_kind = np.array(items, dtype=np.int64), np.array(kinds, dtype=np.int64)
        if self.weights.text > 0 and not items:
            log.info("%s has no item text: the text-alignment task is skipped", self.catalogue.name)

    def _build_queries(self, task: str | None) -> None:
        """Reviews of training interactions only (``items[:-2]``, never a validation or test target); ``task``
        names the task that uses them in the log line of a dataset without reviews (None: not used, no line)."""
        reviews = {key: text.strip() for key, text in (self.catalogue.reviews or {}).items() if text and text.strip()}
        num_items = self.catalogue.num_items
        if not reviews:
            if task is not None:
                log.info("%s has no reviews: %s is skipped", self.catalogue.name, task)
            self.query_item, self.query_text = np.zeros(0, dtype=np.int64), []
            return
        pairs = np.array(list(reviews), dtype=np.int64)
        train_users, train_items = self.split.train_interactions()
        held_out = np.concatenate([self.split.valid.target_pos, self.split.test.target_pos])
        held_users = np.concatenate([self.split.valid.user, self.split.test.user])
        keys = pairs[:, 0] * num_items + pairs[:, 1]
        # a review of an item the user also has as a held-out target may describe that interaction: leave it out
        keep = np.isin(keys, train_users * num_items + train_items) & ~np.isin(
            keys, held_users * num_items + self.catalogue.items[held_out]
        )
        texts = list(reviews.values())
        self.query_item = pairs[keep, 1]
        self.query_text = [texts[i] for i in np.flatnonzero(keep)]
        log.info("query alignment: %d of %d reviews are of training interactions", int(keep.sum()), len(pairs))

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
        source = self.source[behaviour]
        user = self.split.train.user[source]
        behaviour = behaviour[np.lexsort((self.task[behaviour], source, user))]
        source, user = self.source[behaviour], self.split.train.user[self.source[behaviour]]
        new_user = np.r_[True, user[1:] != user[:-1]] if len(behaviour) else np.zeros(0, dtype=bool)
        new_source = np.r_[True, source[1:] != source[:-1]] if len(behaviour) else np.zeros(0, dtype=bool)
        # prefixes counted within each user; a pack starts at a user's first prefix and every `pack` prefixes
        prefix = np.cumsum(new_source) - 1
        prefix_in_user = prefix - np.maximum.accumulate(np.where(new_user, prefix, 0))
        starts = np.flatnonzero(new_user | (new_source & (prefix_in_user % self.pack == 0)))
        # Text and query samples are packed too, as many random ones of a task per pack as a behaviour pack holds
        # on average: batches count packs, so packs of one would hand these tasks (1 + ratio) x pack times their
        # share of the optimiser steps (at 1:3 and pack 1, text 0.1 would train like text 0.4). They share the frame.
        group = max(1, round(len(behaviour) / len(starts))) if len(starts) else 1
        other_rows, other_starts = [], []
        for task in (TEXT_TASK, QUERY_TASK):
            rows = rng.permutation(np.flatnonzero(self.task == task))
            other_starts.append(len(behaviour) + sum(map(len, other_rows)) + np.arange(0, len(rows), group))
            other_rows.append(rows)
        others = np.concatenate(other_rows)
        self.pack_rows = np.concatenate([behaviour, others])
        self.pack_offsets = np.r_[starts, *other_starts, len(self.pack_rows)].astype(np.int64)
        prefixes = np.add.reduceat(new_source.astype(np.int64), starts) if len(starts) else starts
        self.pack_prefixes = np.r_[prefixes, np.zeros(sum(map(len, other_starts)), dtype=np.int64)]  # 0: not behaviour
        # one draw per pack: the sequential template t % 4; negatives take NEGATIVE[t % 4], the same wording up
        # to the question, when it exists (t % 4 < 3) and else a uniform one, so P(NEGATIVE[k]) = 1/4 + 1/12 = 1/3
        pack_of_row = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(behaviour)]))
        draw, fallback = rng.integers(0, TEMPLATE_DRAW, len(starts)), rng.integers(0, len(NEGATIVE), len(starts))
        sequential_template = draw % len(SEQUENTIAL)
        negative_template = np.where(sequential_template < len(NEGATIVE), sequential_template, fallback)
        is_negative = self.task[behaviour] == NEGATIVE_TASK
        self.template[behaviour] = np.where(is_negative, negative_template[pack_of_row], draw[pack_of_row])

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
        starts, sizes = self.pack_offsets[:-1], np.diff(self.pack_offsets)
        behaviour = (
            np.maximum.reduceat(lengths[self.pack_rows], starts)
            + (sizes - 1) * (self.item_index.tokens_per_item + 2)
            + (self.pack_prefixes - 1) * 30
        )
        # a text/query pack shares only the frame: its samples' lengths add up
        return np.where(self.pack_prefixes > 0, behaviour, np.add.reduceat(lengths[self.pack_rows], starts))

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
        prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        text_rows = [i for i, response in enumerate(responses) if isinstance(response, str)]
        text_ids = (
            tokenizer([responses[i] for i in text_rows], add_special_tokens=False)["input_ids"] if text_rows else []
        )
        response_ids = [None if isinstance(r, str) else self.code_ids[r].tolist() for r in responses]
        for i, ids in zip(text_rows, text_ids, strict=False):
            response_ids[i] = ids
        response_ids = [ids + [tokenizer.eos_token_id] for ids in response_ids]
        fits = np.array(
            [len(p) + len(r) <= self.max_length for p, r in zip(prompt_ids, response_ids, strict=False)], dtype=bool
        )
        return prompt_ids, response_ids, self.task[rows], fits

    def sample_batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``/``attention_mask``/``labels`` (-100 off the response), ``task`` and "
        "``dropped``."""
        prompt_ids, response_ids, tasks, fits = self._tokenized(rows)
        keep = np.flatnonzero(fits)
        lengths = np.array([len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=False)], dtype=np.int64)
        width = int(lengths[keep].max()) if len(keep) else 0
        input_ids = torch.full((len(keep), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(keep), width), -100, dtype=torch.long)
        attention = torch.zeros((len(keep), width), dtype=torch.long)
        for out, i in enumerate(keep):
            prompt, response = prompt_ids[i], response_ids[i]
            input_ids[out, : lengths[i]] = torch.tensor(prompt + response)
            labels[out, len(prompt) : lengths[i]] = torch.tensor(response)
            attention[out, : lengths[i]] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "task": torch.from_numpy(tasks[keep]),
            "dropped": torch.from_numpy(np.bincount(tasks[~fits], minlength=len(self.TASK_NAMES))),
        }

    def packed_batch(self, packs: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Packs of plan rows as prefix-tree rows: ``input_ids``/``position_ids``/``labels [B, T]``, a boolean
        ``attention_mask [B, 1, T, T]``, ``task`` of the kept samples and ``dropped`` (:mod:`datamodules.packing`)."""
        rows = np.concatenate(packs) if packs else np.zeros(0, dtype=np.int64)
        prompt_ids, response_ids, tasks, fits = self._tokenized(rows)
        bounds = np.cumsum([0] + [len(pack) for pack in packs])
        trees = []
        for start, stop in zip(bounds[:-1], bounds[1:], strict=False):
            kept = [i for i in range(start, stop) if fits[i]]
            if kept:
                trees.append(pack_tree([prompt_ids[i] for i in kept], [response_ids[i] for i in kept]))
        batch = collate_packs(trees, self.tokenizer.pad_token_id)
        batch.update(
            task=torch.from_numpy(tasks[fits]),
            dropped=torch.from_numpy(np.bincount(tasks[~fits], minlength=len(self.TASK_NAMES))),
        )
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
