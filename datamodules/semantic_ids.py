"""The semantic-ID view: leave-last-out samples as token-id tensors for models whose vocabulary is the item codes.

TIGER (Rajput et al., 2023, "Recommender Systems with Generative Retrieval") reads a user's history as the
concatenated semantic IDs of its items, prefixed by a hashed user token, and generates the next item's semantic
ID. No text and no tokenizer: :class:`SemanticIdVocabulary` lays the tokens out once, and the model sizes its
embedding from it. The samples are exactly :class:`datamodules.sequence.SequenceSamples`' (every training prefix,
one validation and one test sample per user, history capped at ``max_history`` items), so the rows compare with
SASRec's and stage 3's.

Batch format (every stage)::

    input_ids      [B, S]  left-padded: pad..., user token, codes of item 1, ..., codes of item h
    attention_mask [B, S]  1 on real tokens
    labels         [B, T + 1]  the next item's T code tokens, then EOS
    target_item    [B]     the next item's id
    user           [B]     user rows
    seen_rows/seen_items [P]  the user's whole history before the target (validation/test, for ``mask_history``)

``predict`` batches (serving) read the last ``max_history`` items of the whole sequence and have no target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.base import RecDataModule, Source
from datamodules.errors import require
from datamodules.item_index import ItemIndex, load_item_index
from datamodules.split import LeaveLastOutSplit, SampleIndex
from datamodules.synthetic import SyntheticSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SemanticIdVocabulary:
    """Token ids of a semantic-ID model: pad ``0`` (also T5's decoder start), EOS ``1``, the codes, the users.

    Position ``t`` of a code tuple has its own ``level_sizes[t]`` tokens (``<a_3>`` and ``<b_3>`` differ, as in
    TIGER), starting at ``code_offsets[t]``; then ``user_buckets`` user tokens (TIGER hashes user ids into 2000).

    Attributes:
        level_sizes: codes per position of the tuple (``ItemIndex.level_sizes()``).
        user_buckets: user tokens; 0 = no user token.
    """

    level_sizes: tuple[int, ...]
    user_buckets: int = 0

    pad_token_id: int = 0
    eos_token_id: int = 1

    @property
    def code_offsets(self) -> np.ndarray:
        """First token id of each code position."""
        return 2 + np.concatenate([[0], np.cumsum(self.level_sizes)[:-1]]).astype(np.int64)

    @property
    def user_offset(self) -> int:
        return 2 + int(sum(self.level_sizes))

    @property
    def size(self) -> int:
        """Vocabulary size (embedding rows)."""
        return self.user_offset + self.user_buckets

    def item_tokens(self, codes: np.ndarray) -> np.ndarray:
        """``[N, T]`` token ids of ``[N, T]`` integer codes."""
        return codes.astype(np.int64) + self.code_offsets[None, :]

    def user_tokens(self, users: np.ndarray) -> np.ndarray:
        """Each user row's token (row modulo ``user_buckets``: a fixed hash, as TIGER's)."""
        return self.user_offset + users.astype(np.int64) % max(self.user_buckets, 1)


def encoder_inputs(
    history: np.ndarray, item_tokens: np.ndarray, user_tokens: np.ndarray | None, pad: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded encoder tokens and mask from left-padded item histories.

    Args:
        history: ``[B, H]`` item ids, left-padded with ``len(item_tokens) - 1``.
        item_tokens: ``[num_items + 1, T]`` token table whose last row (the pad item) is all ``pad``.
        user_tokens: ``[B]`` user tokens put right before the first item, or None.
        pad: the pad token.

    Returns:
        ``input_ids`` and ``attention_mask`` ``[B, S]``, the columns padded in every row dropped.
    """
    tokens = item_tokens[history].reshape(len(history), -1)
    if user_tokens is not None:
        tokens = np.concatenate([user_tokens[:, None], tokens], axis=1)
    real = tokens != pad
    order = np.argsort(real, axis=1, kind="stable")  # padding first, real tokens in their order
    tokens, real = np.take_along_axis(tokens, order, 1), np.take_along_axis(real, order, 1)
    width = max(int(real.sum(1).max()), 1)
    return tokens[:, -width:], real[:, -width:].astype(np.int64)


