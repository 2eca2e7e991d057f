"""P5's sequential-recommendation prompts (Geng et al., 2022) over the project's leave-last-out samples.

Encoder input: one of P5's sequential templates (``jeykigung/P5``, ``src/all_amazon_templates.py``, task family 2)
filled with the user and the history, each history item written as ``item_`` and its id tokens
(:mod:`datamodules.p5_indexing`); decoder target: the next item's id tokens (padded to the common length with
``<end>``), then EOS. Training draws one of the templates 2-1 .. 2-6 per sample and joins the history with ``" , "``
or ``" -> "`` (P5's ``pretrain_data.py`` draws both uniformly); validation and test use P5's held-out template 2-13
with ``" , "``, as P5 evaluates on an unseen prompt. P5's user-description templates (2-4 .. 2-6, 2-13) name the
reviewer; the datasets here have no names, so every template names the user as ``user_`` and the user id's digits.

Example (cid indexing; validation and test)::

    According to the purchase history of user_ 1 2 : \\n item_ <c3> <c3-7> <i5> , item_ <c1> <i0> \\n Can you
    recommend the next possible item to the user ?   ->   <c4> <i2> <end> </s>

No pretrained T5 or SentencePiece model is available offline, so :func:`build_word_tokenizer` builds a word-level
tokenizer (``tokenizers.models.WordLevel``, whitespace split) over the template words, ``user_``/``item_``, the
digits and every id token, with T5's special-token layout (``<pad>`` 0, also the decoder start; ``</s>`` 1,
appended to every encoder input; ``<unk>`` 2). ``tokenizer_path`` loads a local Hugging Face tokenizer instead
(e.g. t5-small's, saved next to the model a ``model_path`` names) and adds the id tokens it lacks, as P5-ID adds
its id tokens to T5's. ``export_dir`` saves the tokenizer and the item ids as an artifact, so the tokens a trained
model reads stay with it.

The samples are exactly :class:`datamodules.semantic_ids.SemanticIdSamples`' (the split's every training prefix,
one validation and one test sample per user, ``max_history`` items); batches carry the same keys (``input_ids``,
``attention_mask``, ``labels``, ``target_item``, ``user``, ``seen_rows``/``seen_items``), so
:class:`lightning_modules.seq2seq.Seq2SeqRecommender` trains and ranks them unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.artifacts import ArtifactWriter
from datamodules.base import RecDataModule, Source
from datamodules.errors import ConfigError, require
from datamodules.item_index import ItemIndex
from datamodules.p5_indexing import DIGITS, ITEM_PREFIX, Indexing, ItemIds, index_items
from datamodules.semantic_ids import SemanticIdDataModule, decoder_targets
from datamodules.split import LeaveLastOutSplit, SampleIndex
from datamodules.synthetic import SyntheticSpec

log = logging.getLogger(__name__)

#: P5's sequential next-item templates without candidates (``src/all_amazon_templates.py``, ids 2-1 .. 2-6 and
#: 2-13), verbatim but for the user field (``user_{}`` and the user description both read ``{user}``).
TEMPLATES = {
    "2-1": "Given the following purchase history of {user} : \n {history} \n predict next possible item to be "
    "purchased by the user ?",
    "2-2": "I find the purchase history list of {user} : \n {history} \n I wonder what is the next item to recommend "
    "to the user . Can you help me decide ?",
    "2-3": "Here is the purchase history list of {user} : \n {history} \n try to recommend next item to the user",
    "2-4": "Given the following purchase history of {user} : \n {history} \n predict next possible item for the user",
    "2-5": "Based on the purchase history of {user} : \n {history} \n Can you decide the next item likely to be "
    "purchased by the user ?",
    "2-6": "Here is the purchase history of {user} : \n {history} \n What to recommend next for the user ?",
    "2-13": "According to the purchase history of {user} : \n {history} \n Can you recommend the next possible item "
    "to the user ?",
}
#: History separators: P5 draws one per training sample; evaluation uses the first.
SEPARATORS = (" , ", " -> ")
USER_PREFIX = "user_"
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


def template_words() -> list[str]:
    """Every word of :data:`TEMPLATES` and :data:`SEPARATORS` (sorted), fields removed."""
    text = " ".join(TEMPLATES.values()).replace("{user}", " ").replace("{history}", " ")
    return sorted(set(text.split()) | {separator.strip() for separator in SEPARATORS})


def build_word_tokenizer(id_tokens: list[str]):
    """A T5-like word-level ``PreTrainedTokenizerFast`` over the prompts' words and ``id_tokens``.

    Layout: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, the template words, ``user_``, ``item_``, the digits, then
    ``id_tokens`` (those not already there) in their order. Text is split on whitespace only, and ``</s>`` is
    appended to every encoded text (T5 appends EOS to its inputs).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS, *template_words(), USER_PREFIX, ITEM_PREFIX, *DIGITS, *id_tokens]
    vocab = {word: index for index, word in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def load_tokenizer(path: str, id_tokens: list[str]):
    """A local Hugging Face tokenizer with the prompt words and ``id_tokens`` it lacks added as whole tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ConfigError(
            f"data.init_args.tokenizer_path {path}: the tokenizer needs a pad and an EOS token (T5's have both)"
        )
    vocab = tokenizer.get_vocab()
    missing = [token for token in dict.fromkeys([USER_PREFIX, ITEM_PREFIX, *id_tokens]) if token not in vocab]
    tokenizer.add_tokens(missing)
    return tokenizer


@dataclass(frozen=True)
class TokenizerVocabulary:
    """What the seq2seq model sizes and decodes with (the tokenizer's length and special tokens)."""

    size: int
    pad_token_id: int
    eos_token_id: int


class P5Prompts:
    """Renders P5 prompts and targets of given samples (see the module docstring).

    Args:
        item_ids: every item's id tokens.
        user_ids: the original id of each user row (rendered digit by digit).
    """

    def __init__(self, item_ids: ItemIds, user_ids: np.ndarray) -> None:
        self.items = [f"{ITEM_PREFIX} {' '.join(tokens)}" for tokens in item_ids.tokens]
        self.users = [f"{USER_PREFIX} {' '.join(str(user))}" for user in user_ids.tolist()]
        self.targets = [" ".join(tokens) for tokens in item_ids.padded()]

    def prompt(self, user: int, history: list[int], template: str, separator: str = SEPARATORS[0]) -> str:
        """The encoder text of one sample: ``template`` filled with the user and the history items (oldest first)."""
        items = separator.join(self.items[item] for item in history)
        return TEMPLATES[template].format(user=self.users[user], history=items)

    def target(self, item: int) -> str:
        """The decoder text of one item: its padded id tokens (the tokenizer adds EOS)."""
        return self.targets[item]


class P5Samples(Dataset):
    """Samples of one split stage as tokenised P5 prompts; batches built in ``__getitems__``.

    Args:
        split: the leave-last-out split.
        index: the stage's samples (a position one past the user's last item: serving, no target).
        rows: the sample rows served.
        prompts: the prompt renderer.
        tokenizer: encodes the prompts.
        item_tokens: ``[num_items, T]`` decoder token ids of every item.
        templates: the templates drawn from (one per sample, uniformly; a single one is always used).
        separators: the history separators drawn from.
        with_seen: add ``seen_rows``/``seen_items`` (evaluation).
        with_target: add ``labels``/``target_item`` (not when serving).
        seed: seed of the template and separator draws (training). Each batch draws from a generator seeded by
            ``seed`` and the batch's rows, so draws do not depend on DataLoader workers or on resuming, and differ
            between epochs as the shuffled batches do.
    """

    def __init__(
        self,
        split: LeaveLastOutSplit,
        index: SampleIndex,
        rows: np.ndarray,
        prompts: P5Prompts,
        tokenizer,
        item_tokens: np.ndarray,
        templates: tuple[str, ...],
        separators: tuple[str, ...],
        with_seen: bool,
        with_target: bool = True,
        seed: int = 0,
    ) -> None:
        self.split, self.index, self.rows, self.prompts, self.tokenizer = split, index, rows, prompts, tokenizer
        self.item_tokens, self.templates, self.separators = item_tokens, templates, separators
        self.with_seen, self.with_target = with_seen, with_target
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    def texts(self, rows: np.ndarray) -> list[str]:
        """The encoder texts of sample rows (``rows`` index :attr:`rows`)."""
        samples = self.rows[rows]
        pad = self.split.catalogue.pad_item
        histories = self.split.histories(self.index, samples)
        rng = np.random.default_rng([self.seed, *rows.tolist()])
        templates = rng.integers(len(self.templates), size=len(samples)) if len(self.templates) > 1 else None
        separators = rng.integers(len(self.separators), size=len(samples)) if len(self.separators) > 1 else None
        return [
            self.prompts.prompt(
                int(user),
                [item for item in history.tolist() if item != pad],
                self.templates[0 if templates is None else templates[i]],
                self.separators[0 if separators is None else separators[i]],
            )
            for i, (user, history) in enumerate(zip(self.index.user[samples], histories, strict=True))
        ]

    def __getitems__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        samples = self.rows[rows]
        encoded = self.tokenizer(self.texts(rows), padding=True, return_tensors="pt")
        batch = {
            "user": torch.from_numpy(self.index.user[samples]),
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
        }
        eos = self.tokenizer.eos_token_id
        targets = decoder_targets(
            self.split, self.index, samples, self.item_tokens, eos, self.with_target, self.with_seen
        )
        return batch | targets


class P5DataModule(SemanticIdDataModule):
    """Leave-last-out samples as P5 prompts over P5's item indexing (see the module docstring).

    A :class:`~datamodules.semantic_ids.SemanticIdDataModule` whose item index is P5's (computed in ``setup`` from
    the training interactions and the seed, deterministic) and whose inputs are text prompts; the split, the
    evaluation subset and the loaders are its own.

    Args:
        data_dir: see :class:`datamodules.RecDataModule`.
        dataset: see :class:`datamodules.RecDataModule`.
        source: see :class:`datamodules.RecDataModule`.
        processed_dir: see :class:`datamodules.RecDataModule`.
        synthetic: see :class:`datamodules.RecDataModule`.
        max_history: history items per prompt (P5 and P5-ID: 20).
        batch_size: training samples per batch.
        eval_batch_size: evaluation samples per batch (each expanded to ``num_beams`` beams).
        num_workers: DataLoader workers.
        seed: seed of the random and cid indexings, the training template draws and the evaluation subset.
        cold_items: items held out of every fit (see :class:`datamodules.base.RecDataModule`).
        indexing: ``cid`` (collaborative, P5-ID's best), ``sequential`` or ``random`` (see
            :mod:`datamodules.p5_indexing`).
        cid_clusters: cid: sub-clusters per split (P5-ID's ``cluster_number``: 20).
        cid_max_cluster_size: cid: a cluster with more items is split again (P5-ID's ``cluster_size``: 500).
        train_templates: P5 template ids drawn for training prompts.
        eval_template: the P5 template of validation, test and serving prompts (P5's held-out 2-13).
        tokenizer_path: a local Hugging Face tokenizer directory (e.g. t5-small's); None builds the word-level one.
        export_dir: where the tokenizer and item ids are written as an artifact (``p5_item_ids``); None writes none.
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
        batch_size: int = 64,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 42,
        cold_items: str | None = None,
        indexing: Indexing = "cid",
        cid_clusters: int = 20,
        cid_max_cluster_size: int = 500,
        train_templates: tuple[str, ...] = ("2-1", "2-2", "2-3", "2-4", "2-5", "2-6"),
        eval_template: str = "2-13",
        tokenizer_path: str | None = None,
        export_dir: str | None = None,
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
            cold_items,
            user_buckets=0,
            eval_max_users=eval_max_users,
            test_all_users=test_all_users,
        )
        field = "data.init_args."
        require(indexing in ("cid", "sequential", "random"), field + "indexing", "cid, sequential or random", indexing)
        require(cid_clusters >= 2, field + "cid_clusters", ">= 2", cid_clusters)
        require(
            cid_max_cluster_size >= cid_clusters,
            field + "cid_max_cluster_size",
            f">= cid_clusters ({cid_clusters})",
            cid_max_cluster_size,
        )
        known = ", ".join(TEMPLATES)
        train_templates = tuple(train_templates)
        require(
            bool(train_templates) and set(train_templates) <= set(TEMPLATES),
            field + "train_templates",
            f"a non-empty list of {known}",
            train_templates,
        )
        require(eval_template in TEMPLATES, field + "eval_template", f"one of {known}", eval_template)
        self.indexing = indexing
        self.cid_clusters = cid_clusters
        self.cid_max_cluster_size = cid_max_cluster_size
        self.train_templates = train_templates
        self.eval_template = eval_template
        self.tokenizer_path = tokenizer_path
        self.export_dir = export_dir
        self.item_ids: ItemIds | None = None
        self.tokenizer = None
        self.prompts: P5Prompts | None = None

    def setup(self, stage: str | None = None) -> None:
        RecDataModule.setup(self, stage)  # catalogue and split; the item index is P5's own, made here
        if self.item_index is not None:
            return
        self.item_ids = ids = index_items(
            self.split, self.indexing, self.seed, self.cid_clusters, self.cid_max_cluster_size
        )
        id_tokens = ids.vocabulary()
        if self.tokenizer_path is None:
            self.tokenizer = build_word_tokenizer(id_tokens)
        else:
            self.tokenizer = load_tokenizer(self.tokenizer_path, id_tokens)
        tokenizer = self.tokenizer
        table = np.asarray([tokenizer.convert_tokens_to_ids(row) for row in ids.padded()], dtype=np.int64)
        digest = hashlib.sha256(json.dumps([list(row) for row in ids.tokens]).encode()).hexdigest()
        self.item_index = ItemIndex(
            codes=table,
            num_levels=table.shape[1],
            codebook_size=len(tokenizer),
            source=f"p5:{self.indexing}",
            index_hash=digest,
        )
        self.vocabulary = TokenizerVocabulary(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        self.prompts = prompts = P5Prompts(ids, self.catalogue.user_ids)
        log.info(
            "P5 %s indexing: %d items x %d tokens; tokenizer of %d tokens",
            self.indexing,
            len(table),
            table.shape[1],
            len(tokenizer),
        )
        split, seed = self.split, self.seed
        users = np.arange(self.catalogue.num_users)
        whole = SampleIndex(users, self.catalogue.offsets[1:])  # after each user's last item: serving
        train, evaluate = self.train_templates, (self.eval_template,)
        common = (prompts, tokenizer, table)
        self.datasets = {
            "train": P5Samples(
                split, split.train, np.arange(len(split.train)), *common, train, SEPARATORS, False, seed=seed
            ),
            "valid": P5Samples(split, split.valid, self.eval_rows("valid"), *common, evaluate, SEPARATORS[:1], True),
            "test": P5Samples(split, split.test, self.eval_rows("test"), *common, evaluate, SEPARATORS[:1], True),
            "predict": P5Samples(split, whole, users, *common, evaluate, SEPARATORS[:1], True, with_target=False),
        }
        if self.export_dir is not None and (self.trainer is None or self.trainer.is_global_zero):
            self.export(self.export_dir)

    def item_token_ids(self) -> np.ndarray:
        """``[num_items, T]`` decoder token ids of every item's padded id (what the model's trie is built from)."""
        return self.item_index.codes

    def export(self, directory: str | Path) -> dict:
        """Write the tokenizer (``tokenizer/``) and the item ids (``item_ids.json``) as a ``p5_item_ids`` artifact."""
        with ArtifactWriter(directory, "p5_item_ids") as writer:
            self.tokenizer.save_pretrained(writer.path("tokenizer"))
            writer.write_json("item_ids.json", {str(item): list(row) for item, row in enumerate(self.item_ids.tokens)})
            return writer.commit(
                {
                    "dataset": self.catalogue.fingerprint(),
                    "indexing": self.indexing,
                    "seed": self.seed,
                    "cid_clusters": self.cid_clusters,
                    "cid_max_cluster_size": self.cid_max_cluster_size,
                    "tokens_per_item": self.item_index.tokens_per_item,
                    "index_hash": self.item_index.index_hash,
                    "vocabulary_size": self.vocabulary.size,
                }
            )