def decoder_targets(
    split: LeaveLastOutSplit,
    index: SampleIndex,
    rows: np.ndarray,
    item_tokens: np.ndarray,
    eos_token_id: int,
    with_target: bool,
    with_seen: bool,
) -> dict[str, torch.Tensor]:
    """The target and seen-item keys of a seq2seq batch (shared by TIGER's and P5's samples).

    Args:
        split: the leave-last-out split.
        index: the stage's samples.
        rows: the batch's sample rows of ``index``.
        item_tokens: ``[num_items(+1), T]`` decoder token ids of every item.
        eos_token_id: appended to every label row.
        with_target: add ``labels`` (the target's tokens, then EOS) and ``target_item``.
        with_seen: add ``seen_rows``/``seen_items`` (evaluation).
    """
    batch = {}
    if with_target:
        target = split.catalogue.items[index.target_pos[rows]]
        eos = np.full((len(rows), 1), eos_token_id, dtype=np.int64)
        batch["labels"] = torch.from_numpy(np.concatenate([item_tokens[target], eos], axis=1))
        batch["target_item"] = torch.from_numpy(target)
    if with_seen:
        seen_rows, seen_items = split.seen_items(index, rows)
        batch["seen_rows"], batch["seen_items"] = torch.from_numpy(seen_rows), torch.from_numpy(seen_items)
    return batch


class SemanticIdSamples(Dataset):
    """Samples of one split stage as token ids (see the module docstring); batches built in ``__getitems__``.

    Histories, targets and seen items come from the split's own methods, as in
    :class:`datamodules.sequence.SequenceSamples`: the same samples, in tokens.

    Args:
        split: the leave-last-out split.
        index: the stage's samples (user, target position); a position one past the user's last item (serving)
            gives the whole sequence's history and no target.
        rows: the sample rows served (all, or an evaluation subset).
        item_tokens: ``[num_items, T]`` token ids of the catalogue's items.
        vocabulary: the token layout.
        with_seen: add ``seen_rows``/``seen_items`` (evaluation).
        with_target: add ``labels``/``target_item`` (not when serving).
    """

    def __init__(
        self,
        split: LeaveLastOutSplit,
        index: SampleIndex,
        rows: np.ndarray,
        item_tokens: np.ndarray,
        vocabulary: SemanticIdVocabulary,
        with_seen: bool,
        with_target: bool = True,
    ) -> None:
        self.split, self.index, self.rows, self.vocabulary = split, index, rows, vocabulary
        self.with_seen, self.with_target = with_seen, with_target
        pad_row = np.full((1, item_tokens.shape[1]), vocabulary.pad_token_id, dtype=np.int64)
        self.table = np.concatenate([item_tokens, pad_row])  # row num_items = the split's pad item

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        rows = self.rows[np.asarray(rows, dtype=np.int64)]
        vocabulary, users = self.vocabulary, self.index.user[rows]
        user_tokens = vocabulary.user_tokens(users) if vocabulary.user_buckets else None
        history = self.split.histories(self.index, rows)
        input_ids, mask = encoder_inputs(history, self.table, user_tokens, vocabulary.pad_token_id)
        batch = {
            "user": torch.from_numpy(users),
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask),
        }
        targets = decoder_targets(
            self.split, self.index, rows, self.table, vocabulary.eos_token_id, self.with_target, self.with_seen
        )
        return batch | targets


class SemanticIdDataModule(RecDataModule):
    """Leave-last-out samples over an item index, as token ids (TIGER's input; see the module docstring).

    Args:
        data_dir: see :class:`datamodules.RecDataModule`.
        dataset: see :class:`datamodules.RecDataModule`.
        source: see :class:`datamodules.RecDataModule`.
        processed_dir: see :class:`datamodules.RecDataModule`.
        synthetic: see :class:`datamodules.RecDataModule`.
        max_history: history items per sample (20, as in LC-Rec; TIGER used up to 20 too).
        batch_size: training samples per batch.
        eval_batch_size: evaluation samples per batch (each expanded to ``num_beams`` beams).
        num_workers: DataLoader workers.
        seed: seed of the evaluation subset.
        cold_items: items held out of every fit (see :class:`datamodules.base.RecDataModule`).
        index: a stage-2 export directory or an LC-Rec ``index.json`` (RQ-VAE codes, ours, a peer's); None uses the
            dataset's own ``<Name>.index.json``.
        dedupe_collisions: accept an index whose items share code tuples by appending a disambiguating level.
        user_buckets: hashed user tokens prefixed to the history (TIGER: 2000); 0 = no user token.
        eval_max_users: validate on a fixed random subset of this many users (CPU runs); None = every user.
        test_all_users: test every user even when ``eval_max_users`` subsets validation.
    """

    def __init__(
        self,
        data_dir: str = "data/synthetic",
        dataset: str | None = None,
        source: Source = "auto",
        processed_dir: str | None = None,
        synthetic: SyntheticSpec | None = None,
        max_history: int = 20,
        batch_size: int = 256,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 42,
        cold_items: str | None = None,
        index: str | None = None,
        dedupe_collisions: bool = False,
        user_buckets: int = 2000,
        eval_max_users: int | None = None,
        test_all_users: bool = True,
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
        require(user_buckets >= 0, field + "user_buckets", ">= 0 (0 = no user token; TIGER: 2000)", user_buckets)
        require(eval_max_users is None or eval_max_users >= 1, field + "eval_max_users", ">= 1 or null", eval_max_users)
        self.index = index
        self.dedupe_collisions = dedupe_collisions
        self.user_buckets = user_buckets
        self.eval_max_users = eval_max_users
        self.test_all_users = test_all_users
        self.item_index: ItemIndex | None = None
        self.vocabulary: SemanticIdVocabulary | None = None
        self.datasets: dict[str, SemanticIdSamples] = {}

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.item_index is not None:
            return
        self.item_index = load_item_index(self.index, self.catalogue, self.dedupe_collisions)
        self.vocabulary = SemanticIdVocabulary(tuple(self.item_index.level_sizes()), self.user_buckets)
        log.info(
            "item index %s: %d items x %d codes; vocabulary of %d tokens (%d user buckets)",
            self.item_index.source,
            len(self.item_index.codes),
            self.item_index.tokens_per_item,
            self.vocabulary.size,
            self.user_buckets,
        )
        tokens, split, vocabulary = self.item_token_ids(), self.split, self.vocabulary
        users = np.arange(self.catalogue.num_users)
        whole = SampleIndex(users, self.catalogue.offsets[1:])  # after each user's last item: serving
        self.datasets = {
            "train": SemanticIdSamples(split, split.train, np.arange(len(split.train)), tokens, vocabulary, False),
            "valid": SemanticIdSamples(split, split.valid, self.eval_rows("valid"), tokens, vocabulary, True),
            "test": SemanticIdSamples(split, split.test, self.eval_rows("test"), tokens, vocabulary, True),
            "predict": SemanticIdSamples(split, whole, users, tokens, vocabulary, True, with_target=False),
        }

    def item_token_ids(self) -> np.ndarray:
        """``[num_items, T]`` token ids of every item's codes (what the model's trie is built from)."""
        return self.vocabulary.item_tokens(self.item_index.codes)

    def eval_rows(self, stage: str = "valid") -> np.ndarray:
        """Users evaluated at ``stage``: all, or a fixed seeded subset of ``eval_max_users`` (sorted)."""
        num_users = self.catalogue.num_users
        if self.eval_max_users is None or self.eval_max_users >= num_users or (stage == "test" and self.test_all_users):
            return np.arange(num_users)
        return np.sort(np.random.default_rng(self.seed).choice(num_users, self.eval_max_users, replace=False))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["valid"], self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Every user with the last ``max_history`` items of the whole sequence (serving: no target)."""
        return self._loader(self.datasets["predict"], self.eval_batch_size, shuffle=False)
